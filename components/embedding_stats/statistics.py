"""Pair statistics stage: transformed record batches -> per-example triplet statistics and tables.

Calls the loss graph (components.triplet_loss) on each example's valid boxes in a padded set
whose size depends on that example alone, so results are bitwise the same on every runner.
Emits the vectors/examples tables and small per-batch partials for the summary.
"""

from __future__ import annotations

import os
import sys
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from components import triplet_loss
from components.embedding_stats import preprocessing as pp
from components.embedding_stats.common import METRICS_NAMESPACE
from schemas import contract

SET_SIZE_STEP = 64  # padded set sizes: powers of two up to this, then multiples of it
MAX_PAIR_CELLS_PER_CALL = 1 << 23  # bound on examples * boxes^2 per loss-graph call (memory)
PROGRESS_EVERY_EXAMPLES = 500  # a progress line on stderr every this many examples (per worker)

VECTORS = "vectors"
EXAMPLES = "examples"
PARTIAL = "partial"
LABEL_SET = "labels"
NORMS = "norms"
FED_MAX = "fed_max_norm"  # the dataset's largest fed-vector norm (a constant of the transform graph)


def _column(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A transformed column as a flat numpy array (list columns flattened)."""
    column = batch.column(batch.schema.get_field_index(name))
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def padded_set_size(valid_boxes: int) -> int:
    """Boxes of the padded set an example is computed in: depends on that example alone.

    Next power of two up to SET_SIZE_STEP, then the next multiple of SET_SIZE_STEP, so an
    example's floating-point reductions never depend on which examples share its batch
    (identical results on every runner), with little padding (1690 boxes -> 1728).
    """
    count = max(1, int(valid_boxes))
    if count <= SET_SIZE_STEP:
        return 1 << (count - 1).bit_length()
    return -(-count // SET_SIZE_STEP) * SET_SIZE_STEP


def _compact(embeddings, labels, m):
    """Moves each example's valid boxes first into a padded set of `m` boxes (m >= valid boxes).

    [n, boxes, dim], [n, boxes] -> [n, m, dim], [n, m]; padding has label -1 and zero vectors.
    The loss graph is O(m^2): sparse grids get far cheaper than the full grid.
    """
    valid = labels >= 0
    counts = valid.sum(axis=1)
    order = np.argsort(~valid, axis=1, kind="stable")[:, :m]
    compact_labels = np.take_along_axis(labels, order, axis=1)
    compact = np.take_along_axis(embeddings, order[:, :, None], axis=1)
    padding = np.arange(order.shape[1])[None, :] >= counts[:, None]
    compact_labels[padding] = contract.EMPTY_LABEL
    compact[padding] = 0.0
    if order.shape[1] < m:  # the set is larger than the grid: pad further
        extra = m - order.shape[1]
        compact = np.pad(compact, [(0, 0), (0, extra), (0, 0)])
        compact_labels = np.pad(compact_labels, [(0, 0), (0, extra)], constant_values=contract.EMPTY_LABEL)
    return compact, compact_labels


def histogram_range(distance: str, normalize: bool, fed_max_norm: float) -> float:
    """Upper edge of the fixed distance bins: the largest distance two fed vectors can have."""
    bound = triplet_loss.max_distance(distance, normalize)
    if not np.isfinite(bound):
        diameter = 2.0 * float(fed_max_norm)
        bound = diameter if distance == "euclidean" else diameter * diameter
        bound = min(bound, triplet_loss.DISTANCE_CAP)
    return bound if bound > 0 else 1.0


def histogram_edges(distance: str, normalize: bool, fed_max_norm: float, bins: int) -> np.ndarray:
    return np.linspace(0.0, histogram_range(distance, normalize, fed_max_norm), bins + 1)


FAULT_ENV = "TRIPLETFLOW_TEST_KILL_WORKER_ONCE"  # test-only: path of a marker file; unset in production
KILLED_WORKER_EXIT_CODE = 17


def _maybe_kill_worker_once():
    """Test-only fault (issue #7): the first worker to get here creates the marker and dies (os._exit)."""
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(KILLED_WORKER_EXIT_CODE)


class _PairStatisticsFn(beam.DoFn):
    """Transformed record batch -> VECTORS table, EXAMPLES table, PARTIAL summary, LABEL_SET, NORMS.

    One compiled TF call per batch (built once per worker in setup) computes the loss graph's
    statistics and the per-batch histograms of positive/negative pair distances.
    """

    def __init__(self, grid, *, margin, distance, normalize, bins):
        self._grid = grid
        self._margin = margin
        self._distance = distance
        self._normalize = normalize
        self._bins = bins

    def setup(self):
        import tensorflow as tf

        margin, distance, normalize, bins = self._margin, self._distance, self._normalize, self._bins

        @tf.function(input_signature=[
            tf.TensorSpec([None, None, self._grid.dim], tf.float32),
            tf.TensorSpec([None, None], tf.int64),
            tf.TensorSpec([], tf.float32)], autograph=False)  # plain TF ops: no AutoGraph conversion (start-up)
        def statistics(embeddings, labels, upper_edge):
            return triplet_loss.triplet_statistics_and_histograms(
                embeddings, labels, bins=bins, upper_edge=upper_edge, margin=margin, distance=distance,
                normalize=normalize)

        self._statistics = statistics
        self._tf = tf
        self._examples_counter = Metrics.counter(METRICS_NAMESPACE, "examples")
        self._empty_counter = Metrics.counter(METRICS_NAMESPACE, "empty_examples")
        self._boxes_counter = Metrics.counter(METRICS_NAMESPACE, "valid_boxes")
        self._done = 0
        self._started = time.monotonic()

    def process(self, batch: pa.RecordBatch):
        _maybe_kill_worker_once()
        grid = self._grid
        n = batch.num_rows
        if n == 0:
            return
        ids = [value.decode("utf-8") for value in _column(batch, pp.OUT_EXAMPLE_ID)]
        labels = _column(batch, pp.OUT_LABELS).astype(np.int64).reshape(n, grid.boxes)
        fed = _column(batch, pp.OUT_EMBEDDING).astype(np.float32, copy=False).reshape(n, grid.boxes, grid.dim)
        fed_max_norm = float(_column(batch, pp.OUT_FED_MAX_NORM)[0])
        upper_edge = histogram_range(self._distance, self._normalize, fed_max_norm)

        stats, pos_hist, neg_hist = self._loss_graph(fed, labels, upper_edge)

        yield beam.pvalue.TaggedOutput(EXAMPLES, self._examples_table(ids, stats))
        valid = labels >= 0
        yield beam.pvalue.TaggedOutput(VECTORS, self._vectors_table(batch, ids, labels, fed, valid))
        l2 = _column(batch, pp.OUT_L2).reshape(n, grid.boxes)[valid].astype(np.float64)
        yield beam.pvalue.TaggedOutput(NORMS, l2.tolist())
        yield beam.pvalue.TaggedOutput(LABEL_SET, np.unique(labels[valid]).tolist())
        yield beam.pvalue.TaggedOutput(FED_MAX, fed_max_norm)
        yield beam.pvalue.TaggedOutput(PARTIAL, partial_summary(stats, l2, pos_hist, neg_hist))

        empty = int((stats["n_boxes"] == 0).sum())
        self._examples_counter.inc(n)
        self._empty_counter.inc(empty)
        self._boxes_counter.inc(int(valid.sum()))
        before, self._done = self._done, self._done + n
        if before // PROGRESS_EVERY_EXAMPLES != self._done // PROGRESS_EVERY_EXAMPLES:
            rate = self._done / max(time.monotonic() - self._started, 1e-9)
            print(f"EmbeddingStats: {self._done} examples done on this worker ({rate:.1f} examples/s)",
                  file=sys.stderr, flush=True)

    def _loss_graph(self, fed, labels, upper_edge):
        """Statistics [n] per name and pos/neg histograms [bins] of one batch, in calls of bounded size.

        Examples are grouped by their padded set size (`padded_set_size`, valid boxes first), one
        compiled call per group, cut into chunks of at most MAX_PAIR_CELLS_PER_CALL pair cells
        (chunk * m * m) so the graph's O(boxes^2) intermediates stay bounded whatever --batch-size is.
        """
        sizes = np.array([padded_set_size(c) for c in (labels >= 0).sum(axis=1)])
        stats, pos_hist, neg_hist = None, 0, 0
        for m in np.unique(sizes):
            members = np.flatnonzero(sizes == m)
            compact, compact_labels = _compact(fed[members], labels[members], int(m))
            chunk = max(1, MAX_PAIR_CELLS_PER_CALL // int(m * m))
            for first in range(0, len(members), chunk):
                part, pos, neg = self._statistics(
                    compact[first:first + chunk], compact_labels[first:first + chunk], np.float32(upper_edge))
                if stats is None:
                    stats = {name: np.zeros(len(labels), value.dtype.as_numpy_dtype) for name, value in part.items()}
                for name, value in part.items():
                    stats[name][members[first:first + chunk]] = value.numpy()
                pos_hist = pos_hist + pos.numpy()
                neg_hist = neg_hist + neg.numpy()
        return stats, pos_hist, neg_hist

    @staticmethod
    def _examples_table(ids, stats) -> pa.Table:
        arrays = [pa.array(ids, pa.string())]
        for name in contract.EXAMPLE_STATISTIC_COLUMNS:
            values = stats[name]
            if name in contract.EXAMPLE_COUNT_COLUMNS:
                arrays.append(pa.array(values.astype(np.int64), pa.int64()))
            else:
                undefined = stats[contract.NULL_WHEN_ZERO[name]] == 0 if name in contract.NULL_WHEN_ZERO else None
                arrays.append(pa.array(values.astype(np.float32), pa.float32(), mask=undefined))
        return pa.Table.from_arrays(arrays, schema=contract.EXAMPLES_SCHEMA)

    def _vectors_table(self, batch, ids, labels, fed, valid) -> pa.Table:
        grid = self._grid
        n = len(ids)
        example_index, box = np.nonzero(valid)
        level, row, col, anchor = grid.box_position(box)
        embedding = fed[example_index, box].reshape(-1)
        offsets = pa.array(np.arange(len(box) + 1, dtype=np.int32) * grid.dim, pa.int32())

        def per_box(name, dtype):
            return pa.array(_column(batch, name).reshape(n, grid.boxes)[valid].astype(dtype), pa.from_numpy_dtype(dtype))

        arrays = [
            pa.array(np.asarray(ids, dtype=object)[example_index], pa.string()),
            pa.array(level.astype(np.int32)), pa.array(row.astype(np.int32)),
            pa.array(col.astype(np.int32)), pa.array(anchor.astype(np.int32)),
            pa.array(labels[valid].astype(np.int64)),
            per_box(pp.OUT_L2, np.float32), per_box(pp.OUT_L1, np.float32), per_box(pp.OUT_MAX_ABS, np.float32),
            per_box(pp.OUT_L2_Z, np.float32), per_box(pp.OUT_BUCKET, np.int64),
            pa.ListArray.from_arrays(offsets, pa.array(embedding, pa.float32())),
        ]
        return pa.Table.from_arrays(arrays, schema=contract.VECTORS_SCHEMA)


def partial_summary(stats, l2, pos_hist, neg_hist) -> dict:
    """Bounded per-batch accumulator of the dataset summary (merged by SummaryCombineFn)."""
    has_triplet = stats["n_triplets"] > 0
    count = len(l2)
    mean = float(l2.mean()) if count else 0.0
    return {
        "examples": len(stats["n_boxes"]),
        "empty_examples": int((stats["n_boxes"] == 0).sum()),
        "valid_boxes": int(stats["n_boxes"].sum()),
        "pos_pairs": int(stats["n_pos_pairs"].sum()),
        "neg_pairs": int(stats["n_neg_pairs"].sum()),
        "triplets": int(stats["n_triplets"].sum()),
        "active_triplets": int(stats["n_active_triplets"].sum()),
        "examples_with_triplets": int(has_triplet.sum()),
        "loss_sums": {name: float(stats[name][has_triplet].astype(np.float64).sum())
                      for name in ("batch_all_loss", "batch_hard_loss", "semi_hard_loss")},
        # L2 norms of valid boxes: count, mean, sum of squared deviations (Chan et al. merge), extremes.
        "norm": {"count": count, "mean": mean, "m2": float(((l2 - mean) ** 2).sum()),
                 "min": float(l2.min()) if count else None, "max": float(l2.max()) if count else None},
        "positive": pos_hist.astype(np.int64),
        "negative": neg_hist.astype(np.int64),
    }


class PairStatistics(beam.PTransform):
    """Transformed record batches -> tagged VECTORS / EXAMPLES tables, PARTIAL summaries, LABEL_SET, NORMS."""

    def __init__(self, grid, *, margin, distance, normalize, bins):
        super().__init__()
        self._fn = _PairStatisticsFn(grid, margin=margin, distance=distance, normalize=normalize, bins=bins)

    def expand(self, batches):
        return batches | "LossGraph" >> beam.ParDo(self._fn).with_outputs(
            VECTORS, EXAMPLES, PARTIAL, LABEL_SET, NORMS, FED_MAX)
