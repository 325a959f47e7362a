"""`tripletflow nightly`: date partitions, backfill, replacement of a date's outputs, and shell hygiene."""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import pytest
from test_pipelines_local import assert_same_outputs, leftovers, stats_flags

from pipelines import nightly
from pipelines.exit_codes import ExitCode
from schemas import contract

UTC = datetime.timezone.utc
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Date logic (hand-computed cases).
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "now, expected",
    [
        (datetime.datetime(2024, 3, 1, 0, 30, tzinfo=UTC), datetime.date(2024, 2, 29)),  # leap day
        (datetime.datetime(2025, 1, 1, 23, 59, tzinfo=UTC), datetime.date(2024, 12, 31)),  # year boundary
        # 01:00 at UTC+5 is 20:00 UTC the day before: yesterday is two local days back
        (
            datetime.datetime(2024, 3, 1, 1, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=5))),
            datetime.date(2024, 2, 28),
        ),
    ],
)
def test_default_date_is_yesterday_in_utc(now, expected):
    assert nightly.yesterday_utc(now) == expected


def test_backfill_range_is_inclusive_and_checked():
    days = nightly.date_range(datetime.date(2024, 2, 27), datetime.date(2024, 3, 2))
    assert [d.isoformat() for d in days] == ["2024-02-27", "2024-02-28", "2024-02-29", "2024-03-01", "2024-03-02"]
    assert nightly.date_range(datetime.date(2024, 5, 1), datetime.date(2024, 5, 1)) == [datetime.date(2024, 5, 1)]
    with pytest.raises(ValueError, match="reversed"):
        nightly.date_range(datetime.date(2024, 5, 2), datetime.date(2024, 5, 1))
    with pytest.raises(ValueError, match="split it"):
        nightly.date_range(datetime.date(2024, 1, 1), datetime.date(2042, 1, 1))


def test_templates_resolve_per_date_for_gcs_and_local_paths():
    date = datetime.date(2024, 5, 1)
    assert nightly.partition_paths("gs://b/in/date={date}/*.gz", "gs://b/out/date={date}", date) == (
        "gs://b/in/date=2024-05-01/*.gz",
        "gs://b/out/date=2024-05-01",
    )
    assert nightly.partition_paths("/data/{date}/part-*", "/out/{date}", date) == (
        "/data/2024-05-01/part-*",
        "/out/2024-05-01",
    )
    assert nightly.history_root("gs://b/out/date={date}") == "gs://b/out"
    assert nightly.history_root("/runs/{date}/stats") == "/runs"
    with pytest.raises(ValueError, match="must contain"):
        nightly.check_template("gs://b/out/latest", "--output-template")
    with pytest.raises(ValueError, match="only the field"):
        nightly.check_template("gs://b/out/{day}", "--output-template")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--date", "2024-13-01"], "YYYY-MM-DD"),
        (["--backfill", "2024-05-02", "2024-05-01"], "reversed"),
        (["--date", "2024-05-01", "--backfill", "2024-05-01", "2024-05-02"], "not allowed with"),
        (["--date", "2024-05-01", "--attempts", "0"], "--attempts"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(argv, message, tmp_path, capsys):
    templates = [
        "--input-template",
        str(tmp_path / "{date}" / "*"),
        "--output-template",
        str(tmp_path / "o" / "{date}"),
    ]
    try:
        code = nightly.run([*templates, *argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == ExitCode.USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------
# Real runs: backfill with a complete date, a fresh date and a missing one; then a re-run.
# ---------------------------------------------------------------------------
def _start_time(path: Path) -> str:
    return json.loads((path / contract.MANIFEST_FILE).read_text())["start_time"]


def test_backfill_skips_complete_dates_runs_new_ones_and_reports_failures(stats_run, tmp_path, capsys):
    done_day, new_day, missing_day = "2024-05-01", "2024-05-02", "2024-05-03"
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for day in (done_day, new_day):  # the shared sample as two days' partitions
        (inputs / f"date={day}").mkdir(parents=True)
        for source in stats_run.input.files:
            shutil.copy(source, inputs / f"date={day}")
    shutil.copytree(stats_run.output_dir, outputs / f"date={done_day}")  # a published run
    before = (outputs / f"date={done_day}" / contract.MANIFEST_FILE).read_bytes()

    flags = [f for f in stats_flags(stats_run) if f not in ("--input", stats_run.input.pattern)]
    with_report = [f for f in flags if f != "--no-report"]
    code = nightly.run(
        [
            "--input-template",
            str(inputs / "date={date}" / "*"),
            "--output-template",
            str(outputs / "date={date}"),
            "--backfill",
            done_day,
            missing_day,
            *with_report,
            "--runner=FnApiRunner",
        ]
    )
    captured = capsys.readouterr()
    assert code == ExitCode.FAILED  # one date had no input
    assert f"{done_day}: already complete" in captured.out
    assert f"{done_day} attempt" not in captured.out
    assert re.search(rf"1 of 3 date\(s\) failed: {missing_day} \(exit 2\)", captured.err)
    assert f"{missing_day} attempt 2/" not in captured.out  # a missing input is not retried
    assert (outputs / f"date={done_day}" / contract.MANIFEST_FILE).read_bytes() == before  # untouched
    assert not (outputs / f"date={missing_day}").exists()
    # The new date ran for real; same input and flags as the reference run: same tables (#7.2).
    assert_same_outputs(outputs / f"date={new_day}", stats_run.output_dir)
    manifest = json.loads((outputs / f"date={new_day}" / contract.MANIFEST_FILE).read_text())
    assert all(f"date={new_day}" in path for path in manifest["input_files"])
    assert [leftovers(partition) for partition in outputs.iterdir()] == [[], []]
    # Its report compared it with the earlier partition of the same output template.
    alerts = json.loads((outputs / f"date={new_day}" / contract.ALERTS_FILE).read_text())
    assert alerts["compared_with"] == [done_day]
    assert (outputs / f"date={new_day}" / contract.REPORT_FILE).exists()

    # Re-running one date replaces its output whole: a stray file from before disappears.
    stray = outputs / f"date={new_day}" / "stray-from-an-older-run.parquet"
    stray.write_text("old")
    old_start = _start_time(outputs / f"date={new_day}")
    assert (
        nightly.run(
            [
                "--input-template",
                str(inputs / "date={date}" / "*"),
                "--output-template",
                str(outputs / "date={date}"),
                "--date",
                new_day,
                *flags,
                "--runner=FnApiRunner",
            ]
        )
        == 0
    )
    assert not stray.exists()
    assert _start_time(outputs / f"date={new_day}") >= old_start
    assert_same_outputs(outputs / f"date={new_day}", stats_run.output_dir)
    assert [leftovers(partition) for partition in outputs.iterdir()] == [[], []]


# ---------------------------------------------------------------------------
# Security hygiene (#7.6): user strings never go through a shell.
# ---------------------------------------------------------------------------
SHELL_PATTERNS = (
    r"shell\s*=\s*True",
    r"\bos\.system\(",
    r"\bos\.popen\(",
    r"subprocess\.getoutput\(",
    r"subprocess\.getstatusoutput\(",
    r"\bBashOperator\b",
)


def test_no_code_path_passes_strings_through_a_shell():
    sources = [p for folder in ("components", "pipelines", "schemas") for p in (REPO / folder).rglob("*.py")]
    assert len(sources) > 10
    offenders = [
        f"{path.relative_to(REPO)}: {pattern}"
        for path in sources
        for pattern in SHELL_PATTERNS
        if re.search(pattern, path.read_text())
    ]
    assert offenders == []


def test_hostile_dates_and_paths_stay_literal(tmp_path, capsys):
    """A date or template holding shell syntax is a bad value or a literal path, never a command."""
    canary = tmp_path / "pwned"
    code = nightly.run(
        [
            "--input-template",
            f"{tmp_path}/in/{{date}}/*; touch {canary}",
            "--output-template",
            f"{tmp_path}/out/{{date}}$(touch {canary})",
            "--date",
            "2024-05-01",
            "--no-report",
        ]
    )
    assert code == ExitCode.FAILED  # no input matches that literal glob
    assert "matches no files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nightly.run(
            ["--input-template", "x/{date}", "--output-template", "y/{date}", "--date", f"2024-05-01; touch {canary}"]
        )
    assert not canary.exists()
