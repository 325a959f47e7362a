"""Trainer on non-local paths: a real EmbeddingStats run copied into TensorFlow's in-memory
filesystem (`ram://`, served by the same `tf.io.gfile` layer as gs://) trains, checkpoints,
exports and writes metrics.json there, exactly as the same run does on local disk.
"""

from __future__ import annotations

import io
import json
import os
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from components.trainer import data, fileio
from components.trainer import spec as spec_lib
from pipelines import train as train_entry
from schemas import contract

RAM_SCHEME = "ram://"
EPOCHS = 2
TRAIN_ARGS = [
    "--epochs",
    str(EPOCHS),
    "--batch-size",
    "4",
    "--hidden",
    "8",
    "--validation-fraction",
    "0.3",
    "--mining",
    "batch_hard",
    "--seed",
    "3",
]
LOSS_TOLERANCE = 1e-6  # same data, same seed, same graph: only float summation order could differ
SERVE_BOXES = 7  # raw boxes fed to both SavedModels (not a whole grid: exercises the padding path)


def copy_tree(src: str, dst: str) -> list[str]:
    """Copies every file under `src` to `dst` with tf.io.gfile; returns the relative paths copied."""
    copied = []
    for root, _, files in tf.io.gfile.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else f"{dst}/{rel}"
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), f"{target}/{name}", overwrite=True)
            copied.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(copied)


@pytest.fixture
def ram_root():
    root = f"{RAM_SCHEME}tripletflow-test-{uuid.uuid4().hex}"
    yield root
    # ram:// has no real directories and its DeleteRecursively raises NotFound: remove file by file.
    for directory, _, files in tf.io.gfile.walk(root):
        for name in files:
            tf.io.gfile.remove(f"{directory}/{name}")


def test_fileio_tells_uris_from_local_paths():
    assert fileio.has_scheme("gs://bucket/stats/date=2024-01-01")
    assert fileio.has_scheme("ram://x")
    assert not fileio.has_scheme("/data/stats") and not fileio.has_scheme("relative/dir")
    assert fileio.canonical("gs://bucket/a/../b") == "gs://bucket/a/../b"  # never abspath'd
    assert fileio.canonical("relative/dir") == os.path.join(os.getcwd(), "relative", "dir")
    assert {"gs", "ram"} <= set(tf.io.gfile.get_registered_schemes())  # what the nightly DAG and these tests rely on


def test_open_parquet_streams_row_groups_from_ram(ram_root):
    """Opening reads the footer only; a batch reads one row group of the asked column, not the file."""
    rows, row_group = 40_000, 5_000
    rng = np.random.default_rng(0)
    table = pa.table({"a": rng.random(rows), "b": rng.random(rows)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group, compression="none", use_dictionary=False)
    path = f"{ram_root}/t.parquet"
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    size = tf.io.gfile.stat(path).length
    itemsize = np.dtype(np.float64).itemsize
    one_chunk, one_column = row_group * itemsize, rows * itemsize  # bytes, uncompressed
    assert size > 2 * one_column  # columns a and b are both in the file

    read = []
    original = fileio._GFileReader.read

    def counting_read(self, n=-1):
        out = original(self, n)
        read.append(len(out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fileio._GFileReader, "read", counting_read)
        with fileio.open_parquet(path) as reader:
            assert reader.metadata.num_row_groups == rows // row_group
            opened = sum(read)
            batches = reader.iter_batches(batch_size=100, columns=["a"])
            first = next(batches)
            after_first = sum(read)
            rest = sum(b.num_rows for b in batches)
    assert first.column(0).to_pylist() == table.column("a").to_pylist()[:100]
    assert first.num_rows + rest == rows
    assert opened < size / 4  # the footer, not the data
    assert after_first - opened < 2 * one_chunk  # one row group of column a
    assert sum(read) - opened < 1.1 * one_column  # all of column a (plus page headers), none of b


def test_train_on_ram_uris_equals_local_run(stats_run, tmp_path, ram_root, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path mistaken for local would show up here as ./ram:/...
    local_stats = stats_run.output_dir
    ram_stats, ram_out = f"{ram_root}/stats/date=2024-01-01", f"{ram_root}/models/date=2024-01-01"
    copied = copy_tree(local_stats, ram_stats)
    assert contract.MANIFEST_FILE in copied and any(f"/{contract.TRANSFORM_GRAPH_DIR}/" in p for p in copied)
    assert any(f"/{contract.VECTORS_DIR}/" in p and p.endswith(".parquet") for p in copied)

    local_out = str(tmp_path / "local_model")
    assert train_entry.run(["--stats", local_stats, "--output", local_out, *TRAIN_ARGS]) == 0
    assert train_entry.run(["--stats", ram_stats, "--output", ram_out, *TRAIN_ARGS]) == 0
    assert not any(name.startswith("ram:") for name in os.listdir(tmp_path)), os.listdir(tmp_path)

    with open(os.path.join(local_out, spec_lib.METRICS_FILE)) as f:
        local = json.load(f)
    with tf.io.gfile.GFile(f"{ram_out}/{spec_lib.METRICS_FILE}") as f:
        remote = json.load(f)
    assert remote["status"] == local["status"] == "complete"
    assert remote["stats_dirs"] == [ram_stats]
    assert [e["epoch"] for e in remote["epochs"]] == list(range(1, EPOCHS + 1))
    assert remote["counts"] == local["counts"] and remote["counts"]["validation_examples"] > 0
    assert remote["dim"] == local["dim"] == stats_run.grid.dim and remote["grid"] == local["grid"]
    for got, want in zip(remote["epochs"], local["epochs"], strict=True):
        assert got["steps"] == want["steps"] > 0
        assert got["loss"] == pytest.approx(want["loss"], abs=LOSS_TOLERANCE)
    for name in ("baseline", "trained"):
        assert remote["validation"][name] == pytest.approx(local["validation"][name], abs=LOSS_TOLERANCE)

    # Everything else the run writes lives under the ram:// output too, and a reader finds no leftovers.
    for name in (spec_lib.HISTORY_FILE, spec_lib.OPTIONS_FILE, spec_lib.CHECKPOINT_DIR, spec_lib.SAVED_MODEL_DIR):
        assert tf.io.gfile.exists(f"{ram_out}/{name}"), name
    assert not tf.io.gfile.glob(f"{ram_out}/*{fileio.TMP_SUFFIX}")
    with tf.io.gfile.GFile(f"{ram_out}/{spec_lib.OPTIONS_FILE}") as f:
        assert json.load(f)["stats_dirs"] == [ram_stats]  # as given, not os.path.abspath'd

    # The SavedModel exported to ram:// (transform graph read from ram://) serves like the local one.
    boxes = np.random.default_rng(1).normal(size=(SERVE_BOXES, stats_run.grid.dim)).astype(np.float32)
    served = {}
    for where, path in (("local", os.path.join(local_out, spec_lib.SAVED_MODEL_DIR)), ("ram", remote["saved_model"])):
        model = tf.saved_model.load(path)
        served[where] = model.signatures["serving_default"](tf.constant(boxes))["embeddings"].numpy()
    assert served["ram"].shape == (SERVE_BOXES, stats_run.grid.dim)
    np.testing.assert_allclose(served["ram"], served["local"], atol=LOSS_TOLERANCE)

    # Resuming reads the ram:// checkpoint and history: one more epoch continues the same run.
    assert (
        train_entry.run(["--stats", ram_stats, "--output", ram_out, *TRAIN_ARGS[2:], "--epochs", str(EPOCHS + 1)]) == 0
    )
    with tf.io.gfile.GFile(f"{ram_out}/{spec_lib.METRICS_FILE}") as f:
        resumed = json.load(f)
    assert [e["epoch"] for e in resumed["epochs"]] == list(range(1, EPOCHS + 2))
    assert [e["loss"] for e in resumed["epochs"][:EPOCHS]] == [e["loss"] for e in remote["epochs"]]


def test_missing_ram_run_is_a_clear_error(ram_root, capsys):
    assert train_entry.run(["--stats", f"{ram_root}/nothing", "--output", f"{ram_root}/out"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    tf.io.gfile.makedirs(f"{ram_root}/unfinished/{contract.VECTORS_DIR}")
    assert train_entry.run(["--stats", f"{ram_root}/unfinished", "--output", f"{ram_root}/out"]) == 2
    assert "not a finished EmbeddingStats run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a finished EmbeddingStats run"):
        data.vector_files(f"{ram_root}/unfinished")
