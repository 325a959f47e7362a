"""EmbeddingStats on a real Apache Flink cluster (issue #12): one JobManager and two TaskManagers,
each its own process on loopback (tests/flink_cluster.py), SDK workers from this venv (an EXTERNAL
worker pool), parallelism 2, fixed-delay restarts.

The reference is the shared `stats_run` (the default local runner): every Flink run must give the
same Parquet tables, row for row. Faults: an SDK worker killed mid-bundle (the test-only fault
switch) and a TaskManager process killed mid-job are recovered by Flink's restart strategy, and
the output is complete, exact and committed once; with every attempt failing, the job fails and
publishes nothing. A detached launch exits after submission and the job commits itself.

Needs what .ci/setup-flink caches: a Flink distribution (PyPI) and Beam's Flink job server (Maven);
each test skips with set-up's reason (the Maven command and its answer) where one is missing.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from components.embedding_stats.commit import read_manifest
from pipelines import embedding_stats
from schemas import contract
from tests import beam_services, flink_cluster
from tests.test_pipelines_detached import launch_detached, wait_for_end
from tests.test_pipelines_local import KILLED_WORKER_THREADS, assert_same_outputs, leftovers, stats_flags

TASKMANAGERS = 2
KILL_TIMEOUT_S = 240  # how long a job may take to occupy a TaskManager's slot
MARKER_POLL_S = 0.05  # how often the exhausting test re-arms the fault switch


def _job_server_missing() -> str:
    """Why Beam's Flink job server cannot be used here ('' when it can), decided before any fixture runs."""
    try:
        flink_cluster.Installation.find().require_job_server()
    except flink_cluster.FlinkUnavailable as error:
        return str(error)
    return ""


JOB_SERVER_MISSING = _job_server_missing()
NEEDS_JOB_SERVER = pytest.mark.skipif(
    bool(JOB_SERVER_MISSING), reason=f"Beam's Flink job server unavailable: {JOB_SERVER_MISSING}"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with flink_cluster.flink_cluster(tmp_path_factory.mktemp("flink"), TASKMANAGERS) as started:
            yield started
    except flink_cluster.FlinkUnavailable as error:
        pytest.skip(f"Flink unavailable: {error}")


@pytest.fixture(scope="module")
def job_server_jar(cluster):
    return cluster.installation.require_job_server()


@pytest.fixture(scope="module")
def job_server(cluster, job_server_jar, tmp_path_factory):
    """Beam's Flink job server as a separate, long-lived process (for detached launches)."""
    with flink_cluster.job_server(
        cluster.installation, cluster.master, tmp_path_factory.mktemp("job_server")
    ) as address:
        yield address


def flink_flags(cluster, jar, pool) -> list[str]:
    return [
        "--runner=FlinkRunner",
        f"--flink_master={cluster.master}",
        f"--flink_version={flink_cluster.FLINK_MINOR}",
        f"--flink_job_server_jar={jar}",
        f"--parallelism={flink_cluster.PARALLELISM}",
        "--environment_type=EXTERNAL",
        f"--environment_config={pool}",
    ]


def last_job(cluster) -> dict:
    """The most recently started Flink job (REST's overview entry)."""
    return max(cluster.jobs(), key=lambda job: job["start-time"])


def previous_output(stats_run, output):
    """A committed earlier run in `output`; returns its manifest's bytes."""
    shutil.copytree(stats_run.output_dir, output)
    return (output / contract.MANIFEST_FILE).read_bytes()


def test_the_cluster_is_a_jobmanager_and_two_taskmanager_processes_with_fixed_delay_restarts(cluster):
    registered = cluster.registered_taskmanagers()
    assert sorted(tm["id"] for tm in registered) == sorted(cluster.taskmanagers)
    pids = {cluster.jobmanager.pid, *(p.pid for p in cluster.taskmanagers.values())}
    assert len(pids) == 1 + TASKMANAGERS and all(p.poll() is None for p in cluster.taskmanagers.values())
    assert sum(tm["slotsNumber"] for tm in registered) == TASKMANAGERS * flink_cluster.SLOTS_PER_TASKMANAGER
    config = {entry["key"]: entry["value"] for entry in cluster.rest("/jobmanager/config")}
    assert config["restart-strategy.type"] == "fixed-delay"
    assert int(config["restart-strategy.fixed-delay.attempts"]) == flink_cluster.RESTART_ATTEMPTS
    assert int(config["parallelism.default"]) == flink_cluster.PARALLELISM


@NEEDS_JOB_SERVER
def test_flink_gives_the_local_runners_tables(stats_run, cluster, job_server_jar, tmp_path):
    output = tmp_path / "out"
    with beam_services.worker_pool() as pool:
        code = embedding_stats.run(
            [*stats_flags(stats_run), "--output", str(output), *flink_flags(cluster, job_server_jar, pool)]
        )
    assert code == 0
    assert last_job(cluster)["state"] == "FINISHED"
    assert_same_outputs(output, stats_run.output_dir)
    assert leftovers(output) == []


@NEEDS_JOB_SERVER
@KILLED_WORKER_THREADS
def test_an_sdk_worker_killed_mid_bundle_is_recovered_by_a_restart(stats_run, cluster, job_server_jar, tmp_path):
    output, marker = tmp_path / "out", tmp_path / "killed"
    with beam_services.worker_pool(beam_services.kill_worker_once_env(marker)) as pool:
        code = embedding_stats.run(
            [*stats_flags(stats_run), "--output", str(output), *flink_flags(cluster, job_server_jar, pool)]
        )
    assert marker.exists(), "the fault switch did not fire: no worker was killed"
    job = last_job(cluster)
    assert code == 0 and job["state"] == "FINISHED"
    assert cluster.restarts(job["jid"]) >= 1  # Flink restarted the failed tasks; the job did not start over by hand
    assert_same_outputs(output, stats_run.output_dir)  # complete and exact, no row written twice
    assert leftovers(output) == []  # one run directory: committed once


@NEEDS_JOB_SERVER
def test_a_taskmanager_killed_mid_job_is_recovered(stats_run, cluster, job_server, tmp_path):
    output = tmp_path / "out"
    with beam_services.worker_pool() as pool:
        job_id, run_id = launch_detached(stats_run, output, job_server, pool)
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while (victim := cluster.busy_taskmanager()) is None:
            assert time.monotonic() < deadline, "the job never occupied a TaskManager"
            assert not (output / contract.MANIFEST_FILE).exists(), "the job ended before a TaskManager could be killed"
            time.sleep(flink_cluster.POLL_S)
        cluster.kill_taskmanager(victim)
        cluster.start_taskmanager()  # the replacement a Kubernetes deployment or systemd would start
        assert wait_for_end(job_server, job_id) == "DONE"
    cluster.wait_for_taskmanagers(TASKMANAGERS)
    assert cluster.restarts(last_job(cluster)["jid"]) >= 1
    assert read_manifest(output)["run_id"] == run_id
    assert_same_outputs(output, stats_run.output_dir)
    assert leftovers(output) == []


@NEEDS_JOB_SERVER
@KILLED_WORKER_THREADS
def test_restarts_exhausted_fail_the_job_and_publish_nothing(stats_run, cluster, job_server, tmp_path):
    output, marker = tmp_path / "out", tmp_path / "killed"
    before = previous_output(stats_run, output)
    kills, stop = [], threading.Event()

    def rearm():  # each kill leaves the marker; removing it makes every attempt's first worker die
        while not stop.is_set():
            if marker.exists():
                marker.unlink()
                kills.append(time.monotonic())
            time.sleep(MARKER_POLL_S)

    rearmer = threading.Thread(target=rearm, daemon=True)
    with beam_services.worker_pool(beam_services.kill_worker_once_env(marker)) as pool:
        rearmer.start()
        try:
            job_id, run_id = launch_detached(stats_run, output, job_server, pool)
            assert wait_for_end(job_server, job_id) == "FAILED"
        finally:
            stop.set()
            rearmer.join()
    assert len(kills) > flink_cluster.RESTART_ATTEMPTS  # the first try and every restart failed
    assert (output / contract.MANIFEST_FILE).read_bytes() == before  # nothing published
    assert read_manifest(output)["run_id"] != run_id
    assert_same_outputs(output, stats_run.output_dir)  # the previous run is whole and readable


@NEEDS_JOB_SERVER
def test_a_detached_launch_exits_and_the_job_commits_itself(stats_run, cluster, job_server, tmp_path):
    output = tmp_path / "out"
    with beam_services.worker_pool() as pool:
        job_id, run_id = launch_detached(stats_run, output, job_server, pool)  # returns once the launcher exited
        deadline = time.monotonic() + flink_cluster.START_TIMEOUT_S * 3
        while not (output / contract.MANIFEST_FILE).exists():  # what a scheduler's sensor waits for
            assert time.monotonic() < deadline, f"no manifest; job {beam_services.job_state(job_server, job_id)}"
            time.sleep(flink_cluster.POLL_S)
        assert wait_for_end(job_server, job_id) == "DONE"
    assert read_manifest(output)["run_id"] == run_id
    assert_same_outputs(output, stats_run.output_dir)
    assert leftovers(output) == []
