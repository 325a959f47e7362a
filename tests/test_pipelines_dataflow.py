"""Dataflow without the cloud: the real Dataflow job built offline (`--dry_run`), and the Flex Template files.

The job is built by DataflowRunner itself from the runner-agnostic `create_pipeline`; the
test checks its steps, its worker environment, and the package staged for the workers
(the sdist that `--setup_file pyproject.toml` builds), opened and listed. Google auth is
pointed nowhere so that no credentials lookup can hang.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.portability.api import beam_runner_api_pb2

from components import sample_data
from components.embedding_stats.executor import execute
from components.embedding_stats.options import EmbeddingStatsOptions, validate_options
from pipelines import cli, embedding_stats
from pipelines.exit_codes import ExitCode
from schemas import contract

REPO = Path(__file__).resolve().parents[1]
DATAFLOW_DIR = REPO / "pipelines" / "dataflow"
GRID, DIM = "1,3,3,4", 8
PROJECT, REGION, TEMP = "tripletflow-test", "europe-west4", "gs://tf-test-bucket/tmp"
STAGED_PACKAGE = "workflow.tar.gz"  # the name Dataflow gives the --setup_file package
CUSTOM_IMAGE = "europe-docker.pkg.dev/tripletflow-test/images/tripletflow:1"
# Top-level steps of EmbeddingStats (components/embedding_stats/executor.build_pipeline).
EXPECTED_STEPS = {
    "ReadRecords",
    "ValidateRecords",
    "AnalyzeNorms",
    "WriteTransformGraph",
    "PairStatistics",
    "Summarize",
    "WriteOutputs",
    "CommitRun",
}
EXPECTED_SINKS = {"WriteOutputs/WriteVectors", "WriteOutputs/WriteExamples", "WriteOutputs/WriteDeadLetter"}
NO_AUTH_ENV = {
    "GOOGLE_APPLICATION_CREDENTIALS": None,  # no key file
    "NO_GCE_CHECK": "True",  # google-auth: do not probe the GCE metadata server
    "GCE_METADATA_HOST": "127.0.0.1:9",  # and if something does, it is refused at once
    "GCE_METADATA_IP": "127.0.0.1:9",
}


@pytest.fixture
def offline_gcp(monkeypatch):
    for name, value in NO_AUTH_ENV.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def input_glob(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataflow_in")
    sample_data.generate(
        str(root), sample_data.SampleOptions(examples=4, shards=1, grid=contract.GridSpec.parse(GRID, DIM))
    )
    return str(root / "*")


def _dry_run_job(input_glob, output, *extra):
    options = EmbeddingStatsOptions(
        [
            "--runner=DataflowRunner",
            "--dry_run=True",
            f"--project={PROJECT}",
            f"--region={REGION}",
            f"--temp_location={TEMP}",
            f"--input={input_glob}",
            f"--output={output}",
            f"--grid={GRID}",
            f"--dim={DIM}",
            *extra,
        ]
    )
    result = execute(options)
    assert result.dry_run and result.pipeline_result.state == beam.runners.runner.PipelineState.DONE
    return result.pipeline_result.job


def _dependencies(job) -> dict:
    """{staged name: local path} of the files the job would stage for its workers."""
    staged = {}
    for env in job.proto_pipeline.components.environments.values():
        for artifact in env.dependencies:
            path = beam_runner_api_pb2.ArtifactFilePayload.FromString(artifact.type_payload).path
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload).staged_name
            staged[name] = path
    return staged


def _images(job) -> set:
    return {
        beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
        for env in job.proto_pipeline.components.environments.values()
    }


def test_dry_run_builds_the_dataflow_job_with_the_project_package_staged(offline_gcp, input_glob, tmp_path):
    """The README's command as written (no --setup_file): the project's sdist is staged by default."""
    job = _dry_run_job(input_glob, str(tmp_path / "out"))
    names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert EXPECTED_STEPS <= names and EXPECTED_SINKS <= names
    assert "WriteTransformGraph/WriteTransformFn" in names  # tf.Transform's graph is written by the job itself
    assert "CommitRun/Commit" in names  # and the job commits its own output
    assert job.proto.type_.name == "JOB_TYPE_BATCH"
    cloud = job.options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region) == (PROJECT, REGION)
    assert cloud.temp_location.startswith(TEMP + "/")  # the runner gives each job its own temp folder
    # Workers run Beam's SDK image of our exact Beam and Python versions.
    python_tag = f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert any(f"beam_{python_tag}_sdk:{beam.__version__}" in image for image in _images(job)), _images(job)
    # The staged package is the sdist of pyproject.toml holding the three packages.
    staged = _dependencies(job)
    assert STAGED_PACKAGE in staged, staged
    with tarfile.open(staged[STAGED_PACKAGE]) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for required in (
        "pyproject.toml",
        "components/embedding_stats/executor.py",
        "components/triplet_loss.py",
        "pipelines/embedding_stats.py",
        "pipelines/nightly.py",
        "schemas/contract.py",
        "schemas/input_schema.pbtxt",
    ):
        assert required in members, f"{required} missing from the staged sdist"


def test_dry_run_with_a_custom_container_stages_no_package(offline_gcp, input_glob, tmp_path):
    """The Flex Template way: workers run our image (tripletflow installed), nothing to stage."""
    job = _dry_run_job(input_glob, str(tmp_path / "out"), f"--sdk_container_image={CUSTOM_IMAGE}")
    assert _images(job) == {CUSTOM_IMAGE}
    assert STAGED_PACKAGE not in _dependencies(job)


def test_cli_dry_run_exits_cleanly_without_cloud_access(input_glob, tmp_path):
    """`tripletflow run --runner DataflowRunner ... --dry_run=True` as a user types it: exit 0, nothing published."""
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update({k: v for k, v in NO_AUTH_ENV.items() if v is not None})
    output = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "run",
            "--runner",
            "DataflowRunner",
            "--project",
            PROJECT,
            "--region",
            REGION,
            "--temp_location",
            TEMP,
            "--input",
            input_glob,
            "--output",
            str(output),
            "--grid",
            GRID,
            "--dim",
            str(DIM),
            "--dry_run=True",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not output.exists()  # a dry run runs nothing and publishes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary sibling left behind


# Run before the CLI in the child process: every socket connection to a non-loopback address and
# every name lookup other than localhost is refused and recorded, so "offline" is checked, not assumed.
NETWORK_GUARD = """
import json, os, socket, sys
attempts = []
LOOPBACK = ("127.0.0.1", "::1", "localhost")
def record(what):
    attempts.append(what)
    with open(os.environ["NETWORK_ATTEMPTS"], "w") as f:
        json.dump(attempts, f)
    raise OSError(f"network access refused by the test: {what}")
real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
        record(f"connect {address}")
    return real_connect(self, address)
def getaddrinfo(host, *args, **kwargs):
    if host not in LOOPBACK and host is not None:
        record(f"getaddrinfo {host}")
    return real_getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
socket.socket.connect_ex = lambda self, address: connect(self, address) or 0
from pipelines import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_dry_run_with_gs_paths_builds_the_job_with_no_network_access_at_all(input_glob, tmp_path):
    """gs:// input, output and temp: the job (commit stage included) is built without one network call."""
    attempts = tmp_path / "network-attempts.json"
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update({k: v for k, v in NO_AUTH_ENV.items() if v is not None}, NETWORK_ATTEMPTS=str(attempts))
    # Where a new network namespace can be made, the child has no network interface at all (C++
    # clients, e.g. TensorFlow's GCS filesystem, cannot reach out either); the guard records the rest.
    isolate = (
        ["unshare", "--net"]
        if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0
        else []
    )
    done = subprocess.run(
        [
            *isolate,
            sys.executable,
            "-c",
            NETWORK_GUARD,
            "run",
            "--runner",
            "DataflowRunner",
            "--project",
            PROJECT,
            "--region",
            REGION,
            "--temp_location",
            TEMP,
            "--input",
            "gs://tf-test-bucket/in/date=2024-05-01/*",
            "--output",
            "gs://tf-test-bucket/out/date=2024-05-01",
            "--grid",
            GRID,
            "--dim",
            str(DIM),
            "--dry_run=True",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not attempts.exists(), attempts.read_text()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run: job built" in done.stdout


def test_an_option_error_prints_its_whole_reason_on_one_line(input_glob, tmp_path, capsys):
    """Beam's own option validation runs up front; its reason (on later lines in Beam's message) reaches the user."""
    code = embedding_stats.run(
        [
            "--runner",
            "DataflowRunner",
            "--project",
            PROJECT,
            "--region",
            REGION,
            "--temp_location",
            TEMP,
            "--job_name",
            "Not_A_Valid_Job_Name!",
            "--input",
            input_glob,
            "--output",
            str(tmp_path / "out"),
            "--grid",
            GRID,
            "--dim",
            str(DIM),
            "--dry_run=True",
        ]
    )
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE  # a bad flag, found before any work
    assert err.count("\n") == 1 and "Invalid job_name (Not_A_Valid_Job_Name!)" in err and "[-a-z0-9]" in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Flex Template files (no Docker engine here: checked statically against the real parsers).
# ---------------------------------------------------------------------------
def _dockerfile() -> str:
    return (DATAFLOW_DIR / "Dockerfile").read_text()


def test_dockerfile_matches_the_installed_stack_and_points_at_the_entry_point():
    text = _dockerfile()
    beam_version = re.search(r"^ARG BEAM_VERSION=(\S+)$", text, re.M).group(1)
    assert beam_version == beam.__version__
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"apache/beam_python{python}_sdk:" in text
    assert re.search(r"^ARG PYTHON_TAG=(\S+)$", text, re.M).group(1) == f"python{python.replace('.', '')}"
    assert "/${PYTHON_TAG}-template-launcher-base" in text
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    copies = re.findall(r"^COPY (?!--from)(.+) (\S+)$", text, re.M)
    for sources, _ in copies:  # everything copied exists in the repository
        for source in sources.split():
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    py_file = re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)$", text, re.M).group(1)
    assert py_file.startswith(workdir + "/")
    relative = py_file[len(workdir) + 1 :]
    assert any(relative.startswith(dest.rstrip("/").lstrip("./") + "/") for _, dest in copies if dest not in ("./",)), (
        relative
    )
    assert (REPO / relative).is_file()
    # The workers do not start through `tripletflow`: the image sets what the CLI sets for its own workers.
    assert re.search(rf"^ENV {cli.BFC_ALLOCATOR_ENV}=true$", text, re.M)


def test_flex_template_entry_point_runs_the_cli(tmp_path):
    done = subprocess.run(
        [sys.executable, str(DATAFLOW_DIR / "main.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--input GLOB --output DIR" in done.stdout


def test_metadata_parameters_parse_with_the_pipeline_options():
    metadata = json.loads((DATAFLOW_DIR / "metadata.json").read_text())
    assert metadata["name"] and metadata["description"]
    params = {p["name"]: p for p in metadata["parameters"]}
    assert {name for name, p in params.items() if not p["isOptional"]} == {"input", "output"}
    examples = {
        "input": "gs://b/in/date=2024-05-01/*",
        "output": "gs://b/out/date=2024-05-01",
        "grid": "2,13,13,5",
        "dim": "100",
        "distance": "cosine",
        "margin": "0.35",
    }
    assert params.keys() <= examples.keys(), f"add an example for {params.keys() - examples.keys()}"
    for name, p in params.items():
        assert p["label"] and p["helpText"]
        for pattern in p.get("regexes", []):
            assert re.fullmatch(pattern, examples[name]), (name, pattern)
    # The launcher passes each parameter as --name=value: the real options parser must take them all.
    options = EmbeddingStatsOptions([f"--{name}={examples[name]}" for name in params])
    opts = options.view_as(EmbeddingStatsOptions)
    assert (opts.input, opts.output, opts.distance) == (examples["input"], examples["output"], "cosine")
    assert (opts.grid, opts.dim, opts.margin) == ("2,13,13,5", 100, 0.35)
    assert validate_options(options) == contract.GridSpec(2, 13, 13, 5, dim=100)
    # Bad values are refused by the template's regexes before a job starts.
    assert not any(re.fullmatch(pattern, "2,13,13") for pattern in params["grid"]["regexes"])
    assert not any(re.fullmatch(pattern, "manhattan") for pattern in params["distance"]["regexes"])
