"""Stage-level tests: the pair-statistics and vectors stages on hand-built transformed batches, with Beam's assert_that.

The end-to-end tests check the tables a run writes; these check each composite transform alone,
against a brute-force numpy reference, so a failure names the stage.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from components.embedding_stats import preprocessing as pp
from components.embedding_stats.common import EXAMPLES, LABEL_SET, NORMS, one_per_row
from components.embedding_stats.norms import AnalyzeNorms, ReadDatasetConstants, WriteTransformGraph
from components.embedding_stats.statistics import PairStatistics
from components.embedding_stats.vectors import VectorsTable
from components.loss_settings import LossSettings
from schemas import contract
from tests import embedding_stats_reference as ref

GRID = contract.GridSpec(1, 3, 3, 2, dim=4)  # 18 boxes per image
LOSS = LossSettings(margin=0.2, distance="euclidean")
BINS = 8
# Inputs are float32 unit vectors; the graph forms distances from a float64 Gram matrix, so each
# distance is within a few float32 roundings (~1e-7 relative) of numpy's float64 value, and so are
# means and hinge sums over these few (< 200) terms: 1e-5 relative leaves two orders of slack.
REL, ABS = 1e-5, 1e-6


def _one_per_row(values, item_type) -> pa.LargeListArray:
    return one_per_row(pa.array(values, item_type))


def _one_vector_per_row(vectors: np.ndarray) -> pa.LargeListArray:
    """[rows, dim] -> list<float32> of one vector per row (TFXIO's layout of a [dim] feature)."""
    offsets = pa.array(np.arange(len(vectors) + 1) * GRID.dim, pa.int64())
    return pa.LargeListArray.from_arrays(offsets, pa.array(vectors.ravel(), pa.float32()))


def transformed_batch(examples: dict) -> pa.RecordBatch:
    """example_id -> (boxes [k] flat box indices, labels [k], fed [k, dim] float32): a transformed box batch."""
    ids, boxes, sets, labels, fed = [], [], [], [], []
    for index, (example_id, (box, label, vectors)) in enumerate(examples.items()):
        ids += [example_id.encode()] * len(box)
        boxes += list(box)
        sets += [index] * len(box)
        labels += list(label)
        fed.append(vectors)
    fed = np.concatenate(fed).astype(np.float32)
    l2 = np.linalg.norm(fed, axis=1).astype(np.float32)
    columns = {
        contract.BOX_EXAMPLE_ID: _one_per_row(ids, pa.large_binary()),
        contract.BOX_INDEX: _one_per_row(boxes, pa.int64()),
        contract.BOX_SET: _one_per_row(sets, pa.int64()),
        pp.OUT_LABEL: _one_per_row(labels, pa.int64()),
        pp.OUT_L2: _one_per_row(l2, pa.float32()),
        pp.OUT_L1: _one_per_row(np.abs(fed).sum(axis=1), pa.float32()),
        pp.OUT_MAX_ABS: _one_per_row(np.abs(fed).max(axis=1), pa.float32()),
        pp.OUT_L2_Z: _one_per_row(np.zeros(len(l2)), pa.float32()),
        pp.OUT_BUCKET: _one_per_row(np.zeros(len(l2)), pa.int64()),
        pp.OUT_EMBEDDING: _one_vector_per_row(fed),
    }
    return pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(5)

    def unit(k):
        x = rng.normal(size=(k, GRID.dim))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return {
        "three-identities": (np.array([0, 3, 4, 9, 12, 17]), np.array([0, 0, 1, 1, 2, 2]), unit(6)),
        "one-identity": (np.array([1, 2, 5]), np.array([7, 7, 7]), unit(3)),  # no negative: no triplet
        "many": (np.arange(0, 18, 2), np.array([0, 1, 0, 1, 2, 2, 0, 1, 2]), unit(9)),
    }


def test_pair_statistics_match_brute_force_per_example(examples):
    expected = {
        example_id: ref.example_statistics(
            fed.astype(np.float32).astype(np.float64), labels, LOSS.distance, LOSS.margin
        )
        for example_id, (_, labels, fed) in examples.items()
    }

    def check(tables):
        rows = [row for table in tables for row in table.to_pylist()]
        assert sorted(row[contract.COL_EXAMPLE_ID] for row in rows) == sorted(expected)
        for row in rows:
            example_id = row[contract.COL_EXAMPLE_ID]
            want = expected[example_id]
            for name in contract.EXAMPLE_STATISTIC_COLUMNS:
                if want[name] is None:
                    assert row[name] is None or row[name] == 0, (example_id, name, row[name])
                else:
                    assert row[name] == pytest.approx(want[name], rel=REL, abs=ABS), (example_id, name)

    with test_pipeline.TestPipeline() as p:
        constants = p | "Constants" >> beam.Create([{pp.OUT_FED_MAX_NORM: 1.0}])  # unit vectors
        batches = p | "Batches" >> beam.Create([transformed_batch(examples)])
        stats = batches | PairStatistics(GRID, loss=LOSS, bins=BINS, constants=constants)
        assert_that(stats[EXAMPLES], check, label="Examples")
        all_labels = sorted({int(v) for _, labels, _ in examples.values() for v in labels})
        assert_that(
            stats[LABEL_SET] | beam.FlatMap(lambda labels: labels) | beam.Distinct(),
            equal_to(all_labels),
            label="Labels",
        )
        assert_that(
            stats[NORMS] | beam.FlatMap(lambda norms: norms) | beam.combiners.Count.Globally(),
            equal_to([sum(len(box) for box, _, _ in examples.values())]),
            label="Norms",
        )


def test_vectors_table_places_each_box_on_its_grid(examples):
    def position(box):  # row-major [levels, height, width, anchors], by hand
        rest, anchor = divmod(int(box), GRID.anchors)
        rest, col = divmod(rest, GRID.width)
        level, row = divmod(rest, GRID.height)
        return level, row, col, anchor

    expected = [
        (example_id, *position(box), int(label))
        for example_id, (boxes, labels, _) in examples.items()
        for box, label in zip(boxes, labels)
    ]
    columns = (
        contract.COL_EXAMPLE_ID,
        contract.COL_LEVEL,
        contract.COL_ROW,
        contract.COL_COL,
        contract.COL_ANCHOR,
        contract.COL_LABEL,
    )
    with test_pipeline.TestPipeline() as p:
        tables = p | beam.Create([transformed_batch(examples)]) | VectorsTable(GRID)
        rows = tables | beam.FlatMap(lambda table: [tuple(row[c] for c in columns) for row in table.to_pylist()])
        assert_that(rows, equal_to(expected))
        assert_that(
            tables | beam.Map(lambda table: table.schema.equals(contract.VECTORS_SCHEMA)),
            equal_to([True]),
            label="Schema",
        )


def box_batch(labels, embeddings) -> pa.RecordBatch:
    """Raw box rows (contract.BOX_ARROW_SCHEMA), one example per row: labels [rows], embeddings [rows, dim]."""
    rows = len(labels)
    columns = [
        _one_per_row([f"example-{i}".encode() for i in range(rows)], pa.large_binary()),
        _one_per_row(np.zeros(rows, np.int64), pa.int64()),
        _one_per_row(np.arange(rows), pa.int64()),
        _one_per_row(labels, pa.int64()),
        _one_vector_per_row(embeddings),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=contract.BOX_ARROW_SCHEMA)


@pytest.mark.parametrize("normalize", [True, False])
def test_dataset_constants_are_the_valid_boxes_moments_read_from_the_written_graph(normalize, tmp_path):
    rng = np.random.default_rng(11)
    embeddings = (rng.normal(size=(40, GRID.dim)) * rng.uniform(0.5, 3.0, size=(40, 1))).astype(np.float32)
    labels = rng.integers(0, 4, size=40)
    labels[::7] = contract.EMPTY_LABEL  # placeholder rows of empty examples: not in the statistics
    # A huge placeholder row: it would dominate the max and the moments if it were counted.
    embeddings[0] = 1e6
    valid_norms = np.linalg.norm(embeddings[labels >= 0].astype(np.float64), axis=1)
    expected = {
        pp.OUT_NORM_MEAN: valid_norms.mean(),
        pp.OUT_NORM_STD: valid_norms.std(),
        pp.OUT_NORM_MIN: valid_norms.min(),
        pp.OUT_NORM_MAX: valid_norms.max(),
        pp.OUT_FED_MAX_NORM: 1.0 if normalize else valid_norms.max(),
    }

    def check(found):
        # Each norm is a float32 sum of 4 squares (a few float32 roundings, ~1e-7 relative) and each
        # constant is cast to float32 once; std = sqrt(var) amplifies the mean's rounding by
        # mean^2 / var (< 10 here): 1e-5 relative holds with an order of slack.
        (constants,) = found
        assert set(constants) == set(pp.DATASET_CONSTANTS)
        for name, value in expected.items():
            assert constants[name] == pytest.approx(value, rel=1e-5), name

    graph_dir = str(tmp_path / "transform_graph")
    with test_pipeline.TestPipeline() as p:
        # Two batches: the analyzers merge their partial results.
        batches = p | beam.Create([box_batch(labels[:25], embeddings[:25]), box_batch(labels[25:], embeddings[25:])])
        transform_fn = batches | AnalyzeNorms(
            GRID, normalize=normalize, center=False, norm_buckets=4, batch_size=16, temp_dir=str(tmp_path / "tmp")
        )
        written = p | WriteTransformGraph(GRID, transform_fn, graph_dir)
        assert_that(written | ReadDatasetConstants(graph_dir), check)
