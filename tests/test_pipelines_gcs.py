"""gs:// for real (issue #11): Beam's own GCS filesystem against the loopback emulator, and
TensorFlow's GCS client (tf.data, tf.io.gfile) on the same emulator through tests/gcs_tls_proxy.py.

- EmbeddingStats reads its input from gs:// (Beam lists it, tf.data reads it) with the same tables
  as the local run;
- the commit on gs://: a run committed, a re-run replacing it, a killed run's leftovers; the
  commit uploads one object (MANIFEST.json) and copies or rewrites no data file (the emulator's
  own request log says so); readers follow the manifest;
- the Trainer trains from that gs:// output (manifest, Parquet and transform graph read by
  tf.io.gfile) and gets the local run's figures.

Not here: the whole pipeline writing gs:// output. tf.Transform writes its graph (a SavedModel)
with tf.io.gfile, and TensorFlow's SavedModel upload stalls against this emulator; see the note
on issue #11.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats import commit
from pipelines import embedding_stats
from pipelines import train as train_entry
from schemas import contract
from tests import embedding_stats_reference as ref
from tests.test_pipelines_local import assert_same_outputs, stats_flags

TRAIN_ARGS = ["--epochs", "1", "--batch-size", "4", "--no-export"]
COPY_REQUEST = re.compile(r'"(POST|PUT) [^"]*/(rewriteTo|copyTo|compose)/')
UPLOAD_REQUEST = re.compile(r'"(POST|PUT) /upload/')
OLD_RUN, KILLED_RUN, NEW_RUN = ("20240101T000000000000Z-aaaaaaaa", "20240101T000001000000Z-bbbbbbbb",
                                "20240101T000002000000Z-cccccccc")


@pytest.fixture(scope="module")
def tf_gcs(gcs_emulator):
    """TensorFlow's GCS client pointed at the emulator for this module (env restored after)."""
    import gcs_tls_proxy

    proxy = gcs_tls_proxy.TfGcsProxy(gcs_emulator.url)
    saved = {name: os.environ.get(name) for name in proxy.env}
    os.environ.update(proxy.env)
    yield gcs_emulator
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    proxy.close()


def upload(local: str, remote: str) -> None:
    """Copies a file to gs:// byte for byte through Beam's FileSystems (no compression by name: *.gz too)."""
    with open(local, "rb") as source, FileSystems.create(remote, compression_type=CompressionTypes.UNCOMPRESSED) as target:
        target.write(source.read())


def upload_tree(local: str, remote: str) -> None:
    for folder, _, names in os.walk(local):
        for name in names:
            upload(os.path.join(folder, name), f"{remote}/{os.path.relpath(os.path.join(folder, name), local)}")


def objects(prefix: str) -> set[str]:
    return {m.path[len(prefix) + 1:] for m in FileSystems.match([f"{prefix}/**"])[0].metadata_list}


def requests_since(emulator, offset: int) -> list[str]:
    with open(emulator.log_path, errors="replace") as f:
        f.seek(offset)
        return [line for line in f.read().splitlines() if line.startswith('"')]


def test_embedding_stats_reads_gs_input_like_local_input(stats_run, tf_gcs, tmp_path):
    prefix = f"{tf_gcs.root}/input-{tmp_path.name}"
    for path in stats_run.input.files:
        upload(path, f"{prefix}/{os.path.basename(path)}")
    flags = [f for f in stats_flags(stats_run) if f not in ("--input", stats_run.input.pattern)]
    output = tmp_path / "out"
    assert embedding_stats.run(["--input", f"{prefix}/part-*", "--output", str(output), *flags]) == 0
    assert_same_outputs(output, stats_run.output_dir)
    assert sorted(ref.manifest(output)["input_files"]) == sorted(
        f"{prefix}/{os.path.basename(p)}" for p in stats_run.input.files)


def test_commit_on_gs_replaces_the_run_copies_no_data_and_the_trainer_reads_it(stats_run, tf_gcs, tmp_path):
    output = f"{tf_gcs.root}/out-{tmp_path.name}/date=2024-05-01"
    summary = ref.read_summary(stats_run.output_dir)
    run_files = ref.run_file(stats_run.output_dir, "")

    def finished_run(run_id: str) -> commit.RunInfo:  # a run whose files are written, not yet committed
        run = commit.RunInfo(output, run_id, stats_run.input.pattern, tuple(stats_run.input.files), {}, "t")
        upload_tree(run_files, run.run_dir)
        return run

    old = finished_run(OLD_RUN)
    commit.commit(None, old, summary)
    assert json.loads(FileSystems.open(f"{output}/{contract.MANIFEST_FILE}").read())["run_id"] == OLD_RUN
    # A killed run's partial files, then a re-run of the same date replacing the old run.
    with FileSystems.create(f"{output}/{contract.RUNS_DIR}/{KILLED_RUN}/{contract.VECTORS_DIR}/part-x.parquet") as f:
        f.write(b"half a file")
    new = finished_run(NEW_RUN)
    with open(tf_gcs.log_path) as log:
        log.seek(0, os.SEEK_END)
        before = log.tell()
    manifest = commit.commit(None, new, summary)
    during = requests_since(tf_gcs, before)
    assert [line for line in during if COPY_REQUEST.search(line)] == []  # no data file copied or rewritten
    uploads = [line for line in during if UPLOAD_REQUEST.search(line)]
    sessions = [line for line in uploads if line.startswith('"POST')]  # one per object (resumable: POST, then PUTs)
    assert len(sessions) == 1 and all("MANIFEST.json" in line for line in uploads if line.startswith('"PUT')), uploads
    # What is left is the manifest and the new run's files, exactly as it lists them.
    assert objects(output) == {contract.MANIFEST_FILE, *(entry["path"] for entry in manifest["files"])}
    assert {entry["path"].split("/")[1] for entry in manifest["files"]} == {NEW_RUN}
    sizes = {m.path[len(output) + 1:]: m.size_in_bytes for m in FileSystems.match([f"{output}/**"])[0].metadata_list}
    assert all(sizes[entry["path"]] == entry["bytes"] for entry in manifest["files"])

    # The Trainer reads that gs:// output through tf.io.gfile and the reader rule: same figures as locally.
    local_out, remote_out = str(tmp_path / "local_model"), str(tmp_path / "gs_model")
    assert train_entry.run(["--stats", stats_run.output_dir, "--output", local_out, *TRAIN_ARGS]) == 0
    assert train_entry.run(["--stats", output, "--output", remote_out, *TRAIN_ARGS]) == 0
    metrics = [json.load(open(os.path.join(d, "metrics.json"))) for d in (local_out, remote_out)]
    assert metrics[1]["stats_dirs"] == [output]
    assert metrics[1]["counts"] == metrics[0]["counts"] and metrics[1]["counts"]["validation_examples"] > 0
    assert [e["steps"] for e in metrics[1]["epochs"]] == [e["steps"] for e in metrics[0]["epochs"]]
