"""ROC AUC of pair distances from fixed-bin histograms, with the largest error the binning can cause.

numpy only: EmbeddingStats' summary and the Trainer's validation both bin positive and negative
pair distances (the loss graph's histograms) and read the AUC from the bins, in bounded memory.
"""

from __future__ import annotations

import numpy as np


def roc_auc_from_histograms(positive, negative):
    """(AUC, error bound) of P(negative distance > positive distance) from binned counts.

    Pairs in different bins are ordered exactly; a (positive, negative) couple in the same
    bin is counted as 1/2 (as ties are in the Mann-Whitney AUC). Its true contribution lies
    in [0, 1], so the error is at most 1/2 * sum_b pos_b * neg_b / (P * N). (None, None) when
    there is no positive or no negative pair.
    """
    positive = np.asarray(positive, np.float64)
    negative = np.asarray(negative, np.float64)
    total = positive.sum() * negative.sum()
    if total == 0:
        return None, None
    positives_below = np.concatenate([[0.0], np.cumsum(positive)[:-1]])  # positives in lower bins
    same_bin = float((positive * negative).sum())
    auc = (float((negative * positives_below).sum()) + 0.5 * same_bin) / total
    return auc, 0.5 * same_bin / total
