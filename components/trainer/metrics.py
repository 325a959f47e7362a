"""Validation figures of a head on padded sets: mean triplet losses, ROC AUC, recall@1.

Per image (the statistics' convention): the losses are the loss graph's per-set values
averaged over sets having a triplet, plus the mean hinge over all triplets; ROC AUC is
P(negative pair distance > positive pair distance) (ties count 1/2) from fixed-bin
histograms, so memory stays bounded, with the largest error the binning can cause;
recall@1 is the fraction of valid boxes (with at least one other valid box in their set)
whose nearest other valid box has the same label.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from components import triplet_loss
from components.pair_auc import roc_auc_from_histograms

AUC_BINS = 4096  # histogram bins over [0, max_distance] for the ROC AUC
LOSS_FIGURES = ("batch_all_loss", "batch_hard_loss", "semi_hard_loss")


def make_batch_figures(margin: float, distance: str):
    """A tf.function: (embeddings [b, n, d], labels [b, n]) -> dict of per-batch sums and histograms."""
    top = triplet_loss.max_distance(distance, True)

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, None], tf.float32), tf.TensorSpec([None, None], tf.int64)],
        autograph=False,
    )
    def batch_figures(embeddings, labels):
        g = triplet_loss.pair_geometry(embeddings, labels, distance=distance, normalize=True)  # once, for all
        stats, pos_hist, neg_hist = triplet_loss.statistics_and_histograms(
            g, labels, bins=AUC_BINS, upper_edge=top, margin=margin, distance=distance, normalize=True
        )
        has_triplet = stats["n_triplets"] > 0
        out = {
            "examples": tf.size(has_triplet, tf.int64),
            "examples_with_triplets": tf.reduce_sum(tf.cast(has_triplet, tf.int64)),
        }
        for name in LOSS_FIGURES:
            out[name] = tf.reduce_sum(tf.where(has_triplet, stats[name], 0.0))
        out["triplet_loss_sum"] = tf.reduce_sum(tf.cast(stats["triplet_loss_sum"], tf.float64))
        out["n_triplets"] = tf.reduce_sum(stats["n_triplets"])
        out["n_active_triplets"] = tf.reduce_sum(stats["n_active_triplets"])
        out["pos_hist"], out["neg_hist"] = pos_hist, neg_hist
        # recall@1: nearest other valid box (ties: lowest index), from the same distances and masks.
        other = tf.logical_or(g.pos, g.neg)  # [b, n, n]: pairs of distinct valid boxes
        masked = tf.where(other, g.dist, tf.fill(tf.shape(g.dist), np.inf))
        nearest = tf.argmin(masked, axis=-1)
        hit = tf.equal(tf.gather(labels, nearest, batch_dims=1), labels)
        has_other = tf.reduce_any(other, axis=-1)
        out["recall_boxes"] = tf.reduce_sum(tf.cast(has_other, tf.int64))
        out["recall_hits"] = tf.reduce_sum(tf.cast(tf.logical_and(has_other, hit), tf.int64))
        return out

    return batch_figures


class ValidationFigures:
    """Accumulates figures over batches of head outputs; `result()` gives the JSON document."""

    def __init__(self, margin: float, distance: str):
        self._fn = make_batch_figures(margin, distance)
        self._sums = None

    def update(self, embeddings, labels):
        embeddings = tf.convert_to_tensor(embeddings, tf.float32)
        labels = tf.cast(labels, tf.int64)
        values = {k: v.numpy() for k, v in self._fn(embeddings, labels).items()}
        if self._sums is None:
            self._sums = values
        else:
            for key, value in values.items():
                self._sums[key] = self._sums[key] + value

    def result(self) -> dict:
        s = self._sums
        if s is None:
            raise ValueError("no validation sets: raise --validation-fraction or add data")
        with_triplets = int(s["examples_with_triplets"])
        out = {"examples": int(s["examples"]), "examples_with_triplets": with_triplets}
        for name in LOSS_FIGURES:
            out[f"mean_{name}"] = float(s[name]) / with_triplets if with_triplets else None
        triplets = int(s["n_triplets"])
        out["triplets"] = triplets
        out["active_triplet_fraction"] = int(s["n_active_triplets"]) / triplets if triplets else None
        # Mean hinge over all triplets (inactive ones count 0): falls as the embedding improves,
        # unlike batch_all's mean over active triplets only.
        out["mean_triplet_hinge"] = float(s["triplet_loss_sum"]) / triplets if triplets else None
        auc, bound = roc_auc_from_histograms(s["pos_hist"], s["neg_hist"])
        out.update(
            pos_pairs=int(s["pos_hist"].sum()),
            neg_pairs=int(s["neg_hist"].sum()),
            roc_auc=auc,
            roc_auc_error_bound=bound,
            recall_boxes=int(s["recall_boxes"]),
            recall_at_1=int(s["recall_hits"]) / int(s["recall_boxes"]) if s["recall_boxes"] else None,
        )
        return out


def evaluate(head, dataset, margin: float, distance: str) -> dict:
    """Validation figures of `head` (a callable [b, n, dim] -> normalized) over a padded dataset."""
    figures = ValidationFigures(margin, distance)
    for batch in dataset:
        figures.update(head(batch["embeddings"]), batch["labels"])
    return figures.result()
