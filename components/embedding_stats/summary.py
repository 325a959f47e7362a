"""Summary stage: per-batch partials, dead letters, label sets and norms -> one summary.json dict.

Everything is merged with fixed-size accumulators (histograms, Chan et al. moments, approximate
quantiles), so memory does not grow with the data.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from components.embedding_stats.common import DEAD, FED_MAX, LABEL_SET, NORMS, PARTIAL
from components.embedding_stats.statistics import histogram_edges, partial_summary
from components.loss_settings import LossSettings
from components.pair_auc import roc_auc_from_histograms
from schemas import contract

QUANTILE_POINTS = 101  # p00..p100 of the L2 norm; the summary keeps p01..p99


def _merge_norm(a, b):
    if a["count"] == 0:
        return dict(b)
    if b["count"] == 0:
        return dict(a)
    count = a["count"] + b["count"]
    delta = b["mean"] - a["mean"]
    return {
        "count": count,
        "mean": a["mean"] + delta * b["count"] / count,
        "m2": a["m2"] + b["m2"] + delta * delta * a["count"] * b["count"] / count,
        "min": min(a["min"], b["min"]),
        "max": max(a["max"], b["max"]),
    }


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
            np.zeros(0),
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
                "norm": _merge_norm(merged["norm"], other["norm"]),
            }
        return merged

    def extract_output(self, accumulator):
        return accumulator


def _norm_summary(norm, quantiles):
    count = norm["count"]
    if count == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None, "quantiles": {}}
    quantiles = list(quantiles or [])
    points = {}
    if len(quantiles) == QUANTILE_POINTS:
        points = {f"p{q:02d}": float(quantiles[q]) for q in range(1, QUANTILE_POINTS - 1)}
    return {
        "count": count,
        "mean": norm["mean"],
        "std": float(np.sqrt(max(norm["m2"] / count, 0.0))),
        "min": norm["min"],
        "max": norm["max"],
        "quantiles": points,
    }


def assemble_summary(_, partial, rejected_by_reason, identities, quantiles, edges) -> dict:
    """summary.json (keys: contract.SUMMARY_KEYS) from the merged accumulators."""
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
        "l2_norm": _norm_summary(partial["norm"], quantiles),
        "histogram": {
            "distance": edges["distance"],
            "bin_edges": [float(e) for e in edges["edges"]],
            "positive": [int(c) for c in partial["positive"]],
            "negative": [int(c) for c in partial["negative"]],
        },
        "roc_auc": auc,
        "roc_auc_error_bound": auc_bound,
    }
    assert tuple(summary) == contract.SUMMARY_KEYS, "summary keys drifted from the contract"
    return summary


class Summarize(beam.PTransform):
    """{PARTIAL, LABEL_SET, NORMS, FED_MAX, DEAD: PCollection} -> one summary dict, bounded memory throughout."""

    def __init__(self, *, loss: LossSettings, bins: int):
        super().__init__()
        self._loss = loss
        self._bins = bins

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
                edges=beam.pvalue.AsSingleton(self._edges(stats)),
            )
        )

    def _edges(self, stats):
        loss, bins = self._loss, self._bins

        def edges(fed_max_norm):
            return {"distance": loss.distance, "edges": histogram_edges(loss, fed_max_norm, bins).tolist()}

        return (
            stats[FED_MAX]
            | "FedMaxNorm" >> beam.CombineGlobally(lambda values: max(values, default=0.0))
            | "Edges" >> beam.Map(edges)
        )
