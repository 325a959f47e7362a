"""Bounded triplet statistics and losses for padded per-image sets of box embeddings.

This module is the single source of truth for the loss math (TensorFlow only: no
Beam, no Parquet; names, defaults and checks of the settings are components.loss_settings).
Inputs are padded sets:

* ``embeddings`` ``[batch, boxes, dim]`` float32,
* ``labels`` ``[batch, boxes]`` integer, ``-1`` = ignore (padding is ``-1``).

Pairs and triplets are formed *within* each set (one image); use
:func:`merge_sets` to treat a whole batch as one set.  Every function works inside
``tf.function`` with unknown batch and set sizes, on CPU and GPU, with gradients.

Why bounded: with L2-normalised vectors every distance is bounded
(:func:`max_distance`), so every loss lies in ``[0, max_distance + margin]`` and
cannot run off to ``-inf`` the way a raw Gram-matrix ("linear") loss does.

Memory is O(batch * boxes^2), never O(boxes^3), although batch-all and semi-hard
are exact over all triplets: for each anchor ``a`` the smaller side of its triplets
(its negatives, or its positives when it has fewer) is read in label order and sorted
once, ``K = max_a min(n_pos, n_neg)`` values per anchor (:func:`_small_side`).
With the negatives sorted and a positive ``p``, ``v = d(a, p) + margin``:

* ``k = searchsorted(sorted_neg[a], v, side="left")`` = number of negatives with
  ``d(a, n) < v``, i.e. the active triplets (hinge > 0) of ``(a, p)``;
* their hinge sum is ``k * v - (sum of the k smallest)``, which summed over all ``(a, p)``
  is a count-weighted sum of distances (see the gradients below);
* semi-hard: ``searchsorted(sorted_neg[a], d(a, p), side="right")`` is the first
  negative strictly farther than ``p`` (clamped to the farthest negative when
  none is, as in tensorflow-addons' semi-hard loss).

With the positives sorted the same formulas run on negated distances (the hinge
``d(a,p) + m - d(a,n)`` is ``(l + m) - s`` either way), and semi-hard finds each
sorted positive's nearest farther negative by a segment min over ordered segments.

Gradients do not flow through the sort: batch-all and semi-hard are count-weighted sums of
distances plus ``margin`` times a count (``sum k(a,p) d(a,p) - sum c(a,n) d(a,n) + m * count``,
with integer counts from the same sorted rows), which give the value and are differentiated
elementwise; backprop through sort + gather would cost twice the forward pass.

Numerics: distances come from one float64 matrix product (products of float32
numbers are exact in float64), so ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` cancels at 2**-53, not
2**-24, of the squared norms, in any summation order a kernel uses; results within
that rounding bound of 0 are set to 0, so copies of a row are at distance exactly 0
on every CPU (see :func:`_squared_from_gram`).  Everything else is float32, with
sums of pairs taken row by row (:func:`_sum_pairs`).  Before the Gram matrix,
unnormalised inputs are divided by a power of two near their max-abs value (exact,
so ties stay ties), and distances are scaled back and capped at
:data:`DISTANCE_CAP`, so huge finite inputs (1e30) never overflow.  The Euclidean
root and the normalisation have finite gradients at coincident and zero vectors.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import tensorflow as tf

from components.loss_settings import (
    DEFAULT_DISTANCE,
    DEFAULT_MARGIN,
    DEFAULT_MINING,
    DISTANCE_CAP,
    DISTANCES,
    check_distance,
    check_margin,
    check_mining,
    max_distance,
)
from components.loss_settings import MININGS as MINING

__all__ = [
    "DISTANCES",
    "DISTANCE_CAP",
    "MINING",
    "NORM_EPS",
    "STATISTIC_NAMES",
    "COUNT_STATISTICS",
    "Geometry",
    "l2_normalize",
    "max_distance",
    "merge_sets",
    "pair_geometry",
    "pairwise_distances",
    "statistics_and_histograms",
    "triplet_loss",
    "triplet_losses",
    "triplet_statistics",
    "triplet_statistics_and_histograms",
    "vector_norms",
]

# The keys of the statistics, in order (EmbeddingStats writes them as the `examples` table's
# columns of the same names); these counts are int64, the rest float32.
COUNT_STATISTICS = ("n_boxes", "n_identities", "n_pos_pairs", "n_neg_pairs", "n_triplets", "n_active_triplets")
STATISTIC_NAMES = (
    *COUNT_STATISTICS[:4],
    "pos_dist_mean",
    "pos_dist_max",
    "neg_dist_mean",
    "neg_dist_min",
    *COUNT_STATISTICS[4:],
    "triplet_loss_sum",
    "batch_all_loss",
    "batch_hard_loss",
    "semi_hard_loss",
)
_COUNT_NAMES = frozenset(COUNT_STATISTICS)

# Vectors with ||x|| below this have no direction: normalizing gives 0, not x / ||x||.
NORM_EPS = 1e-12
# Squared distances (in max-abs-scaled units, where values are O(1)) at or below this
# are treated as exactly 0 by the Euclidean root: sqrt has an infinite slope at 0.
SQRT_EPS = 1e-12
# DISTANCE_CAP (loss_settings) caps any distance: sums over up to 2**31 terms of size <= 2**96
# stay below the float32 maximum (~2**128), so statistics of huge inputs stay finite.

_F32_EXPONENT_MASK = 0x7F800000  # IEEE-754 float32 exponent bits
# Unit roundoff of float64, the precision of the Gram matrices (see _squared_from_gram).
F64_UNIT_ROUNDOFF = 2.0**-53
# Terms of a distance entry beyond the d-term dot product: the two norm columns of the product.
_GRAM_EXTRA_OPS = 2


# --------------------------------------------------------------------------- norms


def _pow2_floor(m):
    """Largest power of two <= m for normal positive float32 m, else 1.

    Dividing by a power of two is exact, so scaled integer inputs keep exact ties.
    """
    m = tf.convert_to_tensor(m, tf.float32)
    bits = tf.bitwise.bitwise_and(tf.bitcast(m, tf.int32), _F32_EXPONENT_MASK)
    p = tf.bitcast(bits, tf.float32)
    ok = tf.logical_and(p > 0.0, tf.math.is_finite(p))  # zero, subnormal or inf -> 1
    return tf.stop_gradient(tf.where(ok, p, tf.ones_like(p)))


def _scaled_norm(x, axis=-1):
    """Overflow/underflow-safe ||x|| = m * ||x / m|| (m ~ max|x|), 0 with zero gradient at x=0.

    ``m`` is a constant for differentiation: m * ||x/m|| equals ||x|| for any fixed m.
    """
    m = tf.reduce_max(tf.abs(x), axis=axis, keepdims=True)
    scale = _pow2_floor(m)
    nonzero = m > 0.0
    sumsq = tf.reduce_sum(tf.square(x / scale), axis=axis, keepdims=True)
    # Double where: sqrt's slope at 0 must not reach the gradient of a zero vector.
    safe_sumsq = tf.where(nonzero, sumsq, tf.ones_like(sumsq))
    return tf.where(nonzero, scale * tf.sqrt(safe_sumsq), tf.zeros_like(sumsq))


def vector_norms(x) -> dict:
    """Per-vector norms over the last axis: ``{"l2", "l1", "max_abs"}``, shape ``x.shape[:-1]``.

    The L2 norm is computed as ``m * ||x / m||`` so values like 1e30 do not overflow
    when squared; the result is Inf only if the norm itself exceeds float32.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    max_abs = tf.reduce_max(tf.abs(x), axis=-1)
    scale = tf.squeeze(_pow2_floor(max_abs[..., None]), -1)
    l1 = scale * tf.reduce_sum(tf.abs(x / scale[..., None]), axis=-1)
    l2 = tf.squeeze(_scaled_norm(x), -1)
    return {"l2": l2, "l1": l1, "max_abs": max_abs}


def l2_normalize(x, eps: float = NORM_EPS):
    """``x / ||x||`` over the last axis; vectors shorter than ``eps`` have no direction and become 0.

    Idempotent (a unit vector stays unit, 0 stays 0), so vectors normalized by the transform
    graph or the Trainer's head and normalized again by the loss graph are normalized once.
    Zero vectors get a zero gradient, not a ``1 / eps`` slope that would blow up plain SGD on
    the exact zero vectors of empty anchors; huge vectors do not overflow.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    norm = _scaled_norm(x)
    long_enough = norm >= eps
    safe_norm = tf.where(long_enough, norm, tf.ones_like(norm))
    return tf.where(long_enough, x / safe_norm, tf.zeros_like(x))


# --------------------------------------------------------------------------- distances


def _masked_embeddings(embeddings, valid):
    """Zero padded/ignored boxes so their values (even NaN/huge) cannot leak into scales."""
    return tf.where(valid[..., None], embeddings, tf.zeros_like(embeddings))


def _product64(left, right):
    """``left @ right^T`` ``[b, n, n]`` float32 from float64 rows ``[b, n, k]`` holding float32 values.

    Products of float32 numbers are exact in float64, so every entry is within
    ``gamma_k * sum_t |left_it right_jt|`` of the exact value (``gamma_k = k u / (1 - k u)``,
    ``u = 2**-53``) whatever order a BLAS kernel sums in.  Callers append columns so that one
    matmul yields a whole distance: one ``[b, n, n]`` float64 temporary, cast at once.
    """
    return tf.cast(tf.matmul(left, right, transpose_b=True), tf.float32)


def _gram_rounding(magnitude, terms):
    """Bound on the float64 rounding error of a Gram-based expression: ``gamma_terms * magnitude``.

    ``terms`` may be a tensor (the vector dimension plus the few operations after the sum);
    ``magnitude`` is float32, with one extra term of slack for its own rounding.
    """
    k = (tf.cast(terms, tf.float32) + 1.0) * F64_UNIT_ROUNDOFF
    return k / (1.0 - k) * magnitude


def _gram_squared(x):
    """Squared distances ``[b, n, n]`` float32 of rows ``x`` ``[b, n, d]`` from one float64 product, not yet
    cleaned, and its rounding bound per row ``[b, n, 1]``: entry ``(i, j)`` is within ``row_i + row_j``
    (:func:`_squared_from_gram`).
    """
    sq64 = tf.reduce_sum(tf.square(tf.cast(x, tf.float64)), axis=-1, keepdims=True)  # [b, n, 1]
    ones = tf.ones_like(sq64)
    x64 = tf.cast(x, tf.float64)
    d2 = _product64(tf.concat([x64, sq64, ones], -1), tf.concat([-2.0 * x64, ones, sq64], -1))
    # gamma * 3 |x_i|^2 per row; its float32 rounding (a few 2**-24, relative) is far inside
    # _gram_rounding's one extra term (relative 1 / (d + 2)).
    per_row = _gram_rounding(3.0 * tf.cast(sq64, tf.float32), tf.shape(x)[-1] + _GRAM_EXTRA_OPS)
    return d2, per_row


@tf.custom_gradient
def _squared_from_gram(x):
    """Squared Euclidean distances ``[b, n, n]`` float32 of rows of ``x`` ``[b, n, d]`` float32, >= 0.

    ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` cancels when the distance is small against the norms:
    in float32 its error, ``~ d * 2**-24 * (|x_i|^2 + |x_j|^2)``, is what a near-duplicate's
    squared distance is made of, and its square root turns 1e-6 into 1e-3.  So it is one
    float64 product of ``[x, |x|^2, 1]`` and ``[-2x, 1, |x|^2]`` (see
    :func:`_product64`; squared norms summed in float64): its error is at most
    ``gamma_{d+2} * 3 (|x_i|^2 + |x_j|^2)`` in any summation order (the product's
    ``2 (|x_i|^2 + |x_j|^2)`` and the norms' own), and values within that
    bound are indistinguishable from 0 and set to 0.  Equal rows are therefore at distance
    exactly 0 on every CPU and kernel, and small distances keep 8 more digits.

    Gradient (float32, written out so no float64 matmul runs backward):
    ``d d2_ij / d x_i = 2 (x_i - x_j)``.
    """
    d2, per_row = _gram_squared(x)
    d2 = tf.where(d2 > per_row + tf.linalg.matrix_transpose(per_row), d2, 0.0)  # the diagonal too: exactly 0

    def grad(upstream):
        w = upstream + tf.linalg.matrix_transpose(upstream)  # d2_ij depends on x_i and x_j
        return 2.0 * (tf.reduce_sum(w, axis=-1, keepdims=True) * x - tf.matmul(w, x))

    return d2, grad


def _cosine_from_gram(unit, long_enough):
    """Cosine distances ``[b, n, n]`` float32 of the rows of ``unit`` (``l2_normalize`` output), in [0, 2].

    Rows that were normalised (``long_enough`` ``[b, n, 1]``) are renormalised in float64
    first, removing the float32 normalisation's rounding, so a vector's cosine with an equal
    vector is 1 up to the float64 Gram rounding, which is set to 0 as in
    :func:`_squared_from_gram`.  Shorter rows keep ``x / eps`` (the documented convention).
    Gradient: ``d (1 - u_i.u_j) / d u_i = -u_j``, the renormalisation (1 up to ~1e-7) held fixed.
    """

    @tf.custom_gradient
    def cosine(unit):
        u64 = tf.cast(unit, tf.float64)
        length = tf.sqrt(tf.reduce_sum(tf.square(u64), axis=-1, keepdims=True))
        u64 = tf.where(long_enough, u64 / tf.where(long_enough, length, tf.ones_like(length)), u64)
        ones = tf.ones_like(length)
        d = _product64(tf.concat([u64, ones], -1), tf.concat([-u64, ones], -1))  # 1 - u_i.u_j
        # |1 - u.u| for unit rows: gamma for the dot product, twice that for the two lengths.
        rounding = _gram_rounding(tf.constant(4.0), tf.shape(unit)[-1] + _GRAM_EXTRA_OPS)
        d = tf.where(d > rounding, d, 0.0)
        d = tf.minimum(d, max_distance("cosine"))
        n = tf.shape(unit)[1]
        d = tf.linalg.set_diag(d, tf.zeros(tf.stack([tf.shape(unit)[0], n]), d.dtype))

        def grad(upstream):
            w = upstream + tf.linalg.matrix_transpose(upstream)
            w = tf.linalg.set_diag(w, tf.zeros(tf.stack([tf.shape(w)[0], n]), w.dtype))  # d_ii is constant 0
            return -tf.matmul(w, unit)

        return d, grad

    return cosine(unit)


def _safe_sqrt(d2):
    """sqrt(d2) that is exactly 0 with a zero (finite) gradient where d2 <= SQRT_EPS."""
    positive = d2 > SQRT_EPS
    return tf.where(positive, tf.sqrt(tf.maximum(d2, SQRT_EPS)), 0.0)


def _distances(x, distance, normalize):
    """Distances ``[b, n, n]`` between rows of ``x`` ``[b, n, d]`` (invalid rows already zero)."""
    if distance == "cosine":
        return _cosine_from_gram(l2_normalize(x), _scaled_norm(x) >= NORM_EPS)
    if normalize:
        return _unit_distances(l2_normalize(x), distance)
    return _unnormalized_distances(x, distance)


def _unit_distances(u, distance):
    """Euclidean or squared distances ``[b, n, n]`` of rows ``u`` ``[b, n, d]`` of norm 1 or 0, capped.

    The cap is :func:`max_distance` (2 or 4), which only rounding can exceed.  One custom gradient
    for root, cap and Gram product: ``d ||u_i - u_j|| / d u_i = (u_i - u_j) / ||u_i - u_j||`` where
    the distance is above the root's threshold and not above the cap, else 0 (what autodiff of
    ``minimum(safe_sqrt(d2), cap)`` gives, without its ~10 ``[b, n, n]`` selects and reductions).
    """
    cap = max_distance(distance, True)

    @tf.custom_gradient
    def distances(u):
        d2, per_row = _gram_squared(u)
        # Rows of norm 1 or 0: twice the largest row bound covers every entry of the set (as
        # _squared_from_gram's clean-up, without its [b, n, n] bound); below SQRT_EPS the root is 0 anyway.
        rounding = 2.0 * tf.reduce_max(per_row, axis=[1, 2], keepdims=True)
        if distance == "squared":
            d = tf.minimum(tf.where(d2 > rounding, d2, 0.0), cap)
        else:
            root = tf.sqrt(tf.where(d2 > tf.maximum(rounding, SQRT_EPS), d2, 0.0))
            d = tf.minimum(root, cap)
            # The root's slope where the distance is live, 1 / root, else 0 (div_no_nan of the zeroed root),
            # formed once per graph for every backward pass that uses these distances (the bench's three
            # losses: one, not three, mask-select-divide; pruned when no gradient is taken).
            slope = tf.math.divide_no_nan(1.0, tf.where(root <= cap, d, 0.0))

        def grad(upstream):
            if distance == "squared":
                w = tf.where(d2 <= cap, 2.0 * upstream, 0.0)
            else:
                w = upstream * slope
            w = w + tf.linalg.matrix_transpose(w)  # d_ij depends on u_i and u_j
            return tf.reduce_sum(w, axis=-1, keepdims=True) * u - tf.matmul(w, u)  # sum_j w_ij (u_i - u_j)

        return d, grad

    return distances(u)


def _unnormalized_distances(x, distance):
    """Euclidean or squared distances of raw vectors, finite for any finite input.

    Each set is divided by a power of two near its max-abs value so the squares in the
    Gram matrix stay finite; distances are scaled back and capped at DISTANCE_CAP.
    The gradient is written out (``d/dx_i ||x_i-x_j|| = (u_i-u_j)/||u_i-u_j||``,
    ``d/dx_i ||x_i-x_j||^2 = 2 s (u_i-u_j)`` with ``u = x/s``) because autodiff through
    the scaling would form ``s^2``, which overflows for s ~ 1e30 and turns 0 into NaN.
    """
    scale = _pow2_floor(tf.reduce_max(tf.abs(x), axis=[1, 2]))[:, None, None]

    @tf.custom_gradient
    def distances(x):
        u = x / scale
        d2 = _squared_from_gram(u)
        if distance == "euclidean":
            root = _safe_sqrt(d2)
            d = tf.minimum(scale * root, DISTANCE_CAP)
        else:
            # Multiply back one factor at a time, capping in between: never Inf * 0.
            d = tf.minimum(scale * tf.minimum(scale * d2, DISTANCE_CAP), DISTANCE_CAP)

        def grad(upstream):
            live = d < DISTANCE_CAP  # capped distances are constant
            if distance == "euclidean":
                live = tf.logical_and(live, d2 > SQRT_EPS)
                safe_root = tf.where(live, root, 1.0)
                w = tf.where(live, upstream / safe_root, 0.0)
            else:
                w = tf.where(live, 2.0 * upstream, 0.0)
            w = w + tf.linalg.matrix_transpose(w)  # d_ij depends on x_i and x_j
            # sum_j w_ij (u_i - u_j) for every i
            du = tf.reduce_sum(w, axis=-1, keepdims=True) * u - tf.matmul(w, u)
            return du if distance == "euclidean" else scale * du

        return d, grad

    return distances(x)


def pairwise_distances(embeddings, distance: str = "euclidean", normalize: bool = True):
    """Distances within each set: ``[batch, boxes, dim]`` -> ``[batch, boxes, boxes]``.

    ``euclidean`` = ||x-y||, ``squared`` = ||x-y||^2, ``cosine`` = 1 - cos(x, y)
    (a zero vector has cosine 0 to everything).  With ``normalize`` the vectors are
    first L2-normalised (:func:`l2_normalize`).  The diagonal is exactly 0.
    """
    check_distance(distance)
    x = tf.convert_to_tensor(embeddings, tf.float32)
    return _distances(x, distance, normalize)


# --------------------------------------------------------------------------- set structure

Geometry = collections.namedtuple("Geometry", ["dist", "valid", "pos", "neg", "n_pos", "n_neg"])
Geometry.__doc__ = """Distances and pair masks of padded sets: what every statistic and loss is computed from.

dist ``[b,n,n]`` float32; valid ``[b,n]`` bool (label >= 0); pos/neg ``[b,n,n]`` bool ordered pairs of
valid boxes with the same / another label (pos excludes a == p); n_pos/n_neg ``[b,n]`` int32 per anchor.
"""


def pair_geometry(embeddings, labels, *, distance: str = DEFAULT_DISTANCE, normalize: bool = True) -> Geometry:
    """The :class:`Geometry` of sets ``[batch, boxes, dim]`` / ``[batch, boxes]`` (-1 = ignore)."""
    check_distance(distance)
    return _geometry(embeddings, labels, distance, normalize)


def _geometry(embeddings, labels, distance, normalize):
    embeddings = tf.convert_to_tensor(embeddings, tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int64)
    valid = labels >= 0
    dist = _distances(_masked_embeddings(embeddings, valid), distance, normalize)
    both = tf.logical_and(valid[:, :, None], valid[:, None, :])
    same = tf.equal(labels[:, :, None], labels[:, None, :])
    n = tf.shape(labels)[1]
    not_self = tf.not_equal(tf.range(n)[:, None], tf.range(n)[None, :])[None]
    pos = tf.logical_and(tf.logical_and(both, same), not_self)
    neg = tf.logical_and(both, tf.logical_not(same))
    n_pos = tf.reduce_sum(tf.cast(pos, tf.int32), axis=-1)
    n_valid = tf.reduce_sum(tf.cast(valid, tf.int32), axis=-1, keepdims=True)
    n_neg = tf.where(valid, n_valid - 1 - n_pos, 0)  # the other valid boxes, less a's positives
    return Geometry(dist, valid, pos, neg, n_pos, n_neg)


_Side = collections.namedtuple("_Side", ["sign", "signed", "large", "values", "cols", "count"])


def _small_side(g, labels):
    """Each anchor's smaller side of its triplets (positives or negatives), sorted.

    A triplet's hinge ``d(a,p) + m - d(a,n)`` reads ``(l + m) - s`` with ``s = d(a,n)``,
    ``l = d(a,p)`` (small side negatives) or ``s = -d(a,p)``, ``l = -d(a,n)`` (small side
    positives), so one formula serves both.  Only the smaller side is read and sorted,
    ``O(n K log K)`` with ``K`` = the largest smaller side (36 on the seed grid, ~85 with
    20 identities), its columns found in label order (:func:`_small_side_columns`), instead of
    a ``top_k`` over every ``[n, n]`` row.  Exact ties are in column order.

    Returns sign ``[b,n,1]`` (+1: small side = negatives), signed ``sign * d`` ``[b,n,n]``
    (no gradient), large ``[b,n,n]`` bool (the other side), values ``[b,n,K]`` ascending
    (+inf past the side's size), cols ``[b,n,K]`` int32 their columns (0 past it), count ``[b,n]`` sizes.
    """
    small_is_neg = g.n_neg <= g.n_pos
    flip = small_is_neg[:, :, None]
    large = tf.where(flip, g.pos, g.neg)
    sign = tf.where(flip, tf.constant(1.0), tf.constant(-1.0))
    signed = sign * tf.stop_gradient(g.dist)
    count = tf.minimum(g.n_neg, g.n_pos)
    k = tf.maximum(tf.reduce_max(count), 1)
    cols = _small_side_columns(g, labels, small_is_neg, k + 1)  # + 1: a positive block holds the anchor too
    picked = tf.gather(signed, tf.maximum(cols, 0), batch_dims=2)
    neg_values, rank = tf.math.top_k(tf.where(cols >= 0, -picked, -np.inf), k=k, sorted=True)  # ascending signed
    cols = tf.maximum(tf.gather(cols, rank, batch_dims=2), 0)  # past the side's size: column 0, with weight 0
    return _Side(sign, signed, large, -neg_values, cols, count)


def _small_side_columns(g, labels, small_is_neg, width):
    """Columns ``[b, n, width]`` int32 of each anchor's smaller side, ascending, -1 past its end (labels int64).

    In label order (ignored boxes first; a label's boxes in column order) an anchor's positives
    and the anchor itself are one block, and its negatives are the valid boxes before and after
    that block: each side is found by index arithmetic, without a ``[b, n, n]`` pass.
    """
    n = tf.shape(labels)[1]
    keyed = tf.where(g.valid, labels, -1)
    order = tf.argsort(keyed, axis=-1, stable=True)  # [b, n] int32: label order
    start = tf.searchsorted(tf.gather(keyed, order, batch_dims=1), keyed, side="left", out_type=tf.int32)[..., None]
    block = tf.where(g.valid, g.n_pos + 1, 0)[..., None]  # [b, n, 1]: the anchor's label block, from start
    first = n - tf.reduce_sum(tf.cast(g.valid, tf.int32), axis=-1)[:, None, None]  # [b, 1, 1]: first valid box
    j = tf.range(width)  # [width]
    skip_block = tf.where(first + j >= start, block, 0)
    at = tf.where(small_is_neg[..., None], first + j + skip_block, start + j)  # [b, n, width] in label order
    inside = j < tf.where(small_is_neg, g.n_neg, g.n_pos + 1)[..., None]
    cols = tf.gather(order, tf.where(inside, at, 0), batch_dims=1)
    own = tf.equal(cols, tf.range(n)[None, :, None])
    # Negatives of several labels come label by label: sorted, ties stay in column order.
    return tf.sort(tf.where(tf.logical_and(inside, tf.logical_not(own)), cols, -1), axis=-1)


def _row_counts(index, weight, depth):
    """Per row histogram: out[..., j] = sum of weight[..., :] (1 if None) where index[..., :] == j.

    index/weight ``[..., m]`` int32 with every index in ``[0, depth)``, output ``[..., depth]`` int32;
    O(rows * (m + depth)).  The op itself, not ``tf.math.bincount``, whose size check is a
    ``reduce_max`` over the whole input (an extra ``[b, n, n]`` pass for batch-all's counts).
    Rank-2 inputs (the semi-hard rows) go in without reshapes: with constant inputs
    inside ``tf.function``, grappler's constant folding gave those reshapes a wrong row count
    when a ``dynamic_partition`` of the rows was empty (TF 2.21: "Input to reshape is a tensor with 0 values").
    """

    def counts(index, weight):
        weight = tf.constant([], tf.int32) if weight is None else weight  # empty: count 1 each
        return tf.raw_ops.DenseBincount(input=index, size=depth, weights=weight, binary_output=False)

    if index.shape.rank == 2:
        return counts(index, weight)
    shape = tf.shape(index)
    flat = tf.stack([tf.reduce_prod(shape[:-1]), shape[-1]])
    weight = None if weight is None else tf.reshape(weight, flat)
    return tf.reshape(counts(tf.reshape(index, flat), weight), tf.concat([shape[:-1], [depth]], 0))


def _sum_pairs(x):
    """Sum of ``[b, n, n]`` float32 over each set ``[b]``: rows first, then the row sums.

    Two sums of n terms: in any summation order the error is at most
    ``2 gamma_n * sum|x|`` (``gamma_n ~ n * 2**-24``), against ``gamma_{n^2}`` for one flat sum.
    """
    return tf.reduce_sum(tf.reduce_sum(x, axis=-1), axis=-1)


def _n_triplets(g):
    """Triplets per set ``[b]`` int64: sum over anchors of n_pos(a) * n_neg(a)."""
    return tf.reduce_sum(tf.cast(g.n_pos, tf.int64) * tf.cast(g.n_neg, tf.int64), axis=-1)


def _loss_bound(distance, normalize, margin):
    return max_distance(distance, normalize) + margin


def _batch_all_terms(g, side, margin):
    """Exact hinge sum ``[b]`` float32 and active-triplet count ``[b]`` int64 over all triplets.

    Per large-side entry ``l`` (see :func:`_small_side`), ``k`` = #small-side values ``s < l + margin``
    (searchsorted) are its active triplets, whose hinges sum to ``sum_{i<k} (l + margin - s_i)``.  Over a set
    that is ``sum_large k l - sum_small c s + margin * n_active``, where ``c`` = #large entries whose ``k``
    exceeds the small value's rank (``l, s = sign * d``): one count-weighted sum of distances, which is
    both the value (no prefix sums, no gather) and what is differentiated, elementwise (no gradient through
    sort or search).  It cancels (hinges are small against distances), so its rounding is relative to
    ``2 n_active max(d)``, as semi-hard's sum is: ``4 gamma_n`` of that in any summation order.
    """
    n = tf.shape(g.dist)[-1]
    width = tf.shape(side.values)[-1]
    k = tf.searchsorted(side.values, side.signed + margin, side="left")  # [b, a, j]: small-side values s < l + m
    k = tf.where(side.large, k, 0)
    # c in sorted order: #large entries with k > rank, a suffix sum of the histogram of k
    # (entries off the large side have k = 0, which is never > rank).
    hist = _row_counts(k, None, width + 1)
    above = tf.cumsum(hist, axis=-1, exclusive=True, reverse=True)[:, :, :width]
    c = _row_counts(side.cols, above, n)  # back to column order
    # Row sums in int32 (at most n^2 / 4 < 2**31 for n < 92,681), then int64: no [b, n, n] int64 temporary.
    n_active = tf.reduce_sum(tf.cast(tf.reduce_sum(k, axis=-1), tf.int64), axis=-1)
    linear = _sum_pairs(tf.cast(k - c, tf.float32) * side.sign * g.dist)  # |k - c| <= n < 2**24: exact
    return linear + margin * tf.cast(n_active, tf.float32), n_active


def _batch_all_loss(hinge_sum, n_active):
    return tf.math.divide_no_nan(hinge_sum, tf.cast(n_active, tf.float32))


def _pick_pairs(dist, pos_col, neg_col):
    """``dist[b, a, pos_col[b, a]]`` and ``dist[b, a, neg_col[b, a]]`` ``[b, n]``, gradient by one ``scatter_nd``.

    The same values as two ``gather`` calls, whose gradients would be two ``[b, n, n]`` segment sums
    and their sum; ``scatter_nd`` adds the (at most two) updates of an entry, exactly as they would.
    """

    @tf.custom_gradient
    def pick(dist):
        def grad(up_pos, up_neg):
            shape = tf.shape(pos_col)
            batch = tf.broadcast_to(tf.range(shape[0])[:, None], shape)
            rows = tf.broadcast_to(tf.range(shape[1])[None, :], shape)
            at = tf.concat([tf.stack([batch, rows, pos_col], -1), tf.stack([batch, rows, neg_col], -1)], 1)
            return tf.scatter_nd(at, tf.concat([up_pos, up_neg], 1), tf.shape(dist))

        return (tf.gather(dist, pos_col, batch_dims=2), tf.gather(dist, neg_col, batch_dims=2)), grad

    return pick(dist)


def _hardest_pairs(g, side=None):
    """Each anchor's farthest positive and nearest negative distance ``[b, n]`` (any value where it has none).

    Picked by column (the lowest among exact ties) and gathered, so a gradient goes to that one pair;
    ``reduce_max`` would split it between tied pairs and cost an ``[b, n, n]`` equality mask, a division
    and two selects backward.  Same value either way.  Both are the largest ``sign * d`` of a side: where
    the sorted sides are formed anyway (``side``, :func:`_small_side`), the small side's first entry and
    one ``argmax`` over the large side; else (batch-hard alone) an ``argmax`` and an ``argmin`` of ``d``.
    """
    if side is None:
        dist = tf.stop_gradient(g.dist)
        pos_col = tf.argmax(tf.where(g.pos, dist, -1.0), axis=-1, output_type=tf.int32)  # distances >= 0
        neg_col = tf.argmin(tf.where(g.neg, dist, np.inf), axis=-1, output_type=tf.int32)
        return _pick_pairs(g.dist, pos_col, neg_col)
    small_col = side.cols[..., 0]  # [b, n]; ascending signed values, ties by column
    large_col = tf.argmax(tf.where(side.large, side.signed, -np.inf), axis=-1, output_type=tf.int32)
    small_is_neg = side.sign[..., 0] > 0.0
    pos_col = tf.where(small_is_neg, large_col, small_col)
    neg_col = tf.where(small_is_neg, small_col, large_col)
    return _pick_pairs(g.dist, pos_col, neg_col)


def _batch_hard_loss(g, hardest, margin):
    """Mean over anchors with a positive and a negative of max(0, max_p d - min_n d + margin).

    ``hardest`` = :func:`_hardest_pairs` of ``g``: the gradient of an anchor's hinge goes to that one
    positive and negative pair.
    """
    anchor = tf.logical_and(g.n_pos > 0, g.n_neg > 0)  # [b, n]
    hardest_pos, hardest_neg = hardest
    hinge = tf.maximum(hardest_pos - hardest_neg + margin, 0.0)
    total = tf.reduce_sum(tf.where(anchor, hinge, tf.zeros_like(hinge)), axis=-1)
    count = tf.reduce_sum(tf.cast(anchor, tf.float32), axis=-1)
    return tf.math.divide_no_nan(total, count)


# Low bits of an order key: a float32 read as float64 leaves the low 29 of its 52 mantissa bits 0,
# which hold the column (columns < 2**29).
_COL_MASK = 2**29 - 1


def _order_key(neg_dist, cols):
    """int64 keys ordered like ``(d, -cols)`` of float32 ``neg_dist = -d <= -0`` (cols broadcast against it).

    The bits of a negative float64, read as int64, grow with its magnitude, so the keys of
    ``-d`` grow with ``d``; ``_COL_MASK - col`` fills the low bits.  One segment min of these keys
    finds the nearest distance and, among exact ties, the highest column, together.
    """
    return tf.bitcast(tf.cast(neg_dist, tf.float64), tf.int64) + (_COL_MASK - tf.cast(cols, tf.int64))


def _key_dist_and_col(keys):
    """Inverse of :func:`_order_key`: (float32 distances ``d``, int32 cols)."""
    low = tf.bitwise.bitwise_and(keys, _COL_MASK)
    dist = -tf.cast(tf.bitcast(keys - low, tf.float64), tf.float32)
    return dist, tf.cast(_COL_MASK - low, tf.int32)


def _last_nonempty(keys):
    """Each entry of int64 ``keys`` ``[m, w]`` replaced by the last non-empty one at or before it along the row.

    Empty = ``int64 max`` (what a segment min gives an empty segment), also before a row's first non-empty
    entry.  Where the non-empty entries of a row decrease (semi-hard's ordered segments), this is their
    running min, from a cumulative sum, a segment min and a gather: no loop, which grappler could not merge
    between the losses' and the statistics' copies of this graph.
    """
    shape = tf.shape(keys)
    rows, w = shape[0], shape[1]
    ordinal = tf.cumsum(tf.cast(keys < keys.dtype.max, tf.int32), axis=-1)  # [m, w]: 0 before the first
    # Entry o of a row: its o-th non-empty key (the empties after it are int64 max, which min ignores).
    ids = ordinal + (w + 1) * tf.range(rows)[:, None]
    compact = tf.math.unsorted_segment_min(keys, ids, rows * (w + 1))
    return tf.gather(tf.reshape(compact, tf.stack([rows, w + 1])), ordinal, batch_dims=1)


def _semi_hard_small_negatives(signed, large, values, cols, n_neg, margin):
    """Semi-hard weights of anchor rows whose negatives are the sorted small side.

    Rows ``[m, n]``: signed = d(a, .), large = positives, values/cols ``[m, K]`` the sorted
    negatives, n_neg ``[m]``.  n* of a positive p is the sorted negative at
    ``min(searchsorted(d(a,p), "right"), n_neg - 1)``.  Returns the weights ``[m, n]`` int32
    (+1 per active pair on d(a,p), -1 on its d(a,n*)) and active pairs per row ``[m]`` int32.
    """
    n = tf.shape(signed)[-1]
    width = tf.shape(values)[-1]
    last = tf.minimum(tf.maximum(n_neg - 1, 0), width - 1)[:, None]  # n_neg <= width in these rows
    rank = tf.minimum(tf.searchsorted(values, signed, side="right"), last)
    pair = tf.logical_and(large, (n_neg > 0)[:, None])
    chosen = tf.where(pair, tf.gather(values, rank, batch_dims=1), 0.0)
    active = tf.cast(tf.logical_and(pair, signed - chosen + margin > 0.0), tf.int32)
    uses = _row_counts(tf.gather(cols, rank, batch_dims=1), active, n)
    return active - uses, tf.reduce_sum(active, axis=-1)


def _semi_hard_small_positives(signed, large, values, cols, count, margin):
    """Semi-hard weights of anchor rows whose positives are the sorted small side.

    Rows ``[m, n]``: signed = -d(a, .), large = negatives, values/cols ``[m, K]`` the sorted
    -d(a, p), count ``[m]`` positives per row.  A negative with ``r = searchsorted(-d(a,n),
    "right")`` is farther than the positives of sorted rank >= r, so n* of rank j is the
    nearest negative with r <= j: a segment min of (d(a,n), -column) keys by r, then the last
    non-empty segment at or before j (each of segment r's negatives lies in ``(d_r, d_{r-1}]``
    of the descending positive distances ``d``, so is nearer than any of an earlier segment);
    the farthest negative when none is.  Returns weights ``[m, n]`` int32
    and active pairs per row ``[m]`` int32, as :func:`_semi_hard_small_negatives`.
    """
    shape = tf.shape(signed)
    rows, n = shape[0], shape[1]
    width = tf.shape(values)[-1]
    r = tf.searchsorted(values, signed, side="right")  # [m, n]
    ids = tf.where(large, r, width + 1) + (width + 2) * tf.range(rows)[:, None]
    keys = _order_key(signed, tf.range(n))  # cols [n] broadcast: no [m, n] int64 column temporaries
    seg = tf.math.unsorted_segment_min(keys, ids, rows * (width + 2))
    best = _last_nonempty(tf.reshape(seg, tf.stack([rows, width + 2]))[:, :width])  # empty: int64 max
    found = best < tf.int64.max
    best_dist, best_col = _key_dist_and_col(tf.where(found, best, tf.zeros_like(best)))
    farthest_col = tf.argmin(tf.where(large, signed, np.inf), axis=-1, output_type=tf.int32)
    col = tf.where(found, best_col, farthest_col[:, None])
    chosen = tf.where(found, best_dist, -tf.gather(signed, farthest_col[:, None], batch_dims=1))  # d(a, n*)
    ranks = tf.range(width)[None, :]
    has_neg = tf.reduce_any(large, axis=-1, keepdims=True)
    pair = tf.logical_and(ranks < count[:, None], has_neg)
    d_pos = tf.where(pair, -values, tf.zeros_like(values))  # d(a, p) of the sorted positives
    active = tf.cast(tf.logical_and(pair, d_pos - chosen + margin > 0.0), tf.int32)
    weights = _row_counts(tf.concat([cols, col], -1), tf.concat([active, -active], -1), n)
    return weights, tf.reduce_sum(active, axis=-1)


def _semi_hard_loss(g, side, margin):
    """Mean over (a, p) with a negative of max(0, d(a,p) - d(a,n*) + margin).

    n* = nearest negative strictly farther than p, else the farthest negative
    (tensorflow-addons convention).  Anchor rows are split by which side is sorted
    (:func:`_small_side`; ``dynamic_partition``), so each row runs only its own case
    (:func:`_semi_hard_small_negatives`, :func:`_semi_hard_small_positives`).  The sum is
    differentiated as ``sum_active (d(a,p) + margin) - sum_n u(a,n) d(a,n)``, u = #active
    pairs choosing n, so no gradient flows through sort or gather.
    """
    shape = tf.shape(g.dist)
    rows, n = shape[0] * shape[1], shape[2]
    width = tf.shape(side.values)[-1]
    case = tf.cast(tf.reshape(side.sign, [rows]) < 0.0, tf.int32)  # 0: negatives sorted, 1: positives

    def split(t, depth):
        return tf.dynamic_partition(tf.reshape(t, tf.stack([rows, depth])), case, 2)

    signed, large, values, cols = (
        split(side.signed, n),
        split(side.large, n),
        split(side.values, width),
        split(side.cols, width),
    )
    n_neg = tf.dynamic_partition(tf.reshape(g.n_neg, [rows]), case, 2)[0]
    count = tf.dynamic_partition(tf.reshape(side.count, [rows]), case, 2)[1]
    weights_a, active_a = _semi_hard_small_negatives(signed[0], large[0], values[0], cols[0], n_neg, margin)
    weights_b, active_b = _semi_hard_small_positives(signed[1], large[1], values[1], cols[1], count, margin)
    index = tf.dynamic_partition(tf.range(rows), case, 2)
    weights = tf.reshape(tf.dynamic_stitch(index, [weights_a, weights_b]), shape)
    active = tf.reshape(tf.dynamic_stitch(index, [active_a, active_b]), shape[:2])
    n_active = tf.cast(tf.reduce_sum(active, axis=-1), tf.float32)
    total = _sum_pairs(tf.cast(weights, tf.float32) * g.dist) + margin * n_active
    has_neg = g.n_neg > 0
    count = tf.cast(tf.reduce_sum(tf.where(has_neg, g.n_pos, tf.zeros_like(g.n_pos)), axis=-1), tf.float32)
    return tf.math.divide_no_nan(total, count)


def _bounded(loss, bound):
    """Guard the [0, bound] guarantee against float round-off (bound may be inf)."""
    loss = tf.maximum(loss, 0.0)
    return loss if math.isinf(bound) else tf.minimum(loss, bound)


def _pair_statistics(g, hardest):
    """Counts and distance summaries of positive and negative pairs of valid boxes.

    Counts are of unordered pairs; means, max and min are over ordered pairs, each unordered pair
    with its two computed distances ``d(i, j)``, ``d(j, i)`` (equal up to the Gram product's rounding),
    so no ``i < j`` mask is formed; max and min come from each anchor's hardest pairs ``hardest``
    (:func:`_hardest_pairs`, which batch-hard uses too).
    """
    n_pos = tf.reduce_sum(tf.cast(g.n_pos, tf.int64), axis=-1)  # ordered pairs: twice the unordered ones
    n_neg = tf.reduce_sum(tf.cast(g.n_neg, tf.int64), axis=-1)
    pos_sum = _sum_pairs(tf.where(g.pos, g.dist, 0.0))
    neg_sum = _sum_pairs(tf.where(g.neg, g.dist, 0.0))
    hardest_pos, hardest_neg = hardest
    pos_max = tf.reduce_max(tf.where(g.n_pos > 0, hardest_pos, 0.0), axis=-1)
    neg_min = tf.reduce_min(tf.where(g.n_neg > 0, hardest_neg, np.inf), axis=-1)
    return {
        "n_pos_pairs": n_pos // 2,
        "n_neg_pairs": n_neg // 2,
        "pos_dist_mean": tf.math.divide_no_nan(pos_sum, tf.cast(n_pos, tf.float32)),
        "pos_dist_max": pos_max,
        "neg_dist_mean": tf.math.divide_no_nan(neg_sum, tf.cast(n_neg, tf.float32)),
        "neg_dist_min": tf.where(n_neg > 0, neg_min, tf.zeros_like(neg_min)),
    }


def _n_identities(labels, valid):
    """Distinct labels >= 0 per set ``[b]`` int64: in each set's sorted labels, count the changes.

    O(n log n) per set; no ``[n, n]`` comparison.
    """
    ordered = tf.sort(tf.where(valid, labels, -tf.ones_like(labels)), axis=-1)  # ignored boxes first, as -1
    previous = tf.concat([-tf.ones_like(ordered[:, :1]), ordered[:, :-1]], axis=-1)
    first = tf.logical_and(ordered >= 0, tf.not_equal(ordered, previous))
    return tf.reduce_sum(tf.cast(first, tf.int64), axis=-1)


# --------------------------------------------------------------------------- public API


def _statistics(g, labels, margin, distance, normalize):
    """The :data:`STATISTIC_NAMES` dict of sets whose geometry is ``g``."""
    side = _small_side(g, labels)
    hardest = _hardest_pairs(g, side)  # batch-hard's pairs, and the pair statistics' max / min
    hinge_sum, n_active = _batch_all_terms(g, side, margin)
    bound = _loss_bound(distance, normalize, margin)
    stats = {
        "n_boxes": tf.reduce_sum(tf.cast(g.valid, tf.int64), axis=-1),
        "n_identities": _n_identities(labels, g.valid),
        **_pair_statistics(g, hardest),
        "n_triplets": _n_triplets(g),
        "n_active_triplets": n_active,
        "triplet_loss_sum": tf.maximum(hinge_sum, 0.0),
        "batch_all_loss": _bounded(_batch_all_loss(hinge_sum, n_active), bound),
        "batch_hard_loss": _bounded(_batch_hard_loss(g, hardest, margin), bound),
        "semi_hard_loss": _bounded(_semi_hard_loss(g, side, margin), bound),
    }
    return {name: tf.cast(stats[name], tf.int64 if name in _COUNT_NAMES else tf.float32) for name in STATISTIC_NAMES}


def triplet_statistics(embeddings, labels, *, margin=DEFAULT_MARGIN, distance=DEFAULT_DISTANCE, normalize=True):
    """Per-set statistics: dict of ``[batch]`` tensors keyed by :data:`STATISTIC_NAMES` (in order).

    ``embeddings`` ``[batch, boxes, dim]``, ``labels`` ``[batch, boxes]`` (-1 = ignore).
    Counts are int64, the rest float32.  An undefined mean/min/max (e.g. no positive
    pair) is 0 and its count is 0.
    """
    check_distance(distance)
    margin = check_margin(margin)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int64)
    return _statistics(_geometry(embeddings, labels, distance, normalize), labels, margin, distance, normalize)


def triplet_statistics_and_histograms(
    embeddings, labels, *, bins, upper_edge, margin=DEFAULT_MARGIN, distance=DEFAULT_DISTANCE, normalize=True
):
    """:func:`triplet_statistics` plus the distance histograms of all sets' unordered pairs.

    Returns ``(stats, positive [bins], negative [bins])``: int64 counts of positive / negative
    pair distances on ``bins`` fixed bins over ``[0, upper_edge]`` (values above go to the
    last bin), summed over the batch, from the same distance matrix as the statistics.
    """
    check_distance(distance)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int64)
    g = _geometry(embeddings, labels, distance, normalize)
    return statistics_and_histograms(
        g, labels, bins=bins, upper_edge=upper_edge, margin=margin, distance=distance, normalize=normalize
    )


def statistics_and_histograms(
    g: Geometry, labels, *, bins, upper_edge, margin=DEFAULT_MARGIN, distance=DEFAULT_DISTANCE, normalize=True
):
    """:func:`triplet_statistics_and_histograms` of sets whose :func:`pair_geometry` is ``g`` (computed once)."""
    margin = check_margin(margin)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int64)
    n = tf.shape(labels)[1]
    unordered = (tf.range(n)[:, None] < tf.range(n)[None, :])[None]  # i < j
    value_range = tf.stack([tf.constant(0.0), tf.cast(upper_edge, tf.float32)])

    def histogram(pairs):
        values = tf.boolean_mask(g.dist, tf.logical_and(pairs, unordered))
        return tf.histogram_fixed_width(values, value_range, nbins=bins, dtype=tf.int64)

    return _statistics(g, labels, margin, distance, normalize), histogram(g.pos), histogram(g.neg)


def triplet_loss(
    embeddings, labels, *, mining=DEFAULT_MINING, margin=DEFAULT_MARGIN, distance=DEFAULT_DISTANCE, normalize=True
):
    """Scalar training loss: mean over sets with >= 1 triplet of the set's ``mining`` loss.

    ``batch_all``: mean hinge over active triplets; ``batch_hard``: mean over anchors of
    the hardest-positive/hardest-negative hinge; ``semi_hard``: tensorflow-addons style.
    Returns 0 when no set has a triplet.  Differentiable; with ``normalize`` it lies in
    ``[0, max_distance + margin]``.
    """
    check_mining(mining)
    settings = dict(margin=margin, distance=distance, normalize=normalize)
    return triplet_losses(embeddings, labels, minings=(mining,), **settings)[mining]


def triplet_losses(
    embeddings, labels, *, minings=MINING, margin=DEFAULT_MARGIN, distance=DEFAULT_DISTANCE, normalize=True
) -> dict:
    """``{mining: triplet_loss(..., mining=mining)}`` for several minings, from one geometry and one sort.

    For a loss that combines minings, or logs them all: the distances, masks and sorted sides are
    formed once and their gradient is taken once for the sum, where separate :func:`triplet_loss`
    calls run one distance backward pass each.
    """
    minings = tuple(minings)
    if not minings or len(set(minings)) != len(minings):
        raise ValueError(f"minings must name distinct minings of {MINING}, got {minings!r}")
    for mining in minings:
        check_mining(mining)
    check_distance(distance)
    margin = check_margin(margin)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int64)  # as triplet_statistics: one graph for both
    g = _geometry(embeddings, labels, distance, normalize)
    side = None if minings == ("batch_hard",) else _small_side(g, labels)
    bound = _loss_bound(distance, normalize, margin)
    has_triplet = _n_triplets(g) > 0
    sets_with_triplets = tf.reduce_sum(tf.cast(has_triplet, tf.float32))
    losses = {}
    for mining in minings:
        if mining == "batch_hard":
            per_set = _batch_hard_loss(g, _hardest_pairs(g, side), margin)
        elif mining == "batch_all":
            per_set = _batch_all_loss(*_batch_all_terms(g, side, margin))
        else:
            per_set = _semi_hard_loss(g, side, margin)
        per_set = tf.where(has_triplet, _bounded(per_set, bound), 0.0)
        losses[mining] = tf.math.divide_no_nan(tf.reduce_sum(per_set), sets_with_triplets)
    return losses


def merge_sets(embeddings, labels):
    """One set from a batch: ``[b, n, d]``/``[b, n]`` -> ``[1, b*n, d]``/``[1, b*n]``.

    For the "batch" pair scope, where identity labels are global across images.
    """
    embeddings = tf.convert_to_tensor(embeddings)
    labels = tf.convert_to_tensor(labels)
    dim = embeddings.shape[-1] if embeddings.shape[-1] is not None else tf.shape(embeddings)[-1]
    return tf.reshape(embeddings, [1, -1, dim]), tf.reshape(labels, [1, -1])
