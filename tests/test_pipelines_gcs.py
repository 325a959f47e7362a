"""gs:// for real (issue #11): Beam's own GCS filesystem against the loopback emulator, and
TensorFlow's GCS client (tf.data, tf.io.gfile: tf.Transform's graph writer, the Trainer) on the
same emulator through tests/gcs_tls_proxy.py.

- EmbeddingStats reads its input from gs:// (Beam lists it, tf.data reads it) with the same tables
  as the local run;
- the whole pipeline writes `--output gs://...`: a run commits (its tables equal the local
  reference run's, row for row); a run killed before its commit leaves the previous manifest and
  files readable; a re-run replaces the old run and cleans the killed run's leftovers, and its
  commit uploads one object (MANIFEST.json) and copies or rewrites no data file (the emulator's
  own request log says so);
- the Trainer trains from that gs:// output (manifest, Parquet and transform graph read by
  tf.io.gfile) and gets the local run's figures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from faults.sitecustomize import KILLED_WORKER_EXIT_CODE  # tests/ is on sys.path

from components.embedding_stats import commit
from pipelines import embedding_stats
from pipelines import train as train_entry
from schemas import contract
from tests import beam_services
from tests import embedding_stats_reference as ref
from tests.test_pipelines_local import assert_same_outputs, stats_flags

TRAIN_ARGS = ["--epochs", "1", "--batch-size", "4", "--no-export"]
# Server-side copies in the JSON API: rewrite, copy, compose (an emulator log line: "METHOD PATH HTTP/1.1" ...).
COPY_REQUEST = re.compile(r'"(POST|PUT) [^"]*(/rewriteTo/|/copyTo/|/compose[?" ])')
UPLOAD_REQUEST = re.compile(r'"(POST|PUT) /upload/')
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tf_gcs(gcs_emulator):
    """TensorFlow's GCS client pointed at the emulator for this module (env restored after)."""
    import gcs_tls_proxy

    proxy_log = os.path.join(os.path.dirname(gcs_emulator.log_path), "tf-proxy.log")  # for diagnosis
    proxy = gcs_tls_proxy.TfGcsProxy(gcs_emulator.url, proxy_log)
    saved = {name: os.environ.get(name) for name in proxy.env}
    os.environ.update(proxy.env)
    yield gcs_emulator
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    proxy.close()


def upload(local: str, remote: str) -> None:
    """Copies a file to gs:// byte for byte through Beam's FileSystems (no compression by name: *.gz too)."""
    with (
        open(local, "rb") as source,
        FileSystems.create(remote, compression_type=CompressionTypes.UNCOMPRESSED) as target,
    ):
        target.write(source.read())


def objects(prefix: str) -> dict[str, int]:
    """Every object under `prefix`, relative to it, with its size (bytes); directory markers end with /."""
    found = FileSystems.match([f"{prefix}/**"])[0].metadata_list
    return {m.path[len(prefix) + 1 :]: m.size_in_bytes for m in found}


def requests_between(emulator, start: int, end: int | None = None) -> list[str]:
    """The emulator's request lines logged between two byte offsets of its log."""
    with open(emulator.log_path, errors="replace") as f:
        f.seek(start)
        text = f.read() if end is None else f.read(end - start)
    return [line for line in text.splitlines() if line.startswith('"')]


def gs_manifest(output: str) -> dict:
    with FileSystems.open(f"{output}/{contract.MANIFEST_FILE}", compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return json.loads(f.read())


def download_committed(output: str, local) -> str:
    """What a reader of the gs:// output sees, copied to `local`: MANIFEST.json and only the files it lists."""
    manifest = gs_manifest(output)
    for relative in [contract.MANIFEST_FILE, *(entry["path"] for entry in manifest["files"])]:
        target = os.path.join(local, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with (
            FileSystems.open(f"{output}/{relative}", compression_type=CompressionTypes.UNCOMPRESSED) as f,
            open(target, "wb") as out,
        ):
            out.write(f.read())
    return str(local)


def assert_lists_exactly_its_run(output: str, manifest: dict) -> None:
    """The manifest's files exist with the sizes it gives; nothing else is there but directory markers."""
    found = objects(output)
    listed = {entry["path"]: entry["bytes"] for entry in manifest["files"]}
    assert {path: found.get(path) for path in listed} == listed
    assert {entry.split("/")[1] for entry in listed} == {manifest["run_id"]}
    others = set(found) - set(listed) - {contract.MANIFEST_FILE}
    # tf.io.gfile's empty "dir/" objects: the output's, runs/ and those inside the committed run.
    allowed = ("", f"{contract.RUNS_DIR}/")
    assert all(
        path in allowed or (path.endswith("/") and path.startswith(f"{manifest['run_dir']}/")) for path in others
    ), sorted(others)
    assert all(found[path] == 0 for path in others)


def log_size(emulator) -> int:
    return os.path.getsize(emulator.log_path)


def spy_on_the_commit(monkeypatch, emulator, record: str) -> None:
    """Runs the real commit stage, writing to `record` the emulator log offsets before and after it."""
    real_commit = commit.commit
    log_path = emulator.log_path

    def commit_and_record(*args):
        before = os.path.getsize(log_path)
        manifest = real_commit(*args)
        with open(record, "w") as f:
            json.dump([before, os.path.getsize(log_path)], f)
        return manifest

    monkeypatch.setattr(commit, "commit", commit_and_record)  # CommitRun maps whatever `commit.commit` is


def test_embedding_stats_reads_gs_input_like_local_input(stats_run, tf_gcs, tmp_path):
    prefix = f"{tf_gcs.root}/input-{tmp_path.name}"
    for path in stats_run.input.files:
        upload(path, f"{prefix}/{os.path.basename(path)}")
    flags = [f for f in stats_flags(stats_run) if f not in ("--input", stats_run.input.pattern)]
    output = tmp_path / "out"
    assert embedding_stats.run(["--input", f"{prefix}/part-*", "--output", str(output), *flags]) == 0
    assert_same_outputs(output, stats_run.output_dir)
    assert sorted(ref.manifest(output)["input_files"]) == sorted(
        f"{prefix}/{os.path.basename(p)}" for p in stats_run.input.files
    )


def test_the_pipeline_writing_gs_commits_survives_a_kill_replaces_its_run_and_feeds_the_trainer(
    stats_run, tf_gcs, tmp_path, monkeypatch
):
    output = f"{tf_gcs.root}/pipeline-{tmp_path.name}/date=2024-05-01"
    flags = [*stats_flags(stats_run), "--output", output]

    # A run commits on gs://: the manifest lists its files, whose tables equal the local reference run's.
    assert embedding_stats.run(flags) == 0
    first = gs_manifest(output)
    assert_lists_exactly_its_run(output, first)
    assert any(f"/{contract.TRANSFORM_GRAPH_DIR}/" in entry["path"] for entry in first["files"])
    assert_same_outputs(download_committed(output, tmp_path / "first"), stats_run.output_dir)

    # A run killed before its commit (launcher and worker are one process here, dead in the pair
    # statistics): the previous manifest and its files stay current and readable.
    marker = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", *flags],
        capture_output=True,
        text=True,
        env=beam_services.venv_env(beam_services.kill_worker_once_env(marker)),
        timeout=RUN_TIMEOUT_S,
    )
    assert marker.exists() and killed.returncode == KILLED_WORKER_EXIT_CODE, killed.stderr[-2000:]
    assert gs_manifest(output) == first
    leftovers = {
        path
        for path in objects(output)
        if path.startswith(f"{contract.RUNS_DIR}/")
        and not path.startswith(f"{first['run_dir']}/")
        and path != f"{contract.RUNS_DIR}/"
    }
    assert leftovers, "the killed run left nothing: the clean-up below would prove nothing"
    assert_same_outputs(download_committed(output, tmp_path / "after_kill"), stats_run.output_dir)

    # A re-run replaces the old run and the killed run's leftovers; its commit copies no data file.
    record = str(tmp_path / "commit_window.json")
    spy_on_the_commit(monkeypatch, tf_gcs, record)
    start = log_size(tf_gcs)
    assert embedding_stats.run(flags) == 0
    second = gs_manifest(output)
    assert second["run_id"] > first["run_id"]
    assert_lists_exactly_its_run(output, second)  # the old run's files and the leftovers are gone
    assert_same_outputs(download_committed(output, tmp_path / "second"), stats_run.output_dir)
    with open(record) as f:
        during_commit = requests_between(tf_gcs, *json.load(f))
    assert [line for line in during_commit if COPY_REQUEST.search(line)] == []
    uploads = [line for line in during_commit if UPLOAD_REQUEST.search(line)]
    assert len(uploads) == 1, uploads  # MANIFEST.json, in one request (Beam's GcsIO: multipart, name in the body)
    # Over the whole run, no table or summary is ever copied: each is written once, where it stays.
    copies = [line for line in requests_between(tf_gcs, start) if COPY_REQUEST.search(line)]
    assert not [line for line in copies if ".parquet" in line or contract.SUMMARY_FILE in line], copies

    # The Trainer reads that gs:// output through tf.io.gfile and the reader rule: same figures as locally.
    local_out, remote_out = str(tmp_path / "local_model"), str(tmp_path / "gs_model")
    assert train_entry.run(["--stats", stats_run.output_dir, "--output", local_out, *TRAIN_ARGS]) == 0
    assert train_entry.run(["--stats", output, "--output", remote_out, *TRAIN_ARGS]) == 0
    metrics = [json.load(open(os.path.join(d, "metrics.json"))) for d in (local_out, remote_out)]
    assert metrics[1]["stats_dirs"] == [output]
    assert metrics[1]["counts"] == metrics[0]["counts"] and metrics[1]["counts"]["validation_examples"] > 0
    assert [e["steps"] for e in metrics[1]["epochs"]] == [e["steps"] for e in metrics[0]["epochs"]]
