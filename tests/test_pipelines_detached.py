"""A detached launch (issue #11): the launcher submits to a separately started Beam job service and
exits; the job commits its output itself, or, when a worker dies before the commit stage, fails
and leaves the previous output as it was.

Job service and worker pool are Beam's own, each its own process on loopback (tests/beam_services.py);
the launcher is `tripletflow run --no-wait` in a subprocess, as a user or a scheduler runs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pytest

from components.embedding_stats.commit import read_manifest
from tests import beam_services
from tests.test_pipelines_local import KILLED_WORKER_THREADS, assert_same_outputs, leftovers, stats_flags

LAUNCH_TIMEOUT_S = 300
JOB_TIMEOUT_S = 300
POLL_S = 1
TERMINAL_STATES = {"DONE", "FAILED", "CANCELLED", "DRAINED", "UPDATED"}
SUBMITTED = re.compile(r"submitted job (\S+) \(run (\S+)\)")


@pytest.fixture(scope="module")
def job_service():
    with beam_services.job_service() as address:
        yield address


def launch_detached(stats_run, output, job_endpoint, pool) -> tuple[str, str]:
    """`tripletflow run --no-wait` against the job service; returns (job id, run id) once the launcher exited."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "run",
            *stats_flags(stats_run),
            "--output",
            str(output),
            "--runner=PortableRunner",
            f"--job_endpoint={job_endpoint}",
            "--environment_type=EXTERNAL",
            f"--environment_config={pool}",
            "--no-wait",
        ],
        env=beam_services.venv_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = SUBMITTED.search(done.stdout)
    assert found, done.stdout
    return found.group(1), found.group(2)


def wait_for_end(job_endpoint: str, job_id: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (state := beam_services.job_state(job_endpoint, job_id)) not in TERMINAL_STATES:
        assert time.monotonic() < deadline, f"job {job_id} still {state} after {JOB_TIMEOUT_S} s"
        time.sleep(POLL_S)
    return state


def previous_output(stats_run, output):
    """A committed earlier run in `output` (a copy of the shared run: manifest paths are relative)."""
    shutil.copytree(stats_run.output_dir, output)
    return read_manifest(output)


def test_a_detached_launch_ends_with_a_complete_committed_output(stats_run, job_service, tmp_path):
    output = tmp_path / "out"
    before = previous_output(stats_run, output)
    with beam_services.worker_pool() as pool:
        job_id, run_id = launch_detached(stats_run, output, job_service, pool)
        # The launcher is gone; the job goes on, and its last stage commits.
        assert wait_for_end(job_service, job_id) == "DONE"
    manifest = read_manifest(output)
    assert manifest["run_id"] == run_id != before["run_id"]
    assert_same_outputs(output, stats_run.output_dir)
    assert leftovers(output) == []  # the replaced run was deleted by the commit


@KILLED_WORKER_THREADS
def test_a_worker_killed_before_the_commit_leaves_the_previous_output(stats_run, job_service, tmp_path):
    output = tmp_path / "out"
    marker = tmp_path / "killed"
    before = previous_output(stats_run, output)
    manifest_bytes = (output / "MANIFEST.json").read_bytes()
    with beam_services.worker_pool(beam_services.kill_worker_once_env(marker)) as pool:
        job_id, run_id = launch_detached(stats_run, output, job_service, pool)
        assert wait_for_end(job_service, job_id) == "FAILED"
    assert marker.exists(), "the fault switch did not fire: no worker was killed"
    assert (output / "MANIFEST.json").read_bytes() == manifest_bytes  # no new manifest: nothing published
    assert read_manifest(output)["run_id"] == before["run_id"] != run_id
    assert_same_outputs(output, stats_run.output_dir)  # the previous run is whole and readable
