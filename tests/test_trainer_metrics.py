"""Trainer validation figures against an independent brute-force numpy reference and scikit-learn."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from components.pair_auc import roc_auc_from_histograms
from components.trainer import metrics

MARGIN = 0.3


def _reference(sets, margin):
    """Brute force over each set's valid boxes: losses, pair distances, recall@1."""
    losses = {name: [] for name in metrics.LOSS_FIGURES}
    pos, neg = [], []
    hits = boxes = 0
    all_hinges = []
    for emb, lab in sets:
        v = lab >= 0
        x, y = emb[v].astype(np.float64), lab[v]
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        n = len(y)
        for i, j in itertools.combinations(range(n), 2):
            (pos if y[i] == y[j] else neg).append(d[i, j])
        for i in range(n):
            others = [j for j in range(n) if j != i]
            if others:
                boxes += 1
                hits += y[min(others, key=lambda j: d[i, j])] == y[i]
        hinges, hard, semi = [], [], []
        for a in range(n):
            ps = [p for p in range(n) if p != a and y[p] == y[a]]
            ns = [m for m in range(n) if y[m] != y[a]]
            if ps and ns:
                hard.append(max(0.0, max(d[a, ps]) - min(d[a, ns]) + margin))
            for p in ps:
                hinges += [d[a, p] - d[a, m] + margin for m in ns]
                if ns:
                    farther = [d[a, m] for m in ns if d[a, m] > d[a, p]]
                    chosen = min(farther) if farther else max(d[a, ns])
                    semi.append(max(0.0, d[a, p] - chosen + margin))
        all_hinges += [max(0.0, h) for h in hinges]
        if hinges:
            active = [h for h in hinges if h > 0]
            losses["batch_all_loss"].append(np.mean(active) if active else 0.0)
            losses["batch_hard_loss"].append(np.mean(hard))
            losses["semi_hard_loss"].append(np.mean(semi))
    return losses, np.array(pos), np.array(neg), hits / boxes, all_hinges


def _padded_sets(rng, n_sets, max_boxes, dim, identities):
    emb = rng.normal(size=(n_sets, max_boxes, dim)).astype(np.float32)
    lab = rng.integers(0, identities, size=(n_sets, max_boxes))
    lab[rng.random(lab.shape) < 0.3] = -1  # empty boxes / padding
    lab[0, :] = -1  # a set with no box at all
    lab[1, :] = -1
    lab[1, :2] = [0, 1]  # a set with boxes but no triplet
    emb[lab < 0] = np.nan  # padding values must never be read
    return emb, lab


def test_figures_match_brute_force_reference():
    rng = np.random.default_rng(7)
    emb, lab = _padded_sets(rng, n_sets=9, max_boxes=12, dim=5, identities=3)
    figures = metrics.ValidationFigures(MARGIN, "euclidean")
    for start in range(0, len(emb), 4):  # several batches accumulate
        figures.update(emb[start : start + 4], lab[start : start + 4])
    result = figures.result()

    losses, pos, neg, recall, hinges = _reference(list(zip(emb, lab)), MARGIN)
    assert result["examples"] == len(emb)
    assert result["examples_with_triplets"] == len(losses["batch_all_loss"]) == 7
    for name in metrics.LOSS_FIGURES:
        assert result[f"mean_{name}"] == pytest.approx(np.mean(losses[name]), abs=1e-5)
    assert result["triplets"] == len(hinges)
    assert result["mean_triplet_hinge"] == pytest.approx(np.mean(hinges), abs=1e-5)
    assert result["active_triplet_fraction"] == pytest.approx(np.mean(np.array(hinges) > 0))
    assert (result["pos_pairs"], result["neg_pairs"]) == (len(pos), len(neg))
    reference_auc = roc_auc_score(np.r_[np.zeros(len(pos)), np.ones(len(neg))], np.r_[pos, neg])
    assert 0.0 <= result["roc_auc_error_bound"] < 0.01
    assert abs(result["roc_auc"] - reference_auc) <= result["roc_auc_error_bound"] + 1e-9
    assert result["recall_at_1"] == pytest.approx(recall)


def test_auc_from_histograms_hand_computed():
    # pos in bins 0 and 2, neg in bins 1 and 2: pairs (p0,n1) win, (p0,n2) win, (p2,n1) lose, (p2,n2) tie.
    auc, bound = roc_auc_from_histograms([1, 0, 1], [0, 1, 1])
    assert auc == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert bound == pytest.approx(0.5 * 1 / 4)
    assert roc_auc_from_histograms([0, 0], [3, 1]) == (None, None)


def test_no_sets_is_an_error():
    with pytest.raises(ValueError, match="no validation sets"):
        metrics.ValidationFigures(MARGIN, "euclidean").result()
