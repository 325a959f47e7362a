"""The first seed's story: a Gram-matrix ("linear") loss runs off to -inf; the bounded one does not.

Seed input: 2 batches of 2 x 13 x 13 grids with 5 anchor boxes of 100 numbers each,
reshaped to 2 sets of 1,690 boxes; 36 boxes per set are labelled 1, the rest 0.
The seed trained a Dense(100) head with plain gradient descent (lr 1e-3) on

    loss = mean_b( mean(G * T) - mean(G * (1 - T)) ) + alpha,  G = h h^T,  T[b, i, j] = label[b, i]

called with ``cos_norm=True``, which divides G by ``scale + 1e-6`` where scale is 0 for
label-0 rows (so those entries are multiplied by 1e6).  It printed -3e5, -2e12, -1e19,
-8e25, -inf, nan.  Without that "normalisation" the loss is still unbounded below (it is
linear in G, so scaling the head by c scales it by c^2), it just gets there more slowly.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from components.triplet_loss import max_distance, triplet_loss
from tests.test_triplet_loss import SLACK, U32, assert_well_conditioned, distance_error, gamma

ALPHA = 0.1  # the seed's alpha
DIM = 100


def seed_data():
    aa = np.zeros((2, 2, 13, 13, 5, DIM), np.float32)
    aa[..., :2, :2] = 1
    aa[..., 0, 1:3, 1:2] = 1
    bb = np.zeros((2, 2, 13, 13, 5), np.float32)
    bb[:, :, :3, :3, :2] = 1
    return tf.constant(aa.reshape(2, -1, DIM)), bb.reshape(2, -1)


def dense_head(seed=0):
    """A Dense(100) layer as variables: Glorot-uniform kernel, zero bias (Keras defaults)."""
    limit = np.sqrt(6.0 / (DIM + DIM))
    kernel = np.random.default_rng(seed).uniform(-limit, limit, (DIM, DIM)).astype(np.float32)
    return tf.Variable(kernel), tf.Variable(tf.zeros([DIM]))


def seed_loss(h, labels, cos_norm):
    """The seed's triple_loss, transcribed from TF1 (tr_tiled[b, i, j] = label[b, i])."""
    n = tf.shape(labels)[1]
    tr_tiled = tf.tile(labels[:, :, None], [1, 1, n])
    embed_prod = tf.matmul(h, h, transpose_b=True)
    if cos_norm:
        tr_norm = tf.reduce_sum(tf.sqrt(tr_tiled * tr_tiled), -1)
        tr_norm_tiled = tf.tile(tr_norm[:, :, None], [1, 1, n])
        scale = tf.matmul(tr_norm_tiled, tr_norm_tiled, transpose_b=True)
        embed_prod = embed_prod / (scale + 0.000001)
    same = tf.reduce_mean(embed_prod * tr_tiled, [-1, -2])
    other = tf.reduce_mean(embed_prod * (1.0 - tr_tiled), [-1, -2])
    return tf.reduce_mean(same - other) + ALPHA


def train(loss_fn, steps, optimizer):
    x, _ = seed_data()
    kernel, bias = dense_head()

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.matmul(x, kernel) + bias)
        grads = tape.gradient(loss, [kernel, bias])
        optimizer.apply_gradients(zip(grads, [kernel, bias]))
        return loss, grads

    history, grads_finite = [], []
    for _ in range(steps):
        loss, grads = step()
        history.append(float(loss))
        grads_finite.append(all(np.isfinite(g.numpy()).all() for g in grads))
    return np.array(history), grads_finite, (kernel, bias)


def test_seed_linear_loss_runs_off_to_minus_infinity():
    _, labels = seed_data()
    history, _, _ = train(lambda h: seed_loss(h, labels, cos_norm=True), 10, tf.keras.optimizers.SGD(1e-3))
    assert history[0] < -1e4  # the seed printed -320486.0 first
    blown = ~np.isfinite(history) | (history < -1e20)
    assert blown.any(), history
    finite = history[np.isfinite(history)]
    assert (np.diff(finite) < 0).all()  # straight down, no floor


def test_seed_loss_without_cos_norm_is_unbounded_below():
    """Plain Gram loss: every GD step lowers it, and the head's scale alone drives it to -inf."""
    x, labels = seed_data()
    history, _, (kernel, bias) = train(
        lambda h: seed_loss(h, labels, cos_norm=False), 10, tf.keras.optimizers.SGD(1e-3)
    )
    assert (np.diff(history) < 0).all(), history
    assert history[-1] < ALPHA
    c = 1e11
    blown_up = float(seed_loss(tf.matmul(x, kernel * c) + bias * c, labels, cos_norm=False))
    assert blown_up < -1e20  # = alpha + c^2 (loss - alpha): the optimum is -inf
    assert blown_up == pytest.approx(ALPHA + c**2 * (history[-1] - ALPHA), rel=0.05)
    # The bounded loss ignores the scale of the head entirely: both sides are within the
    # batch-all bound of the exact loss (distance error, prefix and pair sums over n boxes,
    # tests/test_triplet_loss.py: statistic_tolerances), and rounding h * c moves each
    # normalised row by <= 2u.  The seed has a few distinct rows, copied: the triplet gaps
    # are those of two copies of each distinct (row, label), checked away from 0.
    h = tf.matmul(x, kernel) + bias
    lab = tf.constant(labels, tf.int32)
    margin, n = 0.2, labels.shape[1]
    for b in range(len(labels)):
        rows = np.concatenate([h.numpy()[b], labels[b, :, None]], axis=1)
        distinct = np.unique(rows, axis=0)
        twice = np.concatenate([distinct, distinct])
        assert_well_conditioned(
            twice[:, :-1], twice[:, -1].astype(int), margin, "euclidean", True, minings=["batch_all"]
        )
    delta = max(distance_error(h.numpy()[b], labels[b], "euclidean", True) for b in range(len(labels)))
    batch_all = SLACK * (2 * delta + (3 * gamma(n) + 5 * U32) * (max_distance("euclidean") + margin))
    tol = 2 * batch_all + SLACK * 2 * 2 * U32
    assert abs(float(triplet_loss(h * c, lab, margin=margin)) - float(triplet_loss(h, lab, margin=margin))) <= tol


def test_bounded_triplet_loss_trains_on_seed_data():
    _, labels = seed_data()
    lab = tf.constant(labels, tf.int32)
    margin = 0.2
    history, grads_finite, weights = train(
        lambda h: triplet_loss(h, lab, mining="batch_all", margin=margin, distance="euclidean", normalize=True),
        20,
        tf.keras.optimizers.SGD(0.1),
    )
    assert np.isfinite(history).all() and all(grads_finite)
    assert (history >= 0).all() and (history <= max_distance("euclidean") + margin).all(), history
    assert history[-1] < history[0], history
    assert history[-5:].mean() < history[:5].mean(), history
    assert all(np.isfinite(w.numpy()).all() for w in weights)
