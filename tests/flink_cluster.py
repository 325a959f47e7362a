"""A real Apache Flink session cluster on loopback for tests: one JobManager and N TaskManagers,
each its own JVM process, plus Beam's Flink job server, from what .ci/setup-flink cached.

The distribution is the jars of PyFlink's `apache-flink-libraries` (PyPI); processes are started
with `java -cp lib/*` and their entry classes, so no Flink shell script is needed. The cluster is
configured as a production batch cluster would be, scaled down: fixed-delay restarts
(RESTART_ATTEMPTS), region failover, default parallelism 2, and heartbeats short enough that a
killed TaskManager is noticed within seconds. Every process is stopped (terminate, then kill) on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.beam_services import free_port, wait_until_listening

CACHE = Path(os.environ.get("TRIPLETFLOW_FLINK_CACHE", Path.home() / ".cache" / "tripletflow" / "flink"))
FLINK_VERSION = os.environ.get("TRIPLETFLOW_FLINK_VERSION", "1.20.5")  # as in .ci/setup-flink
FLINK_MINOR = FLINK_VERSION.rsplit(".", 1)[0]  # Beam's --flink_version
FAILED_FILE = CACHE / "FAILED"  # .ci/setup-flink's reasons, when something could not be installed

PARALLELISM = 2
SLOTS_PER_TASKMANAGER = 2  # one TaskManager left alive still holds a whole parallelism-2 job
RESTART_ATTEMPTS = 3
RESTART_DELAY_S = 2
HEARTBEAT_INTERVAL_MS = 1_000
HEARTBEAT_TIMEOUT_MS = 8_000  # a killed TaskManager is declared lost after this
JOBMANAGER_MEMORY = "1024m"
TASKMANAGER_MEMORY = "1280m"  # Beam's Java operators only: the SDK workers are separate processes
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 15
POLL_S = 0.5

BASH_JAVA_UTILS_PREFIX = "BASH_JAVA_UTILS_EXEC_RESULT:"
JOBMANAGER_CLASS = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
TASKMANAGER_CLASS = "org.apache.flink.runtime.taskexecutor.TaskManagerRunner"
# The module openings Flink's own start scripts pass on Java 17 (its default env.java.opts.all).
JAVA17_OPENS = [
    f"--add-opens=java.base/{package}=ALL-UNNAMED"
    for package in (
        "java.lang",
        "java.lang.reflect",
        "java.io",
        "java.net",
        "java.nio",
        "java.text",
        "java.time",
        "java.util",
        "java.util.concurrent",
        "java.util.concurrent.atomic",
        "java.util.concurrent.locks",
        "sun.nio.ch",
    )
] + [f"--add-exports=java.base/{package}=ALL-UNNAMED" for package in ("sun.net.util", "sun.nio.ch")]
LOG4J_PROPERTIES = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FileAppender
appender.file.name = FileAppender
appender.file.type = File
appender.file.fileName = ${sys:log.file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{HH:mm:ss,SSS} %-5p %-40c{1} - %m%n
"""


class FlinkUnavailable(RuntimeError):
    """What the tests need is not installed (the reason from .ci/setup-flink, or what is missing)."""


@dataclasses.dataclass(frozen=True)
class Installation:
    flink_home: Path  # holds lib/
    job_server_jar: Path | None  # Beam's Flink job server for FLINK_MINOR and this Beam, if fetched

    @classmethod
    def find(cls) -> "Installation":
        """The cached installation; raises FlinkUnavailable (with set-up's reason) when Flink itself is missing."""
        home = CACHE / f"flink-{FLINK_VERSION}"
        if not (home / ".installed").exists():
            raise FlinkUnavailable(_setup_reason() or f"no Flink distribution in {home}: run .ci/setup-flink")
        jar = CACHE / f"beam-runners-flink-{FLINK_MINOR}-job-server-{importlib.metadata.version('apache-beam')}.jar"
        return cls(home, jar if jar.is_file() and jar.stat().st_size else None)

    def require_job_server(self) -> Path:
        if self.job_server_jar is None:
            raise FlinkUnavailable(_setup_reason() or "Beam's Flink job server jar is missing: run .ci/setup-flink")
        return self.job_server_jar


def _setup_reason() -> str:
    return " ".join(FAILED_FILE.read_text().split()) if FAILED_FILE.exists() else ""


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise FlinkUnavailable("no `java` on PATH (Flink needs Java 11 or 17)")
    return java


class FlinkCluster:
    """JobManager + TaskManagers as processes; `master` is the REST address Beam's --flink_master takes."""

    def __init__(self, installation: Installation, base_dir: Path, taskmanagers: int = 2):
        self.installation = installation
        self.base_dir = Path(base_dir)
        self.wanted_taskmanagers = taskmanagers
        self.rest_port = free_port()
        self.rpc_port = free_port()
        self.conf_dir = self.base_dir / "conf"
        self.log_dir = self.base_dir / "log"
        self.jobmanager: subprocess.Popen | None = None
        self.taskmanagers: dict[str, subprocess.Popen] = {}  # resource id (REST's "id") -> process

    @property
    def master(self) -> str:
        return f"localhost:{self.rest_port}"

    def _write_config(self) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "tmp").mkdir(exist_ok=True)
        config = {
            "jobmanager.rpc.address": "localhost",
            "jobmanager.rpc.port": self.rpc_port,
            "jobmanager.bind-host": "localhost",
            "rest.address": "localhost",
            "rest.bind-address": "localhost",
            "rest.port": self.rest_port,
            "taskmanager.host": "localhost",
            "taskmanager.bind-host": "localhost",
            "taskmanager.numberOfTaskSlots": SLOTS_PER_TASKMANAGER,
            "parallelism.default": PARALLELISM,
            "jobmanager.memory.process.size": JOBMANAGER_MEMORY,
            "taskmanager.memory.process.size": TASKMANAGER_MEMORY,
            "restart-strategy.type": "fixed-delay",
            "restart-strategy.fixed-delay.attempts": RESTART_ATTEMPTS,
            "restart-strategy.fixed-delay.delay": f"{RESTART_DELAY_S} s",
            "jobmanager.execution.failover-strategy": "region",
            "heartbeat.interval": HEARTBEAT_INTERVAL_MS,
            "heartbeat.timeout": HEARTBEAT_TIMEOUT_MS,
            "io.tmp.dirs": str(self.base_dir / "tmp"),
        }
        # config.yaml is standard YAML (Flink 1.19+); JSON is YAML, so json.dumps writes every value safely.
        (self.conf_dir / "config.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
        (self.conf_dir / "log4j.properties").write_text(LOG4J_PROPERTIES)

    def _resource_params(self, command: str) -> tuple[list[str], list[str]]:
        """(JVM flags, dynamic properties) for a process, derived from the config by Flink's BashJavaUtils,
        as Flink's start scripts do (a TaskManager refuses to start without its memory spec)."""
        home = self.installation.flink_home
        classpath = f"{home / 'bin' / 'bash-java-utils.jar'}{os.pathsep}{home / 'lib' / '*'}"
        done = subprocess.run(
            [
                _java(),
                "-cp",
                classpath,
                "org.apache.flink.runtime.util.bash.BashJavaUtils",
                command,
                "--configDir",
                str(self.conf_dir),
            ],
            capture_output=True,
            text=True,
        )
        results = [
            line.split(":", 1)[1].split()
            for line in done.stdout.splitlines()
            if line.startswith(BASH_JAVA_UTILS_PREFIX)
        ]
        if done.returncode != 0 or len(results) < 2:
            raise FlinkUnavailable(f"BashJavaUtils {command} failed: {(done.stdout + done.stderr)[-2000:]}")
        return results[-2], results[-1]

    def _spawn(self, main_class: str, name: str, resources: str, *properties: str) -> subprocess.Popen:
        jvm_flags, dynamic = self._resource_params(resources)
        log_file = self.log_dir / f"{name}.log"
        argv = [
            _java(),
            *jvm_flags,
            *JAVA17_OPENS,
            f"-Dlog.file={log_file}",
            f"-Dlog4j.configurationFile=file:{self.conf_dir / 'log4j.properties'}",
            "-cp",
            str(self.installation.flink_home / "lib" / "*"),
            main_class,
            "--configDir",
            str(self.conf_dir),
            *dynamic,
            *(arg for prop in properties for arg in ("-D", prop)),
        ]
        with open(self.log_dir / f"{name}.out", "wb") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def rest(self, path: str):
        with urllib.request.urlopen(f"http://{self.master}{path}", timeout=10) as response:
            return json.load(response)

    def registered_taskmanagers(self) -> list[dict]:
        return self.rest("/taskmanagers")["taskmanagers"]

    def start_taskmanager(self) -> subprocess.Popen:
        """One more TaskManager (also how a replacement joins, as a Kubernetes deployment would restart one)."""
        name = f"taskmanager-{len(self.taskmanagers) + 1}"
        process = self._spawn(TASKMANAGER_CLASS, name, "GET_TM_RESOURCE_PARAMS", f"taskmanager.resource-id={name}")
        self.taskmanagers[name] = process
        return process

    def wait_for_taskmanagers(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until exactly `count` TaskManagers are registered, each with all its slots: a TaskManager shows
        in REST as soon as it registers, and its slots only once its first slot report has arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                registered = self.registered_taskmanagers()
                if len(registered) == count and all(tm["slotsNumber"] == SLOTS_PER_TASKMANAGER for tm in registered):
                    return
            self._check_alive()
            if time.monotonic() > deadline:
                raise FlinkUnavailable(
                    f"{count} TaskManagers did not register with their slots within {timeout_s} s: {self.logs_tail()}"
                )
            time.sleep(POLL_S)

    def _check_alive(self) -> None:
        if self.jobmanager is not None and self.jobmanager.poll() is not None:
            raise FlinkUnavailable(f"the JobManager exited ({self.jobmanager.returncode}): {self.logs_tail()}")
        if self.taskmanagers and all(p.poll() is not None for p in self.taskmanagers.values()):
            raise FlinkUnavailable(f"every TaskManager exited: {self.logs_tail()}")

    def start(self) -> "FlinkCluster":
        self._write_config()
        self.jobmanager = self._spawn(JOBMANAGER_CLASS, "jobmanager", "GET_JM_RESOURCE_PARAMS")
        for _ in range(self.wanted_taskmanagers):
            self.start_taskmanager()
        self.wait_for_taskmanagers(self.wanted_taskmanagers)
        return self

    def kill_taskmanager(self, process: subprocess.Popen) -> None:
        """SIGKILL, as a lost machine or an OOM kill: no shutdown hook runs."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def busy_taskmanager(self) -> subprocess.Popen | None:
        """A live TaskManager process that holds at least one slot of a running job, if any."""
        busy = {tm["id"] for tm in self.registered_taskmanagers() if tm["freeSlots"] < tm["slotsNumber"]}
        return next((p for name, p in self.taskmanagers.items() if name in busy and p.poll() is None), None)

    def job(self, job_id: str) -> dict:
        return self.rest(f"/jobs/{job_id}")

    def jobs(self) -> list[dict]:
        return self.rest("/jobs/overview")["jobs"]

    def restarts(self, job_id: str) -> int:
        """How many times Flink restarted the job (failures recovered by its restart strategy)."""
        history = self.rest(f"/jobs/{job_id}/exceptions").get("exceptionHistory", {}).get("entries", [])
        return len(history)

    def logs_tail(self, lines: int = 15) -> str:
        tails = []
        for path in sorted(self.log_dir.glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(tails)[-6000:]

    def stop(self) -> None:
        for process in [*self.taskmanagers.values(), self.jobmanager]:
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.taskmanagers.values(), self.jobmanager]:
            if process is None:
                continue
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.contextmanager
def flink_cluster(base_dir: Path, taskmanagers: int = 2):
    """A started cluster, stopped on exit; raises FlinkUnavailable when it cannot run here."""
    cluster = FlinkCluster(Installation.find(), base_dir, taskmanagers)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@contextlib.contextmanager
def job_server(installation: Installation, master: str, base_dir: Path, log=subprocess.DEVNULL):
    """Beam's Flink job server as its own process (a production job server is a long-lived service);
    yields its job endpoint for `--runner=PortableRunner --job_endpoint=...`."""
    jar = installation.require_job_server()
    port = free_port()
    argv = [
        _java(),
        *JAVA17_OPENS,
        "-jar",
        str(jar),
        "--flink-master",
        master,
        "--job-port",
        str(port),
        "--artifact-port",
        "0",
        "--expansion-port",
        "0",
        "--artifacts-dir",
        str(Path(base_dir) / "artifacts"),
    ]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        problem = wait_until_listening(process, port, START_TIMEOUT_S, POLL_S)
        if problem:
            raise FlinkUnavailable(f"Beam's Flink job server {problem}")
        yield f"localhost:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
