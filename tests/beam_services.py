"""Beam's own services as separate processes on loopback, for tests: a worker pool and a job service.

Both run from this venv; the worker pool starts its SDK workers with the `python` on PATH,
so PATH is set to this venv first. Each is stopped (terminate, then kill) on exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from faults.sitecustomize import KILL_WORKER_ONCE_ENV  # tests/ is on sys.path (see gcs_emulator.py)

FAULTS_DIR = Path(__file__).parent / "faults"  # sitecustomize.py: test-only fault injection into workers
START_TIMEOUT_S = 60
POLL_S = 0.2
STOP_TIMEOUT_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def venv_env(extra: dict | None = None) -> dict:
    """This process's environment, this venv's bin first on PATH, plus `extra`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **(extra or {})}


def kill_worker_once_env(marker) -> dict:
    """Environment under which the first Beam worker to compute pair statistics dies (tests/faults/)."""
    python_path = os.pathsep.join(filter(None, [str(FAULTS_DIR), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": python_path, KILL_WORKER_ONCE_ENV: str(marker)}


def wait_until_listening(process: subprocess.Popen, port: int, timeout_s: float, poll_s: float = POLL_S) -> str | None:
    """None once `process` accepts connections on localhost:`port`; else why not (exited, or too slow)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            return None
        except OSError:
            if process.poll() is not None:
                return f"exited at start-up ({process.returncode})"
            if time.monotonic() > deadline:
                return f"did not listen within {timeout_s} s"
            time.sleep(poll_s)


def stop_process(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Terminates `process`, then kills it if it has not exited after `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def _service(argv: list[str], port: int, env: dict, log):
    process = subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        problem = wait_until_listening(process, port, START_TIMEOUT_S)
        assert problem is None, f"{argv[0]} {problem}"
        yield f"localhost:{port}"
    finally:
        stop_process(process)


@contextlib.contextmanager
def worker_pool(extra_env: dict | None = None, log=subprocess.DEVNULL):
    """Yields the address of a Beam SDK worker pool (for --environment_type=EXTERNAL)."""
    port = free_port()
    with _service(
        ["apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"], port, venv_env(extra_env), log
    ) as address:
        yield address


@contextlib.contextmanager
def job_service(log=subprocess.DEVNULL):
    """Yields the address of Beam's local job service (for PortableRunner --job_endpoint)."""
    port = free_port()
    with _service(
        ["apache_beam.runners.portability.local_job_service_main", f"--port={port}"], port, venv_env(), log
    ) as address:
        yield address


def job_state(endpoint: str, job_id: str) -> str:
    """The job's state name (e.g. RUNNING, DONE, FAILED), asked of the job service."""
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        response = beam_job_api_pb2_grpc.JobServiceStub(channel).GetState(
            beam_job_api_pb2.GetJobStateRequest(job_id=job_id), timeout=30
        )
    return beam_job_api_pb2.JobState.Enum.Name(response.state)
