"""Pair statistics stage: transformed box record batches -> per-example triplet statistics and tables.

Regroups each batch's box rows into their examples and calls the loss graph
(components.triplet_loss) on each example's valid boxes in a padded set whose size depends
on that example alone, so an example's results do not depend on its batch mates: bit for bit
on one machine (tested), within float32 rounding bounds across CPUs (kernels differ by
instruction set). Emits the
examples table and small per-batch partials for the summary (the vectors table: vectors.py).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from components import triplet_loss
from components.embedding_stats import preprocessing as pp
from components.embedding_stats.common import (
    EXAMPLES,
    LABEL_SET,
    METRICS_NAMESPACE,
    NORMS,
    PARTIAL,
    column_array,
)
from components.loss_settings import DISTANCE_CAP, LossSettings
from schemas import contract

# The loss graph's statistics are the examples table's columns, by name and in order.
if triplet_loss.STATISTIC_NAMES != contract.EXAMPLE_STATISTIC_COLUMNS:
    raise ImportError("the loss graph's STATISTIC_NAMES and the contract's EXAMPLE_STATISTIC_COLUMNS differ")

SET_SIZE_STEP = 16  # padded set sizes: powers of two up to this, then multiples of it
MAX_PAIR_CELLS_PER_CALL = 1 << 23  # bound on examples * boxes^2 per loss-graph call (memory)
PROGRESS_EVERY_EXAMPLES = 500  # a progress line on stderr every this many examples (per worker)


def padded_set_size(valid_boxes: int) -> int:
    """Boxes of the padded set an example is computed in: depends on that example alone.

    Next power of two up to SET_SIZE_STEP, then the next multiple of SET_SIZE_STEP, so an
    example's floating-point reductions never depend on which examples share its batch
    (bit for bit on one machine, whatever the runner), with little padding (85 boxes -> 96, 1690 -> 1696).
    """
    count = max(1, int(valid_boxes))
    if count <= SET_SIZE_STEP:
        return 1 << (count - 1).bit_length()
    return -(-count // SET_SIZE_STEP) * SET_SIZE_STEP


@dataclasses.dataclass(frozen=True)
class BoxSets:
    """How the rows of a box batch form examples (rows of one example adjacent, valid boxes first).

    starts [examples]: first row of each example; valid_counts [examples]; example_of_row and
    slot [rows]: the row's example and its position in that example's padded set.
    """

    starts: np.ndarray
    valid_counts: np.ndarray
    example_of_row: np.ndarray
    slot: np.ndarray

    @classmethod
    def from_rows(cls, set_index: np.ndarray, valid: np.ndarray) -> "BoxSets":
        rows = len(set_index)
        starts = np.flatnonzero(np.r_[True, set_index[1:] != set_index[:-1]]) if rows else np.zeros(0, np.int64)
        example_of_row = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, rows]))
        valid_counts = np.add.reduceat(valid.astype(np.int64), starts) if rows else np.zeros(0, np.int64)
        return cls(starts, valid_counts, example_of_row, np.arange(rows) - starts[example_of_row])

    def padded(self, embedding, labels, members, m):
        """The valid rows of examples `members` as padded sets [len(members), m, dim], [len(members), m].

        Padding has label -1 and zero vectors. The loss graph is O(m^2): sparse grids cost their valid boxes.
        """
        local = np.full(len(self.starts), -1)
        local[members] = np.arange(len(members))
        rows = np.flatnonzero((labels >= 0) & (local[self.example_of_row] >= 0))
        sets = np.zeros((len(members), m, embedding.shape[1]), np.float32)
        set_labels = np.full((len(members), m), contract.EMPTY_LABEL, np.int64)
        where = local[self.example_of_row[rows]], self.slot[rows]
        sets[where] = embedding[rows]
        set_labels[where] = labels[rows]
        return sets, set_labels


def histogram_range(loss: LossSettings, fed_max_norm: float) -> float:
    """Upper edge of the fixed distance bins: the largest distance two fed vectors can have."""
    bound = loss.max_distance
    if not np.isfinite(bound):
        diameter = 2.0 * float(fed_max_norm)
        bound = diameter if loss.distance == "euclidean" else diameter * diameter
        bound = min(bound, DISTANCE_CAP)
    return bound if bound > 0 else 1.0


def histogram_edges(loss: LossSettings, fed_max_norm: float, bins: int) -> np.ndarray:
    return np.linspace(0.0, histogram_range(loss, fed_max_norm), bins + 1)


class _PairStatisticsFn(beam.DoFn):
    """Transformed box record batch, dataset constants -> EXAMPLES table, PARTIAL summary, LABEL_SET, NORMS.

    One compiled TF call per batch (built once per worker in setup) computes the loss graph's
    statistics and the per-batch histograms of positive/negative pair distances.
    """

    def __init__(self, grid, *, loss: LossSettings, bins: int):
        self._grid = grid
        self._loss = loss
        self._bins = bins

    def setup(self):
        import tensorflow as tf

        loss, bins = self._loss, self._bins

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, self._grid.dim], tf.float32),
                tf.TensorSpec([None, None], tf.int64),
                tf.TensorSpec([], tf.float32),
            ],
            autograph=False,
        )  # plain TF ops: no AutoGraph conversion (start-up)
        def statistics(embeddings, labels, upper_edge):
            return triplet_loss.triplet_statistics_and_histograms(
                embeddings, labels, bins=bins, upper_edge=upper_edge, **loss.graph_kwargs()
            )

        self._statistics = statistics
        self._tf = tf
        self._examples_counter = Metrics.counter(METRICS_NAMESPACE, "examples")
        self._empty_counter = Metrics.counter(METRICS_NAMESPACE, "empty_examples")
        self._boxes_counter = Metrics.counter(METRICS_NAMESPACE, "valid_boxes")
        self._done = 0
        self._started = time.monotonic()

    def process(self, batch: pa.RecordBatch, constants: dict):
        if batch.num_rows == 0:
            return
        labels = column_array(batch, pp.OUT_LABEL).astype(np.int64)  # [rows]
        valid = labels >= 0
        sets = BoxSets.from_rows(column_array(batch, contract.BOX_SET), valid)
        n = len(sets.starts)
        ids = [value.decode("utf-8") for value in column_array(batch, contract.BOX_EXAMPLE_ID)[sets.starts]]
        fed = column_array(batch, pp.OUT_EMBEDDING).astype(np.float32, copy=False).reshape(batch.num_rows, -1)
        upper_edge = histogram_range(self._loss, constants[pp.OUT_FED_MAX_NORM])

        stats, pos_hist, neg_hist = self._loss_graph(sets, fed, labels, upper_edge)

        yield beam.pvalue.TaggedOutput(EXAMPLES, self._examples_table(ids, stats))
        l2 = column_array(batch, pp.OUT_L2)[valid].astype(np.float64)
        yield beam.pvalue.TaggedOutput(NORMS, l2.tolist())
        yield beam.pvalue.TaggedOutput(LABEL_SET, np.unique(labels[valid]).tolist())
        yield beam.pvalue.TaggedOutput(PARTIAL, partial_summary(stats, pos_hist, neg_hist))

        empty = int((stats["n_boxes"] == 0).sum())
        self._examples_counter.inc(n)
        self._empty_counter.inc(empty)
        self._boxes_counter.inc(int(valid.sum()))
        before, self._done = self._done, self._done + n
        if before // PROGRESS_EVERY_EXAMPLES != self._done // PROGRESS_EVERY_EXAMPLES:
            rate = self._done / max(time.monotonic() - self._started, 1e-9)
            print(
                f"EmbeddingStats: {self._done} examples done on this worker ({rate:.1f} examples/s)",
                file=sys.stderr,
                flush=True,
            )

    def _loss_graph(self, sets: BoxSets, fed, labels, upper_edge):
        """Statistics [examples] per name and pos/neg histograms [bins] of one batch, in calls of bounded size.

        Examples are grouped by their padded set size (`padded_set_size`), one compiled call per
        group, cut into chunks of at most MAX_PAIR_CELLS_PER_CALL pair cells (chunk * m * m) so
        the graph's O(boxes^2) intermediates stay bounded whatever --batch-size is.
        fed [rows, dim] and labels [rows] are the batch's box rows.
        """
        n = len(sets.starts)
        sizes = np.array([padded_set_size(c) for c in sets.valid_counts])
        stats, pos_hist, neg_hist = None, 0, 0
        for m in np.unique(sizes):
            members = np.flatnonzero(sizes == m)
            chunk = max(1, MAX_PAIR_CELLS_PER_CALL // int(m * m))
            for first in range(0, len(members), chunk):
                part_members = members[first : first + chunk]
                padded, padded_labels = sets.padded(fed, labels, part_members, int(m))
                part, pos, neg = self._statistics(padded, padded_labels, np.float32(upper_edge))
                if stats is None:
                    stats = {name: np.zeros(n, value.dtype.as_numpy_dtype) for name, value in part.items()}
                for name, value in part.items():
                    stats[name][part_members] = value.numpy()
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


def partial_summary(stats, pos_hist, neg_hist) -> dict:
    """Bounded per-batch accumulator of the dataset summary (merged by SummaryCombineFn)."""
    has_triplet = stats["n_triplets"] > 0
    return {
        "examples": len(stats["n_boxes"]),
        "empty_examples": int((stats["n_boxes"] == 0).sum()),
        "valid_boxes": int(stats["n_boxes"].sum()),
        "pos_pairs": int(stats["n_pos_pairs"].sum()),
        "neg_pairs": int(stats["n_neg_pairs"].sum()),
        "triplets": int(stats["n_triplets"].sum()),
        "active_triplets": int(stats["n_active_triplets"].sum()),
        "examples_with_triplets": int(has_triplet.sum()),
        "loss_sums": {
            name: float(stats[name][has_triplet].astype(np.float64).sum())
            for name in ("batch_all_loss", "batch_hard_loss", "semi_hard_loss")
        },
        "positive": pos_hist.astype(np.int64),
        "negative": neg_hist.astype(np.int64),
    }


class PairStatistics(beam.PTransform):
    """Transformed box record batches -> tagged EXAMPLES tables, PARTIAL summaries, LABEL_SET, NORMS.

    `constants`: a PCollection of one dict of the dataset constants (norms.ReadDatasetConstants).
    """

    def __init__(self, grid, *, loss: LossSettings, bins: int, constants):
        super().__init__()
        self._fn = _PairStatisticsFn(grid, loss=loss, bins=bins)
        self._constants = constants

    def expand(self, batches):
        constants = beam.pvalue.AsSingleton(self._constants)
        return batches | "LossGraph" >> beam.ParDo(self._fn, constants).with_outputs(
            EXAMPLES, PARTIAL, LABEL_SET, NORMS
        )
