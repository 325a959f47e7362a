"""A GCS API emulator on loopback for tests of gs:// paths through Beam's FileSystems.

Runs `gcp-storage-emulator` (pure Python, in-memory) as a subprocess on a free 127.0.0.1
port, creates one bucket, and points google-cloud-storage at it (STORAGE_EMULATOR_HOST).
Beam's GcsIO always asks google.auth for default credentials first and, when there are
none, retries with backoff for ~25 s per process before going anonymous; a fake
`authorized_user` file with a token that never expires makes that lookup succeed at once,
offline. Env vars are inherited, so Beam's subprocess workers get the same settings.

Not covered: tf.io.gfile (TensorFlow's C++ GCS client has https://www.googleapis.com
built in and honours no emulator variable).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from beam_services import stop_process  # tests/ is on sys.path: these helpers are imported by name

HOST = "127.0.0.1"
DEFAULT_BUCKET = "tripletflow-test"  # real GCS rules: 3-63 chars, lowercase
START_TIMEOUT_S = 20.0
POLL_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 3  # a free port found by bind(0) can be taken before the emulator binds it
PROJECT = "tripletflow-test"
# google-auth loads this without network; the far-future expiry keeps it from ever refreshing.
FAKE_CREDENTIALS = {
    "type": "authorized_user",
    "client_id": "emulator",
    "client_secret": "emulator",
    "refresh_token": "emulator",
    "token": "emulator",
    "expiry": "2999-01-01T00:00:00Z",
}


class EmulatorError(RuntimeError):
    """The emulator could not be started (package missing, process died, or not ready in time)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class GcsEmulator:
    """One emulator process with one bucket; `env` holds the variables set while it runs."""

    def __init__(self, bucket: str = DEFAULT_BUCKET):
        self.bucket = bucket
        self.url = ""
        self.env: dict[str, str] = {}
        self._process: subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] = {}
        self._tmpdir: str | None = None
        self.log_path = ""  # the emulator's request log (one line per HTTP request)

    @property
    def root(self) -> str:
        return f"gs://{self.bucket}"

    def start(self) -> "GcsEmulator":
        """Starts the emulator, creates the bucket and sets the env vars; raises EmulatorError."""
        try:
            import gcp_storage_emulator  # noqa: F401
        except ImportError as error:
            raise EmulatorError(f"gcp-storage-emulator is not installed ({error})") from error
        self._tmpdir = tempfile.mkdtemp(prefix="gcs-emulator-")
        last = ""
        for _ in range(PORT_ATTEMPTS):
            port = _free_port()
            log_path = os.path.join(self._tmpdir, f"emulator-{port}.log")
            with open(log_path, "wb") as log:
                self._process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "gcp_storage_emulator",
                        "start",
                        "--host",
                        HOST,
                        "--port",
                        str(port),
                        "--in-memory",
                        "--default-bucket",
                        self.bucket,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.url = f"http://{HOST}:{port}"
            self.log_path = log_path
            if self._wait_ready():
                self._set_env()
                return self
            self._kill()
            with open(log_path, "rb") as log:
                last = log.read().decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        self.stop()
        raise EmulatorError(f"gcp-storage-emulator did not start on {HOST}: {last[0]}")

    def _wait_ready(self) -> bool:
        """Polls the health check and the bucket until both answer, or the process dies."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}", timeout=1) as reply:
                    if reply.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(POLL_INTERVAL_S)
        return False

    def _set_env(self) -> None:
        credentials = os.path.join(self._tmpdir, "credentials.json")
        with open(credentials, "w") as handle:
            json.dump(FAKE_CREDENTIALS, handle)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "GOOGLE_APPLICATION_CREDENTIALS": credentials,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
        }
        for name, value in self.env.items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value

    def _kill(self) -> None:
        if self._process is not None:
            stop_process(self._process, STOP_TIMEOUT_S)
            self._process = None

    def stop(self) -> None:
        """Stops the process, restores the env vars it changed and removes its temp files."""
        self._kill()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
