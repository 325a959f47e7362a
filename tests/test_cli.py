"""The command line's contract: full --help, one set of exit codes, loss settings checked alike, flags parsed
without TensorFlow."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import pytest

from components import loss_settings
from components.embedding_stats.options import EmbeddingStatsOptions, validate_options
from components.trainer.spec import TrainOptions
from pipelines import cli
from pipelines.exit_codes import ExitCode

RUN_FLAGS = (
    "--no-wait",
    "--no-report",
    "--history",
    "--fail-on-alert",
    "--threshold",
    "--input",
    "--output",
    "--grid",
    "--dim",
    "--margin",
    "--distance",
    "--no-normalize",
    "--center",
    "--batch-size",
    "--norm-buckets",
    "--histogram-bins",
)


def test_exit_codes_are_the_documented_numbers():
    # README: 2 bad flags, 3 every record of the wrong length, 4 alerts, 5 report failed after a published run.
    assert {code.name: code.value for code in ExitCode} == {
        "OK": 0,
        "FAILED": 1,
        "USAGE": 2,
        "ALL_WRONG_LENGTH": 3,
        "ALERT": 4,
        "REPORT_FAILED": 5,
    }


def test_run_help_lists_every_flag_with_its_default_and_names_beam_options(capsys):
    assert cli.main(["run", "--help"]) == ExitCode.OK
    text = " ".join(capsys.readouterr().out.split())
    missing = [flag for flag in RUN_FLAGS if flag not in text]
    assert not missing, missing
    for shown in (
        "(default: 0.2)",
        "(default: 200)",
        "(default: 10)",
        "(default: 16)",
        "(default: euclidean)",
        "(default: 2,13,13,5)",
        "--runner",
        "FnApiRunner",
        "--direct_num_workers",
        "DataflowRunner",
    ):
        assert shown in text, shown
    assert "(default: True)" not in text and "(default: False)" not in text  # switches show no default
    assert "Exit codes: 0 ok, 1 failed, 2 usage, 3 all_wrong_length, 4 alert, 5 report_failed" in text


@pytest.mark.parametrize("command", ["train", "report", "nightly"])
def test_every_flag_of_the_other_commands_says_what_it_does(command, capsys):
    module = importlib.import_module(f"pipelines.{cli.COMMANDS[command][0]}")
    silent = [action.option_strings for action in module.parser()._actions if not action.help]
    assert not silent, silent
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0 and "--help" in capsys.readouterr().out


def test_report_flags_are_the_launchers_not_pipeline_options():
    # They never travel to the workers: Beam's options do not know them.
    options = EmbeddingStatsOptions(["--input", "x", "--output", "y"]).get_all_options()
    for name in ("report", "history", "fail_on_alert", "threshold", "wait"):
        assert name not in options, name


@pytest.mark.parametrize("margin", [-0.1, math.inf, math.nan, 2.0**97])
def test_both_components_refuse_a_bad_margin_with_one_message(margin):
    expected = f"--margin must be a finite number in [0, {loss_settings.MAX_MARGIN:.4g}]"
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("+", r"\+")):
        validate_options(EmbeddingStatsOptions(["--input", "x", "--output", "y", f"--margin={margin}"]))
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("+", r"\+")):
        TrainOptions(margin=margin)


def test_loss_bound_by_hand():
    # unit vectors: euclidean <= 2, squared <= 4, cosine <= 2; raw vectors: euclidean unbounded, cosine still 2
    assert loss_settings.LossSettings(margin=0.5).loss_bound == 2.5
    assert loss_settings.LossSettings(margin=0.5, distance="squared").loss_bound == 4.5
    assert loss_settings.LossSettings(margin=0.5, distance="cosine", normalize=False).loss_bound == 2.5
    assert loss_settings.LossSettings(normalize=False).loss_bound == math.inf
    with pytest.raises(ValueError, match="distance must be one of euclidean, squared, cosine"):
        loss_settings.LossSettings(distance="manhattan")


def test_parsing_train_and_report_flags_loads_no_tensorflow():
    code = (
        "import sys; from pipelines import train, report; "
        "train.parser().parse_args(['--stats', 'a', '--output', 'b', '--margin', '0.3']); "
        "report.parser().parse_args(['--output', 'a']); import components.report.run_data; "
        "sys.exit(int('tensorflow' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
