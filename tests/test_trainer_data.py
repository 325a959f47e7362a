"""Trainer input pipeline: real Parquet files (VECTORS_SCHEMA) -> padded tf.data sets."""

from __future__ import annotations

import json
import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.trainer import data
from schemas import contract

DIM = 6


def _rows(example_id, embeddings, labels):
    n = len(labels)
    return {
        "example_id": [example_id] * n,
        "level": [0] * n,
        "row": [0] * n,
        "col": [0] * n,
        "anchor": list(range(n)),
        "label": [int(v) for v in labels],
        "l2_norm": [1.0] * n,
        "l1_norm": [1.0] * n,
        "max_abs": [1.0] * n,
        "l2_norm_z": [0.0] * n,
        "l2_norm_bucket": [0] * n,
        "embedding": [e.astype(np.float32) for e in embeddings],
    }


RUN_ID = "20240101T000000000000Z-00000000"


def write_run(root, chunks, files=1, row_group_size=7, grid="1,2,2,3"):
    """Writes (example_id, embeddings, labels) chunks in the given order as a finished run."""
    rows = {name: [] for name in contract.VECTORS_SCHEMA.names}
    for chunk in chunks:
        for key, values in _rows(*chunk).items():
            rows[key] += values
    table = pa.table(rows, schema=contract.VECTORS_SCHEMA)
    run_dir = f"{contract.RUNS_DIR}/{RUN_ID}"
    os.makedirs(os.path.join(root, run_dir, contract.VECTORS_DIR), exist_ok=True)
    per_file = -(-table.num_rows // files)
    listed = []
    for i in range(files):
        relative = f"{run_dir}/{contract.VECTORS_DIR}/part-{i:05d}.parquet"
        part = table.slice(i * per_file, per_file)
        pq.write_table(part, os.path.join(root, relative), row_group_size=row_group_size)
        listed.append({"path": relative, "bytes": os.path.getsize(os.path.join(root, relative)), "rows": part.num_rows})
    # A stray Parquet file beside the run's: a reader following the manifest never reads it.
    pq.write_table(table.slice(0, 1), os.path.join(root, run_dir, contract.VECTORS_DIR, "stray.parquet"))
    with open(os.path.join(root, contract.MANIFEST_FILE), "w") as f:
        json.dump({"run_dir": run_dir, "files": listed, "options": {"grid": grid, "dim": DIM}}, f)
    return str(root)


def _examples(rng, n, max_boxes=9):
    out = []
    for i in range(n):
        boxes = int(rng.integers(1, max_boxes + 1))
        out.append((f"ex-{i:03d}", rng.normal(size=(boxes, DIM)).astype(np.float32), rng.integers(0, 4, size=boxes)))
    return out


def test_regroups_examples_split_over_batches_and_files(tmp_path):
    rng = np.random.default_rng(0)
    examples = _examples(rng, 25)
    examples[3] = ("ex-003", rng.normal(size=(5, DIM)).astype(np.float32), np.array([0, 1, 0, 2, 1]))
    # Example 3's rows come in two pieces with example 4 between them (inside the window).
    e3, e4 = examples[3], examples[4]
    head = (e3[0], e3[1][:1], e3[2][:1])
    tail = (e3[0], e3[1][1:], e3[2][1:])
    chunks = examples[:3] + [head, e4, tail] + examples[5:]
    run = write_run(tmp_path / "run", chunks, files=3, row_group_size=5)
    got = {eid: (emb, lab) for eid, emb, lab in data.iter_run_sets(run, DIM, window=2, read_rows=4)}
    assert sorted(got) == [e[0] for e in examples]
    for eid, emb, lab in examples:
        np.testing.assert_array_equal(got[eid][0], emb)
        np.testing.assert_array_equal(got[eid][1], lab)


def test_example_split_beyond_window_is_an_error(tmp_path):
    rng = np.random.default_rng(1)
    examples = _examples(rng, 6, max_boxes=3)
    chunks = examples + [(examples[0][0], examples[0][1][:1], examples[0][2][:1])]
    run = write_run(tmp_path / "run", chunks)
    with pytest.raises(data.SplitExampleError, match="ex-000"):
        list(data.iter_run_sets(run, DIM, window=3))


def test_bad_inputs_are_clear_errors(tmp_path):
    rng = np.random.default_rng(2)
    bad = _examples(rng, 2)
    bad[1][1][0, 0] = np.nan
    run = write_run(tmp_path / "nan", bad)
    with pytest.raises(ValueError, match="non-finite"):
        list(data.iter_run_sets(run, DIM))
    with pytest.raises(ValueError, match=f"list of {DIM + 1} floats"):
        list(data.iter_run_sets(run, DIM + 1))
    os.remove(os.path.join(run, contract.MANIFEST_FILE))
    with pytest.raises(ValueError, match="not a finished EmbeddingStats run"):
        data.read_manifest(run)
    empty = write_run(tmp_path / "empty", [])
    manifest = json.loads((tmp_path / "empty" / contract.MANIFEST_FILE).read_text())
    (tmp_path / "empty" / contract.MANIFEST_FILE).write_text(json.dumps({**manifest, "files": []}))
    with pytest.raises(ValueError, match="lists no vectors files"):
        data.vector_files(empty)


def test_split_is_a_fixed_hash_of_the_id():
    # crc32(b"a") = 0xE8B7BE43 -> 0.9090 of the hash range: validation only for fractions above it.
    assert zlib.crc32(b"a") == 0xE8B7BE43
    assert data.is_validation("a", 0.91) and not data.is_validation("a", 0.90)
    ids = [f"image-{i}" for i in range(4000)]
    share = np.mean([data.is_validation(i, 0.25) for i in ids])
    assert 0.22 < share < 0.28


def test_dataset_pads_splits_and_shuffles_deterministically(tmp_path):
    rng = np.random.default_rng(3)
    examples = _examples(rng, 40)
    runs = [write_run(tmp_path / "a", examples[:20]), write_run(tmp_path / "b", examples[20:])]
    by_id = {eid: (emb, lab) for eid, emb, lab in examples}

    def collect(split, seed):
        order = []
        for batch in data.make_dataset(runs, DIM, split, 0.3, 4, shuffle_seed=seed, shuffle_buffer=64):
            ids = [i.decode() for i in batch["example_id"].numpy()]
            emb, lab = batch["embeddings"].numpy(), batch["labels"].numpy()
            assert emb.shape[1] == lab.shape[1] == max(len(by_id[i][1]) for i in ids)
            for row, eid in enumerate(ids):
                n = len(by_id[eid][1])
                np.testing.assert_array_equal(emb[row, :n], by_id[eid][0])
                np.testing.assert_array_equal(lab[row, :n], by_id[eid][1])
                assert np.all(lab[row, n:] == contract.EMPTY_LABEL) and np.all(emb[row, n:] == 0)
            order += ids
        return order

    train, validation = collect(data.TRAIN, 5), collect(data.VALIDATION, None)
    assert sorted(train + validation) == sorted(by_id)
    assert set(validation) == {i for i in by_id if zlib.crc32(i.encode()) / 2**32 < 0.3}
    assert collect(data.TRAIN, 5) == train  # same seed, same order
    assert collect(data.TRAIN, data.epoch_seed(0, 2)) != collect(data.TRAIN, data.epoch_seed(0, 3))
