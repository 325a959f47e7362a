"""The commit (issue #11; races and kills of issue #14): a run becomes the output only through its
MANIFEST.json, the newest-started run wins, and whatever a killed run left is never read and is
cleaned by the next commit. Real runs of the real pipeline over the shared sample input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from components.embedding_stats import commit, executor
from pipelines import embedding_stats
from pipelines.exit_codes import ExitCode
from schemas import contract
from tests import beam_services
from tests import embedding_stats_reference as ref
from tests.test_pipelines_local import assert_same_outputs, leftovers, stats_flags

KILL_SEED = 11
KILLS = 2  # runs killed with SIGKILL, each at a random moment of its life
RUN_TIMEOUT_S = 300


def cli_command(stats_run, output) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", *stats_flags(stats_run), "--output", str(output)]


def test_a_glob_reaching_into_the_output_is_refused_before_any_work(stats_run, tmp_path, capsys):
    inputs = tmp_path / "in"
    (inputs / "part").mkdir(parents=True)
    for source in stats_run.input.files:
        shutil.copy(source, inputs / "part")
    output = inputs / "out"
    shutil.copytree(stats_run.output_dir, output)  # a committed run inside the input folder
    before = (output / contract.MANIFEST_FILE).read_bytes()
    flags = [f for f in stats_flags(stats_run) if f not in ("--input", stats_run.input.pattern)]
    code = embedding_stats.run(["--input", str(inputs / "*" / "*"), "--output", str(output), *flags])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert "under --output" in err and "must not read its own outputs" in err and err.count("\n") == 1, err
    assert (output / contract.MANIFEST_FILE).read_bytes() == before


def _run_copy(stats_run, output, run_id: str) -> commit.RunInfo:
    """A finished but uncommitted run `run_id` in `output`: the shared run's files, copied."""
    source = ref.run_file(stats_run.output_dir, "")
    run = commit.RunInfo(str(output), run_id, stats_run.input.pattern, tuple(stats_run.input.files), {}, "t")
    shutil.copytree(source, run.run_dir)
    return run


def test_the_later_started_of_two_runs_wins_whichever_commits_first(stats_run, tmp_path):
    summary = ref.read_summary(stats_run.output_dir)
    for order in ("older first", "newer first"):
        output = tmp_path / order.replace(" ", "-")
        older = _run_copy(stats_run, output, "20240101T000000000000Z-aaaaaaaa")
        newer = _run_copy(stats_run, output, "20240101T000001000000Z-bbbbbbbb")
        if order == "older first":
            assert commit.commit(None, older, summary)["run_id"] == older.run_id
            commit.commit(None, newer, summary)  # replaces it, and deletes the older run's files
        else:
            commit.commit(None, newer, summary)  # deletes the older, still uncommitted run's files
            with pytest.raises(commit.CommitError, match="superseded"):
                commit.commit(None, older, summary)
        manifest = ref.manifest(output)
        assert manifest["run_id"] == newer.run_id, order
        assert os.listdir(output / contract.RUNS_DIR) == [newer.run_id], order
        assert_same_outputs(output, stats_run.output_dir)


def test_a_later_run_committing_between_the_check_and_the_write_still_wins(stats_run, tmp_path, monkeypatch):
    """The race the manifest's conditional write closes: older checks (nothing there), newer commits, older writes."""
    summary = ref.read_summary(stats_run.output_dir)
    output = tmp_path / "out"
    older = _run_copy(stats_run, output, "20240101T000000000000Z-aaaaaaaa")
    newer = _run_copy(stats_run, output, "20240101T000001000000Z-bbbbbbbb")
    build_manifest = commit.build_manifest

    def newer_commits_first(run, *args):
        if run is older and not (output / contract.MANIFEST_FILE).exists():
            commit.commit(None, newer, summary)  # lands after older's check and count, before its write
        return build_manifest(run, *args)

    monkeypatch.setattr(commit, "build_manifest", newer_commits_first)
    with pytest.raises(commit.CommitError, match="superseded"):
        commit.commit(None, older, summary)
    assert ref.manifest(output)["run_id"] == newer.run_id
    assert os.listdir(output / contract.RUNS_DIR) == [newer.run_id]
    assert_same_outputs(output, stats_run.output_dir)


def test_a_run_replaced_after_it_committed_reports_it_superseded(stats_run, tmp_path, monkeypatch, capsys):
    """The launcher's last check: its job committed, then a later-started run committed before the launcher
    read the manifest. It says the run was superseded (exit 1), and the output is the later run's, whole."""
    output = tmp_path / "out"
    summary = ref.read_summary(stats_run.output_dir)
    later = "29991231T000000000000Z-ffffffff"  # run ids order by start time: later than this test's run
    read_manifest = executor.read_manifest

    def later_run_commits_first(output_dir):
        commit.commit(None, _run_copy(stats_run, output, later), summary)
        return read_manifest(output_dir)

    monkeypatch.setattr(executor, "read_manifest", later_run_commits_first)
    code = embedding_stats.run([*stats_flags(stats_run), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == ExitCode.FAILED and f"superseded by run {later}" in err and "published, then replaced" in err, err
    assert ref.manifest(output)["run_id"] == later
    assert os.listdir(output / contract.RUNS_DIR) == [later]
    assert_same_outputs(output, stats_run.output_dir)


def test_a_run_whose_tables_disagree_with_its_summary_does_not_commit(stats_run, tmp_path):
    output = tmp_path / "out"
    run = _run_copy(stats_run, output, "20240101T000000000000Z-cccccccc")
    summary = {**ref.read_summary(stats_run.output_dir)}
    summary["valid_boxes"] += 1  # a box lost between the statistics and the table
    with pytest.raises(commit.CommitError, match="vectors holds"):
        commit.commit(None, run, summary)
    assert not (output / contract.MANIFEST_FILE).exists()


def test_two_runs_into_one_output_at_once_leave_one_complete_run(stats_run, tmp_path):
    output = tmp_path / "out"
    runs = [
        subprocess.Popen(
            cli_command(stats_run, output),
            env=beam_services.venv_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [(process.wait(timeout=RUN_TIMEOUT_S), *process.communicate()) for process in runs]
    # Each run committed, or (the earlier-started one) was superseded before it could: never half.
    for code, _, err in results:
        assert code == ExitCode.OK or (code == ExitCode.FAILED and "superseded" in err), err
    assert any(code == ExitCode.OK for code, _, _ in results)
    assert_same_outputs(output, stats_run.output_dir)
    assert leftovers(output) == []


def test_a_run_killed_at_a_random_moment_leaves_a_readable_output_and_the_next_run_cleans_up(stats_run, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(stats_run.output_dir, output)  # the previous, committed run
    committed = [ref.manifest(output)["run_id"]]
    started = time.monotonic()
    done = subprocess.run(
        cli_command(stats_run, tmp_path / "timing"),
        env=beam_services.venv_env(),
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lifetime = time.monotonic() - started
    rng = np.random.default_rng(KILL_SEED)
    for delay in rng.uniform(0.1 * lifetime, 0.95 * lifetime, size=KILLS):
        process = subprocess.Popen(
            cli_command(stats_run, output),
            env=beam_services.venv_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and any worker it started
        process.wait()
        # Whenever it died, the output is a committed run, whole and exact (the old one or, had
        # the kill come after the commit, the new one); what the killed run left is not read.
        manifest = ref.manifest(output)
        assert manifest["run_id"] in committed or manifest["run_id"] > committed[-1], delay
        committed.append(manifest["run_id"])
        assert_same_outputs(output, stats_run.output_dir)
    assert (
        subprocess.run(
            cli_command(stats_run, output), env=beam_services.venv_env(), capture_output=True, timeout=RUN_TIMEOUT_S
        ).returncode
        == 0
    )
    assert_same_outputs(output, stats_run.output_dir)
    assert leftovers(output) == []  # the killed runs' files are gone
    assert json.loads((output / contract.MANIFEST_FILE).read_text())["run_id"] > committed[-1]
