"""Summary stage: per-batch partials, dead letters, label sets, norms, dataset constants -> one summary.json dict.

Everything is merged with fixed-size accumulators (counts, histograms, approximate quantiles), so
memory does not grow with the data. The norms' mean, std and extremes are tf.Transform's (the
dataset constants of the transform graph), not computed again.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from components.embedding_stats import preprocessing as pp
from components.embedding_stats.common import DEAD, LABEL_SET, NORMS, PARTIAL
from components.embedding_stats.statistics import histogram_edges, partial_summary
from components.loss_settings import LossSettings
from components.pair_auc import roc_auc_from_histograms
from schemas import contract

QUANTILE_POINTS = 101  # p00..p100 of the L2 norm; the summary keeps p01..p99


class SummaryCombineFn(beam.CombineFn):
    """Merges per-batch partial summaries; memory is O(histogram bins), whatever the data size."""

    def __init__(self, bins: int):
        self._bins = bins

    def create_accumulator(self):
        return partial_summary(
            {
                name: np.zeros(0, np.int64)
                for name in ("n_boxes", "n_pos_pairs", "n_neg_pairs", "n_triplets", "n_active_triplets")
            }
            | {name: np.zeros(0, np.float32) for name in ("batch_all_loss", "batch_hard_loss", "semi_hard_loss")},
            np.zeros(self._bins, np.int64),
            np.zeros(self._bins, np.int64),
        )

    def add_input(self, accumulator, partial):
        return self.merge_accumulators([accumulator, partial])

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        merged = accumulators[0]
        for other in accumulators[1:]:
            merged = {
                **{
                    key: merged[key] + other[key]
                    for key in (
                        "examples",
                        "empty_examples",
                        "valid_boxes",
                        "pos_pairs",
                        "neg_pairs",
                        "triplets",
                        "active_triplets",
                        "examples_with_triplets",
                        "positive",
                        "negative",
                    )
                },
                "loss_sums": {k: merged["loss_sums"][k] + other["loss_sums"][k] for k in merged["loss_sums"]},
            }
        return merged

    def extract_output(self, accumulator):
        return accumulator


def _norm_summary(count, constants, quantiles):
    """The L2 norms of the `count` valid boxes: tf.Transform's moments and extremes, Beam's percentiles."""
    if count == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "quantiles": {}}
    quantiles = list(quantiles or [])
    points = {}
    if len(quantiles) == QUANTILE_POINTS:
        points = {f"p{q:02d}": float(quantiles[q]) for q in range(1, QUANTILE_POINTS - 1)}
    return {
        "count": count,
        "mean": constants[pp.OUT_NORM_MEAN],
        "std": constants[pp.OUT_NORM_STD],
        "min": constants[pp.OUT_NORM_MIN],
        "max": constants[pp.OUT_NORM_MAX],
        "quantiles": points,
    }


def assemble_summary(_, partial, rejected_by_reason, identities, quantiles, constants, loss, bins) -> dict:
    """summary.json (keys: contract.SUMMARY_KEYS) from the merged accumulators and the dataset constants."""
    rejected = {reason: int(rejected_by_reason.get(reason, 0)) for reason in contract.Reason.ALL}
    with_triplets = partial["examples_with_triplets"]
    auc, auc_bound = roc_auc_from_histograms(partial["positive"], partial["negative"])
    summary = {
        "records_read": partial["examples"] + sum(rejected.values()),
        "records_good": partial["examples"],
        "records_rejected": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "examples": partial["examples"],
        "empty_examples": partial["empty_examples"],
        "valid_boxes": partial["valid_boxes"],
        "identities": int(identities),
        "pos_pairs": partial["pos_pairs"],
        "neg_pairs": partial["neg_pairs"],
        "triplets": partial["triplets"],
        "active_triplets": partial["active_triplets"],
        "active_triplet_fraction": partial["active_triplets"] / partial["triplets"] if partial["triplets"] else None,
        "mean_batch_all_loss": partial["loss_sums"]["batch_all_loss"] / with_triplets if with_triplets else None,
        "mean_batch_hard_loss": partial["loss_sums"]["batch_hard_loss"] / with_triplets if with_triplets else None,
        "mean_semi_hard_loss": partial["loss_sums"]["semi_hard_loss"] / with_triplets if with_triplets else None,
        "l2_norm": _norm_summary(partial["valid_boxes"], constants, quantiles),
        "histogram": {
            "distance": loss.distance,
            "bin_edges": [float(e) for e in histogram_edges(loss, constants[pp.OUT_FED_MAX_NORM], bins)],
            "positive": [int(c) for c in partial["positive"]],
            "negative": [int(c) for c in partial["negative"]],
        },
        "roc_auc": auc,
        "roc_auc_error_bound": auc_bound,
    }
    assert tuple(summary) == contract.SUMMARY_KEYS, "summary keys drifted from the contract"
    return summary


class Summarize(beam.PTransform):
    """{PARTIAL, LABEL_SET, NORMS, DEAD: PCollection} -> one summary dict, bounded memory throughout.

    `constants`: a PCollection of one dict of the dataset constants (norms.ReadDatasetConstants).
    """

    def __init__(self, *, loss: LossSettings, bins: int, constants):
        super().__init__()
        self._loss = loss
        self._bins = bins
        self._constants = constants

    def expand(self, inputs):
        stats, dead = inputs, inputs[DEAD]
        p = dead.pipeline
        partial = stats[PARTIAL] | "MergePartials" >> beam.CombineGlobally(SummaryCombineFn(self._bins))
        by_reason = (
            dead
            | "Reason" >> beam.Map(lambda row: row[contract.COL_REASON])
            | "CountReasons" >> beam.combiners.Count.PerElement()
            | "ReasonDict" >> beam.combiners.ToDict()
        )
        identities = (
            stats[LABEL_SET]
            | "Labels" >> beam.FlatMap(lambda labels: labels)
            | "DistinctLabels" >> beam.Distinct()
            | "CountLabels" >> beam.combiners.Count.Globally()
        )
        quantiles = stats[NORMS] | "NormQuantiles" >> beam.ApproximateQuantiles.Globally(
            QUANTILE_POINTS, input_batched=True
        )
        return (
            p
            | "One" >> beam.Create([None])
            | "Assemble"
            >> beam.Map(
                assemble_summary,
                partial=beam.pvalue.AsSingleton(partial),
                rejected_by_reason=beam.pvalue.AsSingleton(by_reason),
                identities=beam.pvalue.AsSingleton(identities),
                quantiles=beam.pvalue.AsSingleton(quantiles),
                constants=beam.pvalue.AsSingleton(self._constants),
                loss=self._loss,
                bins=self._bins,
            )
        )
