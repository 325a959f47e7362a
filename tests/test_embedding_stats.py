"""EmbeddingStats end to end on real files: values against independent numpy references."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from components.embedding_stats.options import EmbeddingStatsOptions
from schemas import contract
from tests import embedding_stats_reference as ref
from tests.conftest import run_stats

FLOAT_RTOL = 1e-4
FLOAT_ATOL = 1e-5


@pytest.fixture(scope="module")
def reference_input(sample_input):
    """Good records only, read independently of the pipeline (the bad ones are known by id)."""
    found = ref.read_input(sample_input.pattern, sample_input.grid)
    return {key: value for key, value in found.items() if key not in sample_input.bad_ids}


@pytest.fixture(scope="module")
def distance_runs(stats_run, sample_input, tmp_path_factory):
    """The shared (euclidean) run plus one run per other distance on the same input."""
    runs = {"euclidean": stats_run.output_dir}
    for distance in ("squared", "cosine"):
        out = os.path.join(str(tmp_path_factory.mktemp(f"run_{distance}")), "out")
        run_stats(sample_input.pattern, out, sample_input.grid, "--distance", distance)
        runs[distance] = out
    return runs


def _check_example_row(row: dict, expected: dict, example_id: str):
    for name in contract.EXAMPLE_STATISTIC_COLUMNS:
        got, want = row[name], expected[name]
        if name == "n_active_triplets":  # hinges within float32 round-off of 0 may flip
            assert abs(got - want) <= max(2, 1e-3 * want), (example_id, name, got, want)
        elif name in contract.EXAMPLE_COUNT_COLUMNS:
            assert got == want, (example_id, name, got, want)
        elif want is None:
            assert got is None, (example_id, name, got)
        else:
            assert got == pytest.approx(want, rel=1e-3, abs=1e-4), (example_id, name, got, want)


@pytest.mark.parametrize("distance", ["euclidean", "squared", "cosine"])
def test_examples_equal_brute_force_numpy(distance, distance_runs, reference_input):
    table = ref.read_table(distance_runs[distance], contract.EXAMPLES_DIR).to_pylist()
    rows = {row["example_id"]: row for row in table}
    assert set(rows) == set(reference_input)
    for example_id, (emb, labels) in reference_input.items():
        _check_example_row(rows[example_id], ref.example_statistics(emb, labels, distance), example_id)


def test_counts_add_up(stats_run, sample_input):
    summary = stats_run.result.summary
    assert summary["records_read"] == len(sample_input.good_ids) + len(sample_input.bad_ids)
    assert summary["records_good"] == len(sample_input.good_ids)
    assert summary["records_read"] == summary["records_good"] + summary["records_rejected"]
    assert summary["records_rejected"] == sum(summary["rejected_by_reason"].values())
    dead = ref.read_table(stats_run.output_dir, contract.DEAD_LETTER_DIR).to_pylist()
    assert {row["example_id"]: row["reason"] for row in dead} == sample_input.bad_ids
    assert all(row["source_file"].endswith("part-bad.tfrecord") and row["raw"] for row in dead)
    manifest = json.load(open(os.path.join(stats_run.output_dir, contract.MANIFEST_FILE)))
    assert tuple(manifest) == contract.MANIFEST_KEYS
    assert (
        manifest["counts"]["records_in"] == manifest["counts"]["records_good"] + manifest["counts"]["records_rejected"]
    )
    assert sorted(manifest["input_files"]) == sample_input.files
    assert manifest["start_time"] <= manifest["end_time"]
    # The output holds the manifest and the one run it commits; the run only the declared outputs:
    # no scratch (tf.Transform temp, box cache, staging) left behind.
    out = stats_run.output_dir
    assert sorted(os.listdir(out)) == [contract.MANIFEST_FILE, contract.RUNS_DIR]
    assert [os.path.join(contract.RUNS_DIR, name) for name in os.listdir(os.path.join(out, contract.RUNS_DIR))] == [
        manifest["run_dir"]
    ]
    assert manifest["run_id"] == stats_run.result.run_id and manifest["run_dir"].endswith(manifest["run_id"])
    assert sorted(os.listdir(os.path.join(out, manifest["run_dir"]))) == sorted(
        [*contract.TABLE_SCHEMAS, contract.TRANSFORM_GRAPH_DIR, contract.SUMMARY_FILE, contract.SUMMARY_PARQUET_FILE]
    )
    # The manifest lists every file of the run, with its size on disk and (Parquet) its rows.
    on_disk = {}
    for folder, _, names in os.walk(os.path.join(out, manifest["run_dir"])):
        for name in names:
            path = os.path.join(folder, name)
            rows = pq.ParquetFile(path).metadata.num_rows if name.endswith(".parquet") else None
            on_disk[os.path.relpath(path, out)] = (os.path.getsize(path), rows)
    assert {f["path"]: (f["bytes"], f["rows"]) for f in manifest["files"]} == on_disk
    rows = {
        table: sum(rows for path, (_, rows) in on_disk.items() if path.startswith(f"{manifest['run_dir']}/{table}/"))
        for table in contract.TABLE_SCHEMAS
    }
    assert rows == {
        contract.VECTORS_DIR: summary["valid_boxes"],
        contract.EXAMPLES_DIR: len(sample_input.good_ids),
        contract.DEAD_LETTER_DIR: len(sample_input.bad_ids),
    }


def _grid_batch(ids, embeddings, labels):
    """A grid record batch in TFXIO's layout of the input schema (one list per feature per record)."""
    import pyarrow as pa

    return pa.RecordBatch.from_pydict(
        {
            contract.EXAMPLE_ID: pa.array([[i.encode()] for i in ids], pa.large_list(pa.large_binary())),
            contract.EMBEDDINGS: pa.array([e.reshape(-1).tolist() for e in embeddings], pa.large_list(pa.float32())),
            contract.LABELS: pa.array([l.tolist() for l in labels], pa.large_list(pa.int64())),
        }
    )


def test_box_batches_hold_the_valid_boxes_and_one_placeholder_per_empty_example(monkeypatch):
    from components.embedding_stats import boxes

    grid = contract.GridSpec(1, 2, 2, 1, dim=3)  # 4 boxes
    emb = np.arange(3 * 4 * 3, dtype=np.float32).reshape(3, 4, 3)
    emb[1, 2] = np.nan  # NaN in an empty box is allowed
    labels = np.array([[-1, 5, -1, 7], [-1, -1, -1, -1], [2, 2, 2, -1]])
    batch = next(boxes.to_box_batches(_grid_batch(["a", "b", "c"], emb, labels), grid))
    assert batch.schema.equals(contract.BOX_ARROW_SCHEMA)
    rows = {name: batch.column(name).flatten().to_pylist() for name in contract.BOX_ARROW_SCHEMA.names}
    assert rows[contract.BOX_EXAMPLE_ID] == [b"a", b"a", b"b", b"c", b"c", b"c"]
    assert rows[contract.BOX_SET] == [0, 0, 1, 2, 2, 2]
    assert rows[contract.BOX_INDEX] == [1, 3, 0, 0, 1, 2]
    assert rows[contract.BOX_LABEL] == [5, 7, contract.EMPTY_LABEL, 2, 2, 2]
    want = np.stack([emb[0, 1], emb[0, 3], np.zeros(3), emb[2, 0], emb[2, 1], emb[2, 2]])
    np.testing.assert_array_equal(np.reshape(rows[contract.BOX_EMBEDDING], (6, 3)), want)

    monkeypatch.setattr(boxes, "MAX_BOX_BATCH_BYTES", 1)  # cut after every example, never inside one
    cut = list(boxes.to_box_batches(_grid_batch(["a", "b", "c"], emb, labels), grid))
    assert [b.column(contract.BOX_EXAMPLE_ID).flatten().to_pylist() for b in cut] == [[b"a", b"a"], [b"b"], [b"c"] * 3]


def test_vectors_norms_and_z_scores_equal_numpy(stats_run, reference_input):
    vectors = ref.read_table(stats_run.output_dir, contract.VECTORS_DIR).to_pandas()
    grid = stats_run.grid
    expected = []
    for example_id, (emb, labels) in reference_input.items():
        for box in np.flatnonzero(labels >= 0):
            x = emb[box]
            expected.append(
                (
                    example_id,
                    *grid.box_position(int(box)),
                    labels[box],
                    np.sqrt((x * x).sum()),
                    np.abs(x).sum(),
                    np.abs(x).max(),
                    x / np.linalg.norm(x),
                )
            )
    want = pd.DataFrame(
        expected, columns=["example_id", "level", "row", "col", "anchor", "label", "l2", "l1", "max_abs", "unit"]
    )
    merged = want.merge(vectors, on=["example_id", "level", "row", "col", "anchor"], validate="one_to_one")
    assert len(merged) == len(want) == len(vectors)
    assert (merged["label_x"] == merged["label_y"]).all()
    np.testing.assert_allclose(merged["l2_norm"], merged["l2"], rtol=FLOAT_RTOL)
    np.testing.assert_allclose(merged["l1_norm"], merged["l1"], rtol=FLOAT_RTOL)
    np.testing.assert_allclose(merged["max_abs_y"], merged["max_abs_x"], rtol=FLOAT_RTOL)  # y: pipeline, x: numpy
    np.testing.assert_allclose(np.stack(merged["embedding"]), np.stack(merged["unit"]), atol=FLOAT_ATOL)
    # z over the whole dataset, population std.
    l2 = merged["l2"].to_numpy()
    np.testing.assert_allclose(merged["l2_norm_z"], (l2 - l2.mean()) / l2.std(), rtol=1e-3, atol=1e-4)


def test_norm_buckets_follow_independent_quantiles(stats_run):
    vectors = ref.read_table(stats_run.output_dir, contract.VECTORS_DIR).to_pandas()
    buckets = stats_run.options.view_as(EmbeddingStatsOptions).norm_buckets
    ordered = vectors.sort_values("l2_norm")
    assert (np.diff(ordered["l2_norm_bucket"].to_numpy()) >= 0).all(), "bucket must be monotone in the norm"
    counts = np.bincount(vectors["l2_norm_bucket"], minlength=buckets)
    assert len(counts) == buckets
    expected = len(vectors) / buckets
    assert np.all(np.abs(counts - expected) <= 0.2 * expected), counts
    boundaries = np.quantile(vectors["l2_norm"], np.arange(1, buckets) / buckets)
    independent = np.searchsorted(boundaries, vectors["l2_norm"], side="right")
    assert np.mean(independent != vectors["l2_norm_bucket"]) <= 0.02


def test_summary_matches_examples_and_brute_force_auc(stats_run, reference_input):
    summary = ref.read_summary(stats_run.output_dir)
    assert tuple(summary) == contract.SUMMARY_KEYS
    examples = ref.read_table(stats_run.output_dir, contract.EXAMPLES_DIR).to_pandas()
    for key, column in (
        ("pos_pairs", "n_pos_pairs"),
        ("neg_pairs", "n_neg_pairs"),
        ("triplets", "n_triplets"),
        ("active_triplets", "n_active_triplets"),
        ("valid_boxes", "n_boxes"),
    ):
        assert summary[key] == examples[column].sum(), key
    histogram = summary["histogram"]
    assert sum(histogram["positive"]) == examples["n_pos_pairs"].sum()
    assert sum(histogram["negative"]) == examples["n_neg_pairs"].sum()
    assert len(histogram["bin_edges"]) == len(histogram["positive"]) + 1
    positive, negative = [], []
    for emb, labels in reference_input.values():
        stats = ref.example_statistics(emb, labels, "euclidean")
        positive += stats["_pos"]
        negative += stats["_neg"]
    exact = ref.exact_auc(positive, negative)
    assert abs(summary["roc_auc"] - exact) <= summary["roc_auc_error_bound"] + 1e-9
    assert summary["roc_auc_error_bound"] < 0.05
    with_triplets = examples[examples["n_triplets"] > 0]
    assert summary["mean_batch_hard_loss"] == pytest.approx(with_triplets["batch_hard_loss"].mean(), rel=1e-5)
    identities = {int(label) for _, labels in reference_input.values() for label in labels if label >= 0}
    assert summary["identities"] == len(identities)
    norms = np.concatenate([np.linalg.norm(emb[labels >= 0], axis=1) for emb, labels in reference_input.values()])
    assert summary["l2_norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-5)
    assert summary["l2_norm"]["std"] == pytest.approx(norms.std(), rel=1e-4)
    assert summary["l2_norm"]["quantiles"]["p50"] == pytest.approx(np.quantile(norms, 0.5), rel=0.05)


@pytest.mark.parametrize("name", list(contract.TABLE_SCHEMAS))
def test_parquet_reads_back_with_declared_schema(stats_run, name):
    folder = ref.run_file(stats_run.output_dir, name)
    files = sorted(os.listdir(folder))
    assert files and all(f.endswith(".parquet") for f in files)
    for file in files:
        path = os.path.join(folder, file)
        assert pq.read_schema(path).remove_metadata().equals(contract.TABLE_SCHEMAS[name])
        frame = pd.read_parquet(path)
        assert list(frame.columns) == contract.TABLE_SCHEMAS[name].names


def test_summary_parquet_is_summary_json_as_one_row(stats_run):
    path = ref.run_file(stats_run.output_dir, contract.SUMMARY_PARQUET_FILE)
    table = pq.read_table(path)
    assert table.schema.remove_metadata().equals(contract.SUMMARY_SCHEMA) and table.num_rows == 1
    row = pd.read_parquet(path).iloc[0]
    summary = ref.read_summary(stats_run.output_dir)
    assert row["valid_boxes"] == summary["valid_boxes"] > 0
    assert row["rejected_by_reason"] == summary["rejected_by_reason"]
    assert row["roc_auc"] == summary["roc_auc"]
    assert dict(row["l2_norm"]["quantiles"]) == summary["l2_norm"]["quantiles"]
    assert list(row["histogram"]["positive"]) == summary["histogram"]["positive"]


def test_transform_graph_serves_the_same_preprocessing(stats_run, reference_input):
    import tensorflow as tf
    import tensorflow_transform as tft

    output = tft.TFTransformOutput(ref.run_file(stats_run.output_dir, contract.TRANSFORM_GRAPH_DIR))
    assert set(output.raw_feature_spec()) == {contract.BOX_EMBEDDING, contract.BOX_LABEL}  # one box, no grid
    _, (emb, labels) = next(iter(reference_input.items()))
    emb = emb[labels >= 0]  # any boxes: serving feeds boxes without labels
    features = {
        contract.BOX_EMBEDDING: tf.constant(emb, tf.float32),
        contract.BOX_LABEL: tf.zeros([len(emb)], tf.int64),
    }
    transformed = output.transform_features_layer()(features)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(transformed["embedding"].numpy(), unit, atol=FLOAT_ATOL)
    norms = np.concatenate([e[l >= 0] for e, l in reference_input.values()])
    norms = np.linalg.norm(norms.astype(np.float64), axis=1)
    z = (np.linalg.norm(emb, axis=1) - norms.mean()) / norms.std()
    np.testing.assert_allclose(transformed["l2_norm_z"].numpy(), z, atol=1e-4)


@pytest.fixture(scope="module")
def variant_runs(sample_input, tmp_path_factory):
    """Runs with --center, and with --no-normalize --distance squared, on the shared input."""
    runs = {}
    for name, flags in {"center": ["--center"], "raw_squared": ["--no-normalize", "--distance", "squared"]}.items():
        out = os.path.join(str(tmp_path_factory.mktemp(f"run_{name}")), "out")
        run_stats(sample_input.pattern, out, sample_input.grid, *flags)
        runs[name] = out
    return runs


def test_center_subtracts_the_dataset_mean_vector(variant_runs, reference_input):
    mean = np.concatenate([emb[labels >= 0] for emb, labels in reference_input.values()]).mean(axis=0)
    centered = {key: (emb - mean, labels) for key, (emb, labels) in reference_input.items()}
    vectors = ref.read_table(variant_runs["center"], contract.VECTORS_DIR).to_pandas()
    grid_boxes = {key: np.flatnonzero(labels >= 0) for key, (_, labels) in reference_input.items()}
    for key, group in vectors.groupby("example_id"):
        emb, _ = centered[key]
        want = emb[grid_boxes[key]]
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
        order = np.argsort(group["level"] * 10**6 + group["row"] * 10**4 + group["col"] * 100 + group["anchor"])
        np.testing.assert_allclose(np.stack(group["embedding"].to_numpy()[order]), want, atol=1e-4)
    rows = {row["example_id"]: row for row in ref.read_table(variant_runs["center"], contract.EXAMPLES_DIR).to_pylist()}
    for key, (emb, labels) in centered.items():
        _check_example_row(rows[key], ref.example_statistics(emb, labels, "euclidean"), key)


def test_no_normalize_uses_raw_vectors_and_a_data_sized_histogram(variant_runs, reference_input):
    out = variant_runs["raw_squared"]
    rows = {row["example_id"]: row for row in ref.read_table(out, contract.EXAMPLES_DIR).to_pylist()}
    for key, (emb, labels) in reference_input.items():
        _check_example_row(rows[key], ref.example_statistics(emb, labels, "squared", normalize=False), key)
    summary = ref.read_summary(out)
    largest = max(np.linalg.norm(emb[labels >= 0], axis=1).max() for emb, labels in reference_input.values())
    assert summary["histogram"]["bin_edges"][-1] == pytest.approx((2 * largest) ** 2, rel=1e-4)
    assert sum(summary["histogram"]["positive"]) == summary["pos_pairs"]


def test_an_examples_statistics_do_not_depend_on_its_batch_mates():
    """Bitwise: every runner batches differently, so results must not depend on the batch."""
    from components.embedding_stats.statistics import SET_SIZE_STEP, BoxSets, _PairStatisticsFn
    from components.loss_settings import LossSettings

    grid = contract.GridSpec(1, 6, 6, 3, dim=8)  # 108 boxes
    rng = np.random.default_rng(0)
    valid_boxes = [3, 40, 70, 100, 108, 0, SET_SIZE_STEP, SET_SIZE_STEP + 1]  # set sizes on both sides of the step
    rows = [max(1, k) for k in valid_boxes]  # an example without valid boxes has one placeholder row
    fed = rng.normal(size=(sum(rows), grid.dim)).astype(np.float32)
    labels = np.concatenate([rng.integers(0, 4, size=k) if k else [contract.EMPTY_LABEL] for k in valid_boxes])
    set_index = np.repeat(np.arange(len(rows)), rows)
    fn = _PairStatisticsFn(grid, loss=LossSettings(margin=0.2, distance="euclidean", normalize=True), bins=16)
    fn.setup()
    together, pos, neg = fn._loss_graph(BoxSets.from_rows(set_index, labels >= 0), fed, labels, 2.0)
    pos_alone, neg_alone = 0, 0
    for i in range(len(rows)):
        mine = set_index == i
        alone, p, q = fn._loss_graph(
            BoxSets.from_rows(set_index[mine], labels[mine] >= 0), fed[mine], labels[mine], 2.0
        )
        pos_alone, neg_alone = pos_alone + p, neg_alone + q
        for name in together:
            assert together[name][i] == alone[name][0] or (np.isnan(alone[name][0]) and np.isnan(together[name][i])), (
                i,
                name,
            )
    assert (pos == pos_alone).all() and (neg == neg_alone).all()
    assert together["n_boxes"].tolist() == valid_boxes
