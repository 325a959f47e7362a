"""Local runner modes, determinism and worker faults (issues #5.1, #7.2, #7.4).

The reference is the shared `stats_run` (the default local runner). The same input and
flags on the multi-process runner (2 worker processes) and on the portable runner with a
worker pool (separate SDK worker processes over gRPC) must give the same Parquet tables,
row for row, row order aside. A worker killed mid-bundle by the test-only fault switch
fails that run without publishing anything; nightly's whole-run retry then completes it
with the exact same outputs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.embedding_stats.commit import read_manifest
from pipelines import embedding_stats, nightly
from pipelines.exit_codes import ExitCode
from schemas import contract
from tests import beam_services
from tests import embedding_stats_reference as ref

WORKERS = 2
MULTI_PROCESS_FLAGS = ("--direct_running_mode=multi_processing", f"--direct_num_workers={WORKERS}")
# How each table's rows are identified (row order is not part of the output).
ROW_KEYS = {
    "vectors": ("example_id", "level", "row", "col", "anchor"),
    "examples": ("example_id",),
    "dead_letter": ("source_file", "example_id", "reason", "detail"),
}


def read_rows(output_dir, table: str) -> list[dict]:
    """A table's rows as dicts, sorted by its key; checks the schema against the contract.

    Dead letters name their source file: only its base name is kept, so that runs over
    copies of the same files in another folder compare equal.
    """
    data = ref.read_table(output_dir, table)
    assert data.schema.remove_metadata().equals(contract.TABLE_SCHEMAS[table]), table
    rows = data.to_pylist()
    for row in rows:
        if "source_file" in row:
            row["source_file"] = os.path.basename(row["source_file"])
    keys = ROW_KEYS[table]
    return sorted(rows, key=lambda row: tuple("" if row[k] is None else row[k] for k in keys))


def _differences(got: dict, want: dict) -> str:
    return ", ".join(f"{k}: {str(got[k])[:80]} != {str(want[k])[:80]}" for k in want if got.get(k) != want[k])


def assert_same_outputs(actual_dir, expected_dir) -> None:
    """Same Parquet rows (exactly, floats included) in every table, and the same counts."""
    for table in contract.TABLE_SCHEMAS:
        actual, expected = read_rows(actual_dir, table), read_rows(expected_dir, table)
        assert len(actual) == len(expected), f"{table}: {len(actual)} rows, expected {len(expected)}"
        for got, want in zip(actual, expected):
            assert got == want, f"{table}: row {[want[k] for k in ROW_KEYS[table]]} differs: {_differences(got, want)}"
    assert read_manifest(actual_dir)["counts"] == read_manifest(expected_dir)["counts"]


def stats_flags(stats_run) -> list[str]:
    """The flags of the shared reference run, less its runner."""
    grid = stats_run.grid
    return [
        "--input",
        stats_run.input.pattern,
        "--grid",
        ",".join(map(str, grid.grid_shape)),
        "--dim",
        str(grid.dim),
        "--no-report",
    ]


def leftovers(output_dir) -> list[str]:
    """What a run may leave in its output beside the committed run (there must be nothing)."""
    output_dir = Path(output_dir)
    if not output_dir.exists():
        return []
    runs = output_dir / contract.RUNS_DIR
    published = (contract.RUNS_DIR, contract.MANIFEST_FILE, contract.REPORT_FILE, contract.ALERTS_FILE)
    found = [p.name for p in output_dir.iterdir() if p.name not in published]
    committed = read_manifest(output_dir)["run_id"] if (output_dir / contract.MANIFEST_FILE).exists() else None
    found += [f"{contract.RUNS_DIR}/{p.name}" for p in runs.iterdir() if p.name != committed] if runs.exists() else []
    return sorted(found)


@pytest.fixture(scope="module")
def worker_pool():
    """Beam's worker pool on a free port, started from this venv (its workers run `python` from PATH)."""
    with beam_services.worker_pool() as address:
        yield address


def test_multi_process_runner_gives_the_default_runners_tables(stats_run, tmp_path):
    output = tmp_path / "multi"
    assert embedding_stats.run([*stats_flags(stats_run), "--output", str(output), *MULTI_PROCESS_FLAGS]) == 0
    assert_same_outputs(output, stats_run.output_dir)


def test_portable_runner_with_a_worker_pool_gives_the_default_runners_tables(stats_run, worker_pool, tmp_path):
    output = tmp_path / "portable"
    flags = [
        "--runner=PortableRunner",
        "--job_endpoint=embed",
        "--environment_type=EXTERNAL",
        f"--environment_config={worker_pool}",
    ]
    assert embedding_stats.run([*stats_flags(stats_run), "--output", str(output), *flags]) == 0
    assert_same_outputs(output, stats_run.output_dir)


# The killed worker's gRPC threads die with it, as they must; pytest would report each one.
KILLED_WORKER_THREADS = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


@KILLED_WORKER_THREADS
def test_a_killed_worker_fails_the_run_without_publishing_and_a_rerun_succeeds(stats_run, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    for name, value in beam_services.kill_worker_once_env(marker).items():
        monkeypatch.setenv(name, value)
    output = tmp_path / "out"
    code = embedding_stats.run([*stats_flags(stats_run), "--output", str(output), *MULTI_PROCESS_FLAGS])
    assert marker.exists(), "the fault switch did not fire: no worker was killed"
    assert code == ExitCode.FAILED
    assert not output.exists()  # nothing published: no manifest, no partial table
    # The marker stays: the switch fires once, so the same command now runs clean.
    assert embedding_stats.run([*stats_flags(stats_run), "--output", str(output)]) == 0
    assert_same_outputs(output, stats_run.output_dir)
    assert leftovers(output) == []


@KILLED_WORKER_THREADS
def test_nightly_retries_a_run_whose_worker_died_and_publishes_exact_outputs(stats_run, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "killed"
    for name, value in beam_services.kill_worker_once_env(marker).items():
        monkeypatch.setenv(name, value)
    partition = tmp_path / "in" / "date=2024-05-01"  # the shared sample as one date's partition
    partition.mkdir(parents=True)
    for source in stats_run.input.files:
        shutil.copy(source, partition)
    flags = [f for f in stats_flags(stats_run) if f not in ("--input", stats_run.input.pattern)]
    code = nightly.run(
        [
            "--input-template",
            str(tmp_path / "in" / "date={date}" / "*"),
            "--output-template",
            str(tmp_path / "out" / "date={date}"),
            "--date",
            "2024-05-01",
            "--attempts",
            "2",
            *flags,
            *MULTI_PROCESS_FLAGS,
        ]
    )
    out = capsys.readouterr().out
    assert marker.exists(), "the fault switch did not fire: no worker was killed"
    assert code == 0
    assert "2024-05-01 attempt 2/2" in out  # the first attempt failed and was retried whole
    assert_same_outputs(tmp_path / "out" / "date=2024-05-01", stats_run.output_dir)
    assert leftovers(tmp_path / "out" / "date=2024-05-01") == []


def test_the_cli_caps_malloc_arenas_for_itself_and_its_workers(monkeypatch):
    from pipelines import cli

    monkeypatch.setenv("MALLOC_ARENA_MAX", "")  # recorded, so the teardown restores the real environment
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    cli.bound_malloc_arenas()
    assert os.environ["MALLOC_ARENA_MAX"] == str(max(2, os.cpu_count()))  # inherited by worker processes
    monkeypatch.setenv("MALLOC_ARENA_MAX", "7")
    cli.bound_malloc_arenas()
    assert os.environ["MALLOC_ARENA_MAX"] == "7"  # the user's setting wins


def test_the_cli_gives_tensorflow_its_bfc_cpu_allocator_unless_the_user_chose(monkeypatch):
    from pipelines import cli

    monkeypatch.setenv(cli.BFC_ALLOCATOR_ENV, "")  # recorded, so the teardown restores the real environment
    monkeypatch.delenv(cli.BFC_ALLOCATOR_ENV)
    # TensorFlow reports allocator statistics for CPU:0 only from a BFC allocator: the setting took effect.
    probe = (
        "from pipelines import cli; cli.use_bfc_cpu_allocator(); import tensorflow as tf; tf.ones([256, 256]); "
        "print(tf.config.experimental.get_memory_info('CPU:0')['peak'] >= 256 * 256 * 4)"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0 and done.stdout.split()[-1] == "True", done.stderr[-2000:]
    monkeypatch.setenv(cli.BFC_ALLOCATOR_ENV, "false")
    cli.use_bfc_cpu_allocator()
    assert os.environ[cli.BFC_ALLOCATOR_ENV] == "false"  # the user's setting wins
