"""components.triplet_loss against an independent brute-force float64 reference.

The reference below uses explicit Python loops over pairs and triplets (no Gram
matrix, no sorting), so it shares no code or trick with the module under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from components import triplet_loss as T

REF_EPS = 1e-12  # the module's documented length below which a vector has no direction (normalizes to 0)
MARGINS = (0.2, 1.0)


# ----------------------------------------------------------------------- reference


def ref_normalize(x):
    norm = np.linalg.norm(x)
    return x / norm if norm >= REF_EPS else np.zeros_like(x)


def ref_distance(x, y, distance, normalize):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if distance == "cosine":
        nx, ny = max(np.linalg.norm(x), REF_EPS), max(np.linalg.norm(y), REF_EPS)
        return 1.0 - float(np.dot(x, y)) / (nx * ny)
    if normalize:
        x, y = ref_normalize(x), ref_normalize(y)
    d2 = float(np.sum((x - y) ** 2))
    return math.sqrt(d2) if distance == "euclidean" else d2


def ref_set(emb, lab, margin, distance, normalize):
    """All statistics of one set by brute force; also the per-set losses."""
    idx = [i for i in range(len(lab)) if lab[i] >= 0]
    d = {(i, j): ref_distance(emb[i], emb[j], distance, normalize) for i in idx for j in idx}
    pos_pairs = [d[i, j] for i, j in itertools.combinations(idx, 2) if lab[i] == lab[j]]
    neg_pairs = [d[i, j] for i, j in itertools.combinations(idx, 2) if lab[i] != lab[j]]
    hinges = []
    for a in idx:
        for p in idx:
            if p == a or lab[p] != lab[a]:
                continue
            for n in idx:
                if lab[n] != lab[a]:
                    hinges.append(max(0.0, d[a, p] - d[a, n] + margin))
    active = [h for h in hinges if h > 0]
    hard = []
    for a in idx:
        ps = [d[a, p] for p in idx if p != a and lab[p] == lab[a]]
        ns = [d[a, n] for n in idx if lab[n] != lab[a]]
        if ps and ns:
            hard.append(max(0.0, max(ps) - min(ns) + margin))
    semi = []
    for a in idx:
        ns = [d[a, n] for n in idx if lab[n] != lab[a]]
        if not ns:
            continue
        for p in idx:
            if p == a or lab[p] != lab[a]:
                continue
            farther = [v for v in ns if v > d[a, p]]
            dn = min(farther) if farther else max(ns)
            semi.append(max(0.0, d[a, p] - dn + margin))
    return {
        "n_boxes": len(idx),
        "n_identities": len({lab[i] for i in idx}),
        "n_pos_pairs": len(pos_pairs),
        "n_neg_pairs": len(neg_pairs),
        "pos_dist_mean": float(np.mean(pos_pairs)) if pos_pairs else 0.0,
        "pos_dist_max": max(pos_pairs) if pos_pairs else 0.0,
        "neg_dist_mean": float(np.mean(neg_pairs)) if neg_pairs else 0.0,
        "neg_dist_min": min(neg_pairs) if neg_pairs else 0.0,
        "n_triplets": len(hinges),
        "n_active_triplets": len(active),
        "triplet_loss_sum": float(sum(hinges)),
        "batch_all_loss": float(sum(active) / len(active)) if active else 0.0,
        "batch_hard_loss": float(np.mean(hard)) if hard else 0.0,
        "semi_hard_loss": float(np.mean(semi)) if semi else 0.0,
    }


MINING_KEY = {"batch_all": "batch_all_loss", "batch_hard": "batch_hard_loss", "semi_hard": "semi_hard_loss"}


# ----------------------------------------------------------------------- test sets


def make_sets(seed=0, normalized=True):
    """(name, embeddings [n, dim] float32, labels [n]) covering the awkward cases.

    Tie cases must be ties in float32 too: integer vectors keep exact distances
    unnormalised; once normalised, only vectors whose norm is a power of two do
    (rows of {-1, 1}^4, norm 2, and signed axis vectors), so those are used then.
    With margin 1 and zero vectors this makes hinges exactly 0 (not active).
    """
    rng = np.random.default_rng(seed)
    dim = 4
    sets = []
    for n in (5, 8, 12):
        sets.append((f"random3_{n}", rng.normal(size=(n, dim)), rng.integers(0, 3, n)))
    sets.append(("binary_with_ignored", rng.normal(size=(10, dim)), rng.integers(-1, 2, 10)))
    sets.append(("many_identities", rng.normal(size=(12, dim)), rng.integers(0, 8, 12)))
    sets.append(("singletons", rng.normal(size=(6, dim)), np.arange(6)))
    sets.append(("all_one_label", rng.normal(size=(7, dim)), np.full(7, 4)))
    sets.append(("all_ignored", rng.normal(size=(6, dim)), np.full(6, -1)))
    sets.append(("one_valid_box", rng.normal(size=(5, dim)), np.array([-1, -1, 2, -1, -1])))
    # Dyadic, so ties between copies are exact in any summation order (non-dyadic copies:
    # test_coincident_rows_are_at_distance_zero_in_any_summation_order).
    base = rng.choice([-1.0, 1.0], size=(4, dim)) if normalized else rng.integers(-3, 4, size=(4, dim))
    dup = base[[0, 0, 1, 1, 2, 0, 3, 2, 1]]  # coincident vectors, across and within labels
    sets.append(("duplicates", dup, np.array([0, 0, 0, 1, 1, 1, 2, 2, 0])))
    # Zero vectors sit at distance exactly 1 from unit vectors; keep the others dyadic
    # when normalised so that structural ties (d = 1, margin 1) are ties in float32 too.
    zeros = rng.choice([-1.0, 1.0], size=(9, dim)) if normalized else rng.normal(size=(9, dim))
    zeros[[1, 4, 5]] = 0.0
    sets.append(("zero_vectors", zeros, np.array([0, 0, 1, 1, 0, 1, 2, 2, 1])))
    if normalized:
        ties = rng.choice([-1.0, 1.0], size=(11, dim))
        ties[::3] = np.eye(dim)[rng.integers(0, dim, 4)] * rng.choice([-2.0, 1.0, 4.0], size=(4, 1))
    else:
        ties = rng.integers(-2, 3, size=(11, dim))
    sets.append(("integer_ties", ties, rng.integers(0, 3, 11)))
    # Axis-aligned vectors normalise exactly, so ties survive normalisation too.
    axes = np.eye(dim)[rng.integers(0, dim, 12)] * rng.choice([-3.0, -1.0, 2.0, 4.0], size=(12, 1))
    sets.append(("axis_ties", axes, rng.integers(0, 3, 12)))
    return [(name, e.astype(np.float32), np.asarray(l, np.int32)) for name, e, l in sets]


def pad_batch(sets, garbage=np.nan):
    """Pack sets into [batch, max_n, dim] with label -1 and garbage embeddings as padding."""
    width = max(len(l) for _, _, l in sets) + 2
    dim = sets[0][1].shape[1]
    emb = np.full((len(sets), width, dim), garbage, np.float32)
    lab = np.full((len(sets), width), -1, np.int32)
    for b, (_, e, l) in enumerate(sets):
        emb[b, : len(l)] = e
        lab[b, : len(l)] = l
    return emb, lab


# ----------------------------------------------------------------------- float32 error bounds
#
# Tolerances are worst-case rounding bounds that hold for any summation order, hence for
# any BLAS/oneDNN/Eigen kernel on any x86-64 CPU (Intel or AMD, SSE to AVX-512): a sum of k
# terms computed in any order is within gamma_k * sum(|terms|) of the exact sum,
# gamma_k = k u / (1 - k u) with unit roundoff u (Higham, Accuracy and Stability of
# Numerical Algorithms, section 3.1).  The module's Gram matrices are float64 (products of
# float32 numbers are exact there); normalisation, sort, prefix sums and means are float32.
# Discontinuous statistics (active-triplet counts, the semi-hard negative's choice) are
# compared exactly: `assert_well_conditioned` checks that no reference comparison lies
# within twice the distance error of its threshold unless it is an exact tie, and the only
# exact ties are in dyadic sets, whose Gram entries are exact in any order.

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff
DYADIC_DENOMINATOR = 64  # rows of multiples of 1/64 (small) have exact Gram entries
SLACK = 2.0  # factor over the itemised bounds, for the few roundings not itemised


def gamma(k, unit=U32):
    return k * unit / (1.0 - k * unit)


def ref_distances(emb, lab, distance, normalize):
    """float64 distance matrix of a set's valid boxes."""
    idx = [i for i in range(len(lab)) if lab[i] >= 0]
    return np.array([[ref_distance(emb[i], emb[j], distance, normalize) for j in idx] for i in idx]).reshape(
        len(idx), len(idx)
    )


def distance_error(emb, lab, distance, normalize):
    """Bound on |computed - exact| of every distance of one set (its valid rows), any CPU.

    Normalising in float32 moves a row by at most e_n = gamma_{dim+1} / 2 + 2u (sum of
    squares, square root, division).  The float64 product's error on d2 is at most
    tau = 3 gamma64_{dim+4} (|x_i|^2 + |x_j|^2), and below tau the module sets d2 to 0, so 2 tau; and
    |sqrt(a) - sqrt(b)| <= sqrt(|a - b|); below T.SQRT_EPS the root is 0; casting to float32
    and the square root add u relative each.  Unnormalised sets are divided by a power
    of two (exact) before the Gram matrix, so the bound is in those units, scaled back.
    """
    x = np.asarray(emb, np.float64)[np.asarray(lab) >= 0]
    if len(x) == 0:
        return 0.0
    dim = x.shape[1]
    e_n = gamma(dim + 1) / 2 + 2 * U32
    g64 = gamma(dim + 4, U64)  # dim products, the norm sum, the subtraction, the renormalisation
    if distance == "cosine":  # 1 - cos: two rows' normalisation, the Gram entry, the cast
        return 4 * e_n + 4 * g64 + 2 * U32
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), REF_EPS)
        sq_sum, scale = 2 * (1 + e_n) ** 2, 1.0
    else:
        scale = 2.0 ** np.floor(np.log2(np.abs(x).max())) if np.abs(x).max() > 0 else 1.0
        x = x / scale
        sq_sum = 2 * float((x**2).sum(axis=1).max())
    sq = (x**2).sum(axis=1)  # float64: an upper bound on the largest distance to ~1e-8 is plenty
    d_max = math.sqrt(max(float((sq[:, None] + sq[None, :] - 2 * x @ x.T).max()), 0.0)) + 1e-6 + 2 * e_n
    gram_err = 6 * g64 * sq_sum  # absolute, on d2: twice the module's zeroing threshold 3 gamma64 sq_sum
    if distance == "squared":
        moved = 2 * e_n * (2 * d_max + 2 * e_n) if normalize else 0.0
        return scale**2 * (moved + gram_err + U32 * d_max**2)
    moved = 2 * e_n if normalize else 0.0
    return scale * (moved + math.sqrt(gram_err + T.SQRT_EPS) + 2 * U32 * d_max)


def statistic_tolerances(emb, lab, margin, distance, normalize):
    """Absolute tolerance per float statistic of one set, from its rounding bound.

    With delta the distance error, B = largest distance + margin, n boxes, and the module's
    sums over pairs taken row by row (error 2 gamma_n, any order): distance means/extrema:
    delta + (2 gamma_n + u) B; batch-hard: 2 delta + (gamma_{n+1} + u) B; batch-all and
    semi-hard, per active triplet: 2 delta + 4 gamma_n B + a few u B (each is a count-weighted
    sum of distances, sum k d(a,p) - sum c d(a,n) + m n_active, which cancels: its terms
    total at most 2 n_active B, summed row by row).
    """
    delta = distance_error(emb, lab, distance, normalize)
    n = max(int((np.asarray(lab) >= 0).sum()), 1)
    d = ref_distances(emb, lab, distance, normalize)
    big = (d.max() if d.size else 0.0) + margin
    dist_tol = delta + (2 * gamma(n) + U32) * big
    batch_all = 2 * delta + (4 * gamma(n) + 5 * U32) * big
    n_active = ref_set(emb, lab, margin, distance, normalize)["n_active_triplets"]
    tol = {
        "pos_dist_mean": dist_tol,
        "pos_dist_max": dist_tol,
        "neg_dist_mean": dist_tol,
        "neg_dist_min": dist_tol,
        "batch_hard_loss": 2 * delta + (gamma(n + 1) + U32) * big,
        "batch_all_loss": batch_all,
        "triplet_loss_sum": batch_all * max(n_active, 1),
        "semi_hard_loss": 2 * delta + (4 * gamma(n) + 3 * U32) * big,
    }
    return {key: SLACK * value for key, value in tol.items()}


def assert_well_conditioned(emb, lab, margin, distance, normalize, delta=None, name="", minings=T.MINING):
    """No triplet comparison within 2 * delta (+ its own rounding) of a threshold, unless exactly on it.

    d(a,p) + m vs d(a,n) decides batch-all's active set, d(a,n) vs d(a,p) the semi-hard
    negative: a reference gap that small could flip in float32 and change a count or a
    choice, so a test comparing those exactly would not hold on every CPU.
    """
    delta = distance_error(emb, lab, distance, normalize) if delta is None else delta
    valid = np.asarray(lab) >= 0
    lab_v = np.asarray(lab)[valid]
    rows = np.asarray(emb, np.float64)[valid]
    if normalize or distance == "cosine":
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), REF_EPS)
    zero = ~rows.any(axis=1)
    dyadic = np.all(rows * DYADIC_DENOMINATOR == np.round(rows * DYADIC_DENOMINATOR), axis=1)
    d = ref_distances(emb, lab, distance, normalize)
    same = lab_v[:, None] == lab_v[None, :]
    pos = same & ~np.eye(len(lab_v), dtype=bool)
    for a in range(len(lab_v)):
        p, n = np.flatnonzero(pos[a]), np.flatnonzero(~same[a])
        dp, dn = d[a, p], d[a, n]
        # A tie is exact in float32 too when every row is dyadic (exact Gram entries in any
        # order), or when p and n are both zero rows (the same expression, |x_a|^2).
        exact = (dyadic[a] & dyadic[p][:, None] & dyadic[n][None, :]) | (zero[p][:, None] & zero[n][None, :])
        gaps = {"batch_all": (dp[:, None] + margin) - dn[None, :], "semi_hard": dn[None, :] - dp[:, None]}
        for gap in (gaps[m] for m in minings if m in gaps):
            near = np.abs(gap) <= 2 * delta + 4 * U32 * (np.abs(dn).max(initial=0) + margin)
            assert not (near & ~((gap == 0) & exact)).any(), f"{name}: a triplet gap within rounding of 0"


def assert_matches(got, want_sets, margin, distance, normalize):
    """Counts exactly, other statistics within their rounding bound, set by set, against ref_set."""
    for b, (name, e, l) in enumerate(want_sets):
        assert_well_conditioned(e, l, margin, distance, normalize, name=name)
        want = ref_set(e, l, margin, distance, normalize)
        tol = statistic_tolerances(e, l, margin, distance, normalize)
        for key in T.STATISTIC_NAMES:
            g = np.asarray(got[key])[b]
            if key.startswith("n_"):
                assert g == want[key], (key, name, g, want[key])
            else:
                assert abs(float(g) - want[key]) <= tol[key], (key, name, float(g), want[key], tol[key])


# ----------------------------------------------------------------------- statistics


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", T.DISTANCES)
def test_statistics_match_bruteforce_reference(distance, normalize):
    sets = make_sets(normalized=normalize or distance == "cosine")
    emb, lab = pad_batch(sets)
    for margin in MARGINS:
        got = T.triplet_statistics(emb, lab, margin=margin, distance=distance, normalize=normalize)
        assert list(got) == list(T.STATISTIC_NAMES)
        assert_matches(got, sets, margin, distance, normalize)


@pytest.mark.parametrize("distance", T.DISTANCES)
def test_histograms_count_unordered_pairs_on_fixed_bins(distance):
    """Statistics as triplet_statistics gives them; histograms against brute-force pair loops."""
    sets = make_sets(seed=3)
    emb, lab = pad_batch(sets)
    bins, margin = 7, 0.2
    pos_d, neg_d = [], []
    for _, e, l in sets:
        valid = [i for i in range(len(l)) if l[i] >= 0]
        for i, j in itertools.combinations(valid, 2):
            (pos_d if l[i] == l[j] else neg_d).append(ref_distance(e[i], e[j], distance, True))
    upper = 0.8 * max(pos_d + neg_d)  # some distances lie above the top edge: last bin

    def ref_histogram(values):
        index = np.clip(np.floor(np.array(values) / upper * bins).astype(int), 0, bins - 1)  # 1 - cos can round below 0
        return np.bincount(index, minlength=bins)

    delta = max(distance_error(e, l, distance, True) for _, e, l in sets)

    def near_an_edge(values):  # within the distance error (+ the bin index's rounding) of an edge
        scaled = np.array(values) / upper * bins
        return int(np.sum(np.abs(scaled - np.round(scaled)) <= (delta / upper + 4 * U32) * bins))

    stats, pos, neg = T.triplet_statistics_and_histograms(
        emb, lab, bins=bins, upper_edge=upper, margin=margin, distance=distance
    )
    assert_matches(stats, sets, margin, distance, True)
    for got, values in ((pos.numpy(), pos_d), (neg.numpy(), neg_d)):
        assert got.dtype == np.int64 and got.sum() == len(values)
        assert np.abs(got - ref_histogram(values)).sum() <= 2 * near_an_edge(values)
    assert ref_histogram(pos_d + neg_d)[-1] > 0 and int(pos[-1] + neg[-1]) > 0


def test_statistics_dtypes_shapes_and_known_values():
    # Three boxes on a line, labels a, a, b; one padding box.  Small integers: every Gram
    # entry, root (of 1, 4, 9) and sum is exact in any order, so the values are exact.
    emb = np.array([[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [9.0, 9.0]]], np.float32)
    lab = np.array([[5, 5, 7, -1]])
    got = T.triplet_statistics(emb, lab, margin=0.5, distance="euclidean", normalize=False)
    for name, value in got.items():
        assert value.shape == (1,)
        assert value.dtype == (tf.int64 if name.startswith("n_") else tf.float32), name
    # triplets: (0,1,2): 1-3+.5 < 0 ; (1,0,2): 1-2+.5 < 0  -> none active
    assert got["n_triplets"].numpy()[0] == 2
    assert got["n_active_triplets"].numpy()[0] == 0
    assert got["batch_all_loss"].numpy()[0] == 0.0
    np.testing.assert_array_equal(got["neg_dist_mean"].numpy(), [2.5])
    np.testing.assert_array_equal(got["neg_dist_min"].numpy(), [2.0])
    np.testing.assert_array_equal(got["pos_dist_max"].numpy(), [1.0])
    # hardest: anchor 0 -> max(0, 1 - 3 + .5) = 0; anchor 1 -> max(0, 1 - 2 + .5) = 0
    assert got["batch_hard_loss"].numpy()[0] == 0.0
    got = T.triplet_statistics(emb, lab, margin=2.5, distance="euclidean", normalize=False)
    # hinges: 1-3+2.5 = .5 and 1-2+2.5 = 1.5
    np.testing.assert_array_equal(got["triplet_loss_sum"].numpy(), [2.0])
    np.testing.assert_array_equal(got["batch_all_loss"].numpy(), [1.0])
    assert got["n_identities"].numpy()[0] == 2 and got["n_boxes"].numpy()[0] == 3


def test_single_sets_and_padding_do_not_interact():
    """Each set alone equals its row in a padded batch with huge (1e30) padding.

    Batched and single-set kernels may round differently (other shapes, other blocking),
    so they agree within twice the rounding bound (each is within it of the exact value),
    and exactly in the counts (the sets are well conditioned).
    """
    sets = make_sets(seed=1, normalized=False)
    emb, lab = pad_batch(sets, garbage=1e30)
    margin = 0.2
    batched = T.triplet_statistics(emb, lab, margin=margin, distance="euclidean", normalize=False)
    for b, (name, e, l) in enumerate(sets):
        assert_well_conditioned(e, l, margin, "euclidean", False, name=name)
        alone = T.triplet_statistics(e[None], l[None], margin=margin, distance="euclidean", normalize=False)
        tol = statistic_tolerances(e, l, margin, "euclidean", False)
        for key in T.STATISTIC_NAMES:
            got, want = batched[key].numpy()[b], alone[key].numpy()[0]
            if key.startswith("n_"):
                assert got == want, (key, name)
            else:
                assert abs(float(got) - float(want)) <= 2 * tol[key], (key, name, got, want, tol[key])


@pytest.mark.parametrize("distance,normalize", [("cosine", True), ("euclidean", False)])
def test_unknown_shapes_inside_tf_function(distance, normalize):
    spec = [tf.TensorSpec([None, None, None], tf.float32), tf.TensorSpec([None, None], tf.int32)]
    options = dict(margin=0.3, distance=distance, normalize=normalize)

    @tf.function(input_signature=spec)
    def stats(e, l):
        return T.triplet_statistics(e, l, **options)

    @tf.function(input_signature=spec)
    def loss_and_grad(e, l):
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss = T.triplet_loss(e, l, mining="semi_hard", **options)
        return loss, tape.gradient(loss, e)

    for seed, (n_sets, n_boxes) in enumerate([(3, 7), (1, 12), (4, 5)]):
        sets = make_sets(seed, normalized=normalize)[:n_sets]
        sets = [(nm, e[:n_boxes], l[:n_boxes]) for nm, e, l in sets]
        emb, lab = pad_batch(sets)
        assert_matches(stats(emb, lab), sets, 0.3, distance, normalize)
        loss, grad = loss_and_grad(emb, lab)
        assert loss.shape == ()
        want, tol = expected_loss(sets, "semi_hard", 0.3, distance, normalize)
        assert abs(float(loss) - want) <= tol
        assert np.isfinite(grad.numpy()).all()
        assert np.abs(grad.numpy()).max() > 0


def test_small_side_is_each_anchors_smaller_side_sorted_with_ties_in_column_order():
    """The sorted side that batch-all and semi-hard search: the right boxes, ascending, ties by column.

    Integer vectors give many exact distance ties; five labels of unequal sizes (so an anchor's
    negatives span several labels) and ignored boxes (-1 and -2) in two padded sets.  The
    reference reads the module's own distances: this checks selection and order, not distances.
    """
    rng = np.random.default_rng(5)
    e = rng.integers(-1, 2, size=(2, 40, 3)).astype(np.float32)
    lab = rng.choice([-2, -1, 0, 1, 2, 3, 4], p=[0.05, 0.05, 0.45, 0.2, 0.1, 0.1, 0.05], size=(2, 40))
    g = T.pair_geometry(e, lab)
    side = T._small_side(g, tf.constant(lab, tf.int64))
    dist, values, cols = g.dist.numpy(), side.values.numpy(), side.cols.numpy()
    boxes = np.arange(lab.shape[1])
    sides_seen = set()
    for b, a in itertools.product(range(lab.shape[0]), boxes):
        valid = lab[b] >= 0
        pos = valid & (lab[b] == lab[b, a]) & (boxes != a) & valid[a]
        neg = valid & (lab[b] != lab[b, a]) & valid[a]
        small, sign = (neg, 1.0) if neg.sum() <= pos.sum() else (pos, -1.0)
        want_cols = np.flatnonzero(small)
        key = sign * dist[b, a, want_cols]
        order = np.lexsort((want_cols, key))  # by signed distance, then by column
        k = len(want_cols)
        assert side.count.numpy()[b, a] == k
        np.testing.assert_array_equal(cols[b, a, :k], want_cols[order])
        np.testing.assert_array_equal(values[b, a, :k], key[order])
        assert np.isposinf(values[b, a, k:]).all()
        sides_seen.add((sign, len(set(lab[b, want_cols])) > 1, len(np.unique(key)) < k))
    # Both sides occur, negatives of several labels occur, and so do ties.
    assert {(1.0, True, True), (-1.0, False, True)} <= sides_seen, sides_seen


@pytest.mark.parametrize("pattern", ["seed", "identities", "balanced"])
def test_statistics_of_larger_sets_where_either_side_is_the_smaller(pattern):
    """Sets of 40-90 boxes where some anchors sort their negatives and others their positives.

    seed: 8 boxes labelled 1 (their positives are the smaller side), the rest 0 (their
    negatives); identities: 6 labels; balanced: two labels alternating (ties n_pos + 1 = n_neg).
    """
    # Larger random sets have more near-ties (assert_well_conditioned refuses them): 40 boxes
    # with several labels; this seed's sets have none.
    rng = np.random.default_rng(14)
    n = 90 if pattern == "seed" else 40
    e = rng.normal(size=(n, 5)).astype(np.float32)
    if pattern == "seed":
        lab = np.zeros(n, np.int32)
        lab[rng.choice(n, 8, replace=False)] = 1
    elif pattern == "identities":
        lab = rng.integers(0, 6, n).astype(np.int32)
    else:
        lab = (np.arange(n) % 2).astype(np.int32)
    assert_matches(T.triplet_statistics(e[None], lab[None]), [(pattern, e, lab)], 0.2, "euclidean", True)


# ----------------------------------------------------------------------- losses


def expected_loss(sets, mining, margin, distance, normalize):
    """(reference triplet_loss, its tolerance): the mean over sets with a triplet of each set's loss.

    The tolerance is the largest per-set bound plus the mean's own rounding, gamma_{b+1} * bound.
    """
    key = MINING_KEY[mining]
    values, tols = [], []
    for _, e, l in sets:
        ref = ref_set(e, l, margin, distance, normalize)
        if ref["n_triplets"] > 0:
            assert_well_conditioned(e, l, margin, distance, normalize)
            values.append(ref[key])
            tols.append(statistic_tolerances(e, l, margin, distance, normalize)[key])
    if not values:
        return 0.0, 0.0
    bound = T.max_distance(distance, normalize) + margin
    bound = max(values) if math.isinf(bound) else bound
    return float(np.mean(values)), max(tols) + SLACK * gamma(len(values) + 1) * bound


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", T.DISTANCES)
def test_triplet_loss_is_mean_over_sets_with_triplets(distance, normalize):
    sets = make_sets(seed=2, normalized=normalize or distance == "cosine")
    emb, lab = pad_batch(sets)
    together = T.triplet_losses(emb, lab, minings=T.MINING, distance=distance, normalize=normalize)
    assert list(together) == list(T.MINING)
    for mining in T.MINING:
        want, tol = expected_loss(sets, mining, 0.2, distance, normalize)
        got = float(T.triplet_loss(emb, lab, mining=mining, distance=distance, normalize=normalize))
        assert abs(got - want) <= tol, (mining, got, want, tol)
        assert abs(float(together[mining]) - want) <= tol, (mining, float(together[mining]), want, tol)


@pytest.mark.parametrize("minings", [(), ("batch_all", "batch_all"), ("batch_all", "hardest")])
def test_triplet_losses_refuses_empty_repeated_or_unknown_minings(minings):
    with pytest.raises(ValueError):
        T.triplet_losses(np.zeros((1, 3, 2), np.float32), np.zeros((1, 3), np.int32), minings=minings)


def test_triplet_loss_zero_without_triplets():
    emb = np.random.default_rng(3).normal(size=(3, 5, 4)).astype(np.float32)
    lab = np.array([[1, 1, 1, -1, -1], [-1] * 5, [0, 1, 2, 3, 4]])
    for mining in T.MINING:
        assert float(T.triplet_loss(emb, lab, mining=mining)) == 0.0


def test_merge_sets_pairs_across_images():
    sets = make_sets(seed=4)[:3]
    emb, lab = pad_batch(sets)
    m_emb, m_lab = T.merge_sets(emb, lab)
    assert m_emb.shape == (1, emb.shape[0] * emb.shape[1], emb.shape[2])
    assert m_lab.shape == (1, emb.shape[0] * emb.shape[1])
    merged = ("merged", np.concatenate([e for _, e, _ in sets]), np.concatenate([l for _, _, l in sets]))
    assert_matches(T.triplet_statistics(m_emb, m_lab), [merged], 0.2, "euclidean", True)


# ----------------------------------------------------------------------- gradients


def numeric_gradient(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


def gradient_tolerance(emb, lab, distance, normalize, h):
    """Bound on |float32 gradient - central difference of the float64 loss| for every entry.

    Each loss is a mean (weights summing to <= 2 per set) of distance gradients of size
    <= G (1/|x| normalised, 2 D / |x| squared, 1 or 2 D raw), each with relative error
    2 delta / d_min (its direction from float32 distances) + (dim + n^2 + 10) u (the
    normalisation's Jacobian, the row sums and matmul of the backward pass, any order) +
    the float32 rounding of the input, u |x| / (d_min |x|); the central difference adds
    ~h^2 / (d_min |x|)^3 (third derivative) + 1e-16 / h.
    """
    x = np.asarray(emb, np.float64)[np.asarray(lab) >= 0]
    n, dim = x.shape
    d = ref_distances(x, np.zeros(n, int), "euclidean", normalize)
    d_min = d[d > 0].min()
    norms = np.linalg.norm(x, axis=1)
    reach = 1.0 / norms.min() if normalize or distance == "cosine" else 1.0  # |d d / d x| of a unit-speed move
    size = reach * (2 * d.max() if distance == "squared" else 1.0)
    relative = 2 * distance_error(x, np.zeros(n, int), distance, normalize) / d_min + (dim + n * n + 10) * U32
    relative += U32 * norms.max() / (d_min * (norms.min() if normalize else 1.0))
    fd = h**2 / (d_min * (norms.min() if normalize else 1.0)) ** 3 + 1e-16 / h
    return SLACK * (2 * size * relative + fd), h * reach * 4


@pytest.mark.parametrize(
    "distance,normalize",
    [("euclidean", True), ("squared", True), ("cosine", True), ("euclidean", False), ("squared", False)],
)
@pytest.mark.parametrize("mining", [*T.MINING, "all three"])
def test_gradient_matches_finite_differences(distance, normalize, mining):
    """The sort/searchsorted tricks must give the true gradient of the brute-force loss.

    "all three": the sum of :func:`triplet_losses` (one geometry, one backward pass for the sum),
    whose finite-difference bound is the sum of the three losses' bounds.
    """
    minings = T.MINING if mining == "all three" else (mining,)
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(2, 7, 3))
    lab = np.array([[0, 0, 1, 1, 0, 2, 1], [3, 3, 3, 4, 4, -1, 4]])
    margin = 0.5

    def ref_loss(flat):
        e = flat.reshape(emb.shape)
        losses = [ref_set(e[b], lab[b], margin, distance, normalize) for b in range(2)]
        return sum(float(np.mean([r[MINING_KEY[m]] for r in losses])) for m in minings)

    h = 1e-6
    bounds = [gradient_tolerance(emb[b], lab[b], distance, normalize, h) for b in range(2)]
    tol = len(minings) * max(t for t, _ in bounds)
    for b, (_, moved) in enumerate(bounds):  # no kink of the loss within the step's reach
        assert_well_conditioned(
            emb[b],
            lab[b],
            margin,
            distance,
            normalize,
            delta=moved + distance_error(emb[b], lab[b], distance, normalize),
        )
    want = numeric_gradient(ref_loss, emb.copy(), h)
    x = tf.constant(emb, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        settings = dict(margin=margin, distance=distance, normalize=normalize)
        if mining == "all three":
            loss = tf.add_n(list(T.triplet_losses(x, lab, minings=minings, **settings).values()))
        else:
            loss = T.triplet_loss(x, lab, mining=mining, **settings)
    got = tape.gradient(loss, x).numpy()
    assert np.abs(want).max() > 1e-3  # the case is not degenerate
    assert np.abs(got - want).max() <= tol, (np.abs(got - want).max(), tol)


def batch_hard_gradient_reference(emb, lab, margin):
    """Gradient of the batch-hard loss (squared distance, no normalisation) by hand, numpy float64.

    Tie rule (the module's documented one): each anchor's hardest positive / negative is the
    lowest column among exactly tied distances, and its hinge's gradient goes to that pair only:
    ``d |x_a - x_j|^2 / d x_a = 2 (x_a - x_j)`` and the opposite on ``x_j``.
    Returns (gradient, number of anchors with a tied hardest positive or negative).
    """
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    n = len(lab)
    grad, anchors, ties = np.zeros_like(emb), [], 0
    for a in range(n):
        pos = [j for j in range(n) if j != a and lab[j] == lab[a]]
        neg = [j for j in range(n) if lab[j] != lab[a]]
        if not pos or not neg:
            continue
        p = max(pos, key=lambda j: (d[a, j], -j))  # largest distance, lowest column on ties
        q = min(neg, key=lambda j: (d[a, j], j))
        ties += sum(d[a, j] == d[a, p] for j in pos) > 1 or sum(d[a, j] == d[a, q] for j in neg) > 1
        if d[a, p] - d[a, q] + margin > 0:
            anchors.append((a, p, q))
    for a, p, q in anchors:
        for j, sign in ((p, 1.0), (q, -1.0)):
            grad[a] += sign * 2 * (emb[a] - emb[j]) / len(anchors)
            grad[j] -= sign * 2 * (emb[a] - emb[j]) / len(anchors)
    return grad, ties


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("with_batch_all", [False, True])
def test_batch_hard_gradient_goes_to_the_lowest_tied_column(tied, with_batch_all):
    """batch_hard's gradient, by hand: tie-free, and on exact ties (all to the lowest column).

    Small integer points, 8 anchors, all active (margin 50): every distance, weight (2 / 8) and
    gradient sum is exact in float32 in any order, so the comparison is exact.  With batch-all in
    the same triplet_losses call the hardest pairs are read off the sorted sides: the same rule.
    """
    if tied:  # from (0, 0): three positives at 4, two negatives at 25; from (6, 6): two negatives at 52
        emb = np.array([[0, 0], [2, 0], [0, 2], [-2, 0], [5, 0], [0, -5], [6, 6], [-6, 5]], np.float64)
    else:  # distinct squared distances from every anchor
        emb = np.array([[0, 0], [3, 1], [1, 4], [6, 7], [9, 2], [13, 9], [4, 11], [10, 14]], np.float64)
    lab = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    want, ties = batch_hard_gradient_reference(emb, lab, margin=50.0)
    assert (ties > 0) == tied
    x = tf.constant(emb[None], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        settings = dict(margin=50.0, distance="squared", normalize=False)
        if with_batch_all:
            loss = T.triplet_losses(x, lab[None], minings=("batch_all", "batch_hard"), **settings)["batch_hard"]
        else:
            loss = T.triplet_loss(x, lab[None], mining="batch_hard", **settings)
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy()[0], want)


def degenerate_batch():
    rng = np.random.default_rng(6)
    e = rng.normal(size=(3, 8, 5)).astype(np.float32)
    e[0, 1] = e[0, 0]  # coincident positives
    e[0, 3] = e[0, 0]  # coincident negative
    e[1, :4] = 0.0  # zero vectors
    e[2] = 1.0  # every vector identical
    lab = np.array([[0, 0, 1, 1, 0, 1, 2, 2], [0, 1, 0, 1, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1, 2, 2]])
    return e, lab


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", T.DISTANCES)
def test_gradients_finite_at_coincident_and_zero_vectors(distance, normalize):
    e, lab = degenerate_batch()
    x = tf.constant(e)
    for mining in T.MINING:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = T.triplet_loss(x, lab, mining=mining, margin=0.2, distance=distance, normalize=normalize)
        grad = tape.gradient(loss, x).numpy()
        assert np.isfinite(loss.numpy()), (mining, loss)
        assert np.isfinite(grad).all(), mining
    with tf.GradientTape() as tape:
        tape.watch(x)
        d = T.pairwise_distances(x, distance, normalize)
        total = tf.reduce_sum(d)
    assert np.isfinite(tape.gradient(total, x).numpy()).all()
    np.testing.assert_array_equal(np.diagonal(d.numpy(), axis1=1, axis2=2), 0.0)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", T.DISTANCES)
def test_coincident_rows_are_at_distance_zero_in_any_summation_order(distance, normalize):
    """Copies of random rows are at distance exactly 0, near-copies within the rounding bound.

    A Gram matrix rounds |x_i|^2 + |x_j|^2 - 2 x_i.x_j at the scale of the squared norms, so
    a float32 one puts copies at ~1e-3 and lets kernels disagree (the AMD failure of the
    padding test).  Permuting the coordinates changes every dot product's summation order,
    as another kernel would, without changing a distance; rows far from the origin
    (offset 1e3, spread 1e-3) are the worst case for the unnormalised distances.
    """
    rng = np.random.default_rng(13)
    n, dim = 24, 100
    base = rng.normal(size=(n // 3, dim))
    if not normalize:
        base = 1e3 + 1e-3 * base  # far from the origin: norms 1e4, distances 1e-2
    rows = np.concatenate([base, base, base + 1e-4 * rng.normal(size=base.shape) * np.abs(base).max()])
    rows = rows[rng.permutation(n)].astype(np.float32)
    lab = np.zeros(n, np.int32)
    want = ref_distances(rows, lab, distance, normalize)
    bound = distance_error(rows, lab, distance, normalize)
    copies = np.all(rows[:, None, :] == rows[None, :, :], axis=-1)
    assert copies.sum() > n  # the case has off-diagonal copies
    for order in (np.arange(dim), rng.permutation(dim), np.arange(dim)[::-1]):
        x = rows[:, order]
        alone = T.pairwise_distances(x[None], distance, normalize).numpy()[0]
        batch = np.stack([x[::-1], x, np.zeros_like(x)])
        batched = T.pairwise_distances(batch, distance, normalize).numpy()[1]
        for got in (alone, batched):
            np.testing.assert_array_equal(got[copies], 0.0)
            assert np.abs(got - want).max() <= bound, (np.abs(got - want).max(), bound)


def test_half_squared_norm_gradient_is_x():
    """The second seed: d/dx 0.5 * ||x||^2 = x, via the distance helpers and vector_norms."""
    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(size=(5, 6)) * 10.0, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        pairs = tf.stack([x, tf.zeros_like(x)], axis=1)  # [5 sets, 2 boxes, 6]
        d2 = T.pairwise_distances(pairs, "squared", normalize=False)[:, 0, 1]
        via_distance = tf.reduce_sum(0.5 * d2)
        via_norm = tf.reduce_sum(0.5 * tf.square(T.vector_norms(x)["l2"]))
    # Bounds (any order, u = 2**-24): the gradient s * 2 (u_i - u_j) * 0.5 of a pair with 0 is
    # x up to one rounding per operation (< 4u); |x|^2 of 6 terms: gamma_6 + 2u < 1e-6.
    np.testing.assert_allclose(tape.gradient(via_distance, x).numpy(), x.numpy(), rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(via_norm, x).numpy(), x.numpy(), rtol=1e-5)
    np.testing.assert_allclose(d2.numpy(), np.sum(x.numpy() ** 2, axis=1), rtol=1e-5)


# ----------------------------------------------------------------------- bounds & overflow


def adversarial_batch():
    rng = np.random.default_rng(8)
    e = rng.normal(size=(6, 10, 4)).astype(np.float32)
    e[0] *= 1e30
    e[1] *= 1e-30
    e[2, ::2] = 0.0
    e[3, 5:] = -e[3, :5]  # antipodal pairs: maximal distances
    e[4, :, 1:] = 0.0  # collinear
    e[5, :] = e[5, 0]  # all identical
    lab = np.tile(np.array([0, 0, 1, 1, 2, 0, 1, 1, 0, 2]), (6, 1))
    lab[3] = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]  # positives close, negatives antipodal
    lab[4] = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    return e, lab


@pytest.mark.parametrize("distance", T.DISTANCES)
def test_losses_bounded_with_normalization(distance):
    rng = np.random.default_rng(9)
    cases = [adversarial_batch(), (rng.normal(size=(4, 12, 3)).astype(np.float32), rng.integers(-1, 3, (4, 12)))]
    for margin in (0.0, 0.2, 3.0):
        bound = T.max_distance(distance, True) + margin
        for e, lab in cases:
            stats = T.triplet_statistics(e, lab, margin=margin, distance=distance)
            for key in ("batch_all_loss", "batch_hard_loss", "semi_hard_loss"):
                v = stats[key].numpy()
                assert (v >= 0).all() and (v <= bound).all(), (key, v, bound)
            for key in ("pos_dist_max", "neg_dist_min", "pos_dist_mean", "neg_dist_mean"):
                v = stats[key].numpy()
                assert (v >= 0).all() and (v <= T.max_distance(distance, True)).all(), key
            for mining in T.MINING:
                v = float(T.triplet_loss(e, lab, mining=mining, margin=margin, distance=distance))
                assert 0.0 <= v <= bound


def test_max_distance_is_attained():
    e = np.array([[[1.0, 0.0], [-1.0, 0.0]]], np.float32)  # antipodal unit vectors: exact in any order
    for distance in T.DISTANCES:
        d = T.pairwise_distances(e, distance)[0, 0, 1].numpy()
        assert d == T.max_distance(distance, True)
    assert T.max_distance("euclidean", normalize=False) == math.inf
    assert T.max_distance("cosine", normalize=False) == 2.0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", T.DISTANCES)
def test_huge_inputs_stay_finite(distance, normalize):
    e, lab = adversarial_batch()
    e = np.where(np.abs(e) > 0, np.sign(e) * 1e30, 0.0).astype(np.float32)
    e[1] = np.float32(3e38) * np.sign(e[1] + 0.5)  # near float32 max
    x = tf.constant(e)
    stats = T.triplet_statistics(x, lab, distance=distance, normalize=normalize)
    for key, value in stats.items():
        assert np.isfinite(value.numpy()).all(), key
    for mining in T.MINING:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = T.triplet_loss(x, lab, mining=mining, distance=distance, normalize=normalize)
        assert np.isfinite(loss.numpy()), mining
        assert np.isfinite(tape.gradient(loss, x).numpy()).all(), mining


def test_scaling_invariance_and_equivariance():
    """Normalised stats ignore scale (for norms >= eps); unnormalised ones scale with the input."""
    sets = make_sets(seed=10, normalized=False)[:6]
    emb, lab = pad_batch(sets, garbage=0.0)
    base_n = T.triplet_statistics(emb, lab, distance="euclidean")
    base_u = T.triplet_statistics(emb, lab, distance="euclidean", normalize=False)
    keys = ("pos_dist_mean", "neg_dist_min", "batch_all_loss", "semi_hard_loss")

    def tolerance(normalize):
        """Per set: both sides within their bound of exact; rounding x * s moves each row by
        <= u |x| (each distance by <= 2u max|x|, each loss by twice that; normalised: 2u);
        dividing by s rounds once more."""
        tol = {key: [] for key in keys}
        for _, e, l in sets:
            assert_well_conditioned(e, l, 0.2, "euclidean", normalize, name="scaled")
            bound = statistic_tolerances(e, l, 0.2, "euclidean", normalize)
            moved = 2 * U32 * (1.0 if normalize else np.linalg.norm(e[l >= 0], axis=1).max(initial=0.0))
            for key in keys:
                tol[key].append(
                    2 * bound[key] + SLACK * 2 * moved + 2 * U32 * abs(ref_set(e, l, 0.2, "euclidean", normalize)[key])
                )
        return {key: np.array(value) for key, value in tol.items()}

    tol_u, tol_n = tolerance(False), tolerance(True)
    for s in (1e-20, 1e-9, 1e20):
        scaled = (emb.astype(np.float64) * s).astype(np.float32)
        got_u = T.triplet_statistics(scaled, lab, distance="euclidean", normalize=False, margin=0.2 * s)
        for key in keys:
            assert (np.abs(got_u[key].numpy() / s - base_u[key].numpy()) <= tol_u[key]).all(), (key, s)
        if s > 1e-11:  # only vectors longer than eps = 1e-12 have a direction
            got_n = T.triplet_statistics(scaled, lab, distance="euclidean")
            for key in keys:
                assert (np.abs(got_n[key].numpy() - base_n[key].numpy()) <= tol_n[key]).all(), (key, s)
        np.testing.assert_array_equal(got_u["n_active_triplets"].numpy(), base_u["n_active_triplets"].numpy())


def test_vector_norms_against_numpy():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3] = 0.0
    x[4] = [3e38, -3e38, 0, 0, 0]  # l2 overflows float32 only because the true norm does
    got = {k: v.numpy() for k, v in T.vector_norms(x).items()}
    x64 = x.astype(np.float64)
    # 5 terms, any order: l2 within gamma_5 / 2 + 2u, l1 within gamma_5 + u, both < 1e-6 (u = 2**-24).
    rows = [0, 1, 2, 3]
    np.testing.assert_allclose(got["l2"][rows], np.linalg.norm(x64, axis=1)[rows], rtol=1e-6)
    np.testing.assert_allclose(got["l1"][rows], np.abs(x64).sum(axis=1)[rows], rtol=1e-6)
    np.testing.assert_array_equal(got["max_abs"], np.abs(x).max(axis=1))
    assert np.isinf(got["l2"][4])
    with tf.GradientTape() as tape:
        xt = tf.constant(x[:4])
        tape.watch(xt)
        total = tf.reduce_sum(T.vector_norms(xt)["l2"])
    assert np.isfinite(tape.gradient(total, xt).numpy()).all()


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [3e30, -4e30], [3e-9, 4e-9], [1e-30, 0.0]], np.float32)
    got = T.l2_normalize(x).numpy()
    # 2 terms: each component within (gamma_2 / 2 + 2u) / 0.6 < 1e-6 relative; the gradient's
    # few operations per component within ~10u < 1e-5.
    np.testing.assert_allclose(got[[0, 2, 3]], [[0.6, 0.8], [0.6, -0.8], [0.6, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0.0, 0.0])
    # below eps a vector has no direction: it normalizes to 0, so normalizing twice is normalizing once
    np.testing.assert_array_equal(got[4], [0.0, 0.0])
    np.testing.assert_allclose(T.l2_normalize(got).numpy(), got, rtol=1e-6)
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        y = tf.reduce_sum(T.l2_normalize(xt) * [1.0, 2.0])
    grad = tape.gradient(y, xt).numpy()
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[[1, 4]], 0.0)  # no direction, no pull
    np.testing.assert_allclose(grad[0], [0.8 * (0.8 - 2 * 0.6) / 5, 0.6 * (2 * 0.6 - 0.8) / 5], rtol=1e-5)


# ----------------------------------------------------------------------- scale & validation


def test_seed_scale_binary_set_runs():
    """The seed's full grid: 1,690 boxes, 36 labelled 1, the rest 0 (O(n^2) memory)."""
    n, n1 = 1690, 36
    rng = np.random.default_rng(12)
    e = rng.normal(size=(1, n, 100)).astype(np.float32)
    lab = np.zeros((1, n), np.int32)
    lab[0, rng.choice(n, n1, replace=False)] = 1
    stats = T.triplet_statistics(e, lab)
    n0 = n - n1
    assert stats["n_triplets"].numpy()[0] == n1 * (n1 - 1) * n0 + n0 * (n0 - 1) * n1
    assert stats["n_pos_pairs"].numpy()[0] == n1 * (n1 - 1) // 2 + n0 * (n0 - 1) // 2
    assert stats["n_neg_pairs"].numpy()[0] == n1 * n0
    # batch-hard from an independent O(n^2) numpy computation
    u = e[0] / np.linalg.norm(e[0], axis=1, keepdims=True)
    d = np.sqrt(np.maximum(2.0 - 2.0 * (u.astype(np.float64) @ u.T.astype(np.float64)), 0.0))
    same = lab[0][:, None] == lab[0][None, :]
    hp = np.where(same & ~np.eye(n, dtype=bool), d, -np.inf).max(1)
    hn = np.where(~same, d, np.inf).min(1)
    # batch-hard's bound (statistic_tolerances, without the O(n^3) reference): 2 delta + (gamma_{n+1} + u) B.
    bound = SLACK * (2 * distance_error(e[0], lab[0], "euclidean", True) + (gamma(n + 1) + U32) * (2.0 + 0.2))
    assert abs(stats["batch_hard_loss"].numpy()[0] - np.maximum(hp - hn + 0.2, 0).mean()) <= bound
    for key, value in stats.items():
        assert np.isfinite(value.numpy()).all(), key
    x = tf.constant(e)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = sum(T.triplet_loss(x, lab, mining=m) for m in T.MINING)
    assert np.isfinite(tape.gradient(loss, x).numpy()).all()


def test_validation_errors():
    e = np.zeros((1, 3, 2), np.float32)
    lab = np.zeros((1, 3), np.int32)
    cases = [
        (lambda: T.triplet_loss(e, lab, distance="manhattan"), "distance"),
        (lambda: T.triplet_statistics(e, lab, distance="l1"), "distance"),
        (lambda: T.triplet_loss(e, lab, mining="hardest"), "mining"),
        (lambda: T.triplet_loss(e, lab, margin=-0.1), "margin"),
        (lambda: T.triplet_statistics(e, lab, margin=float("nan")), "margin"),
        (lambda: T.pairwise_distances(e, "hamming"), "distance"),
        (lambda: T.max_distance("nope"), "distance"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert word in message and "\n" not in message


def test_pair_geometry_masks_by_hand():
    """The geometry the Trainer's recall@1 reads: pairs of distinct valid boxes, split by label."""
    labels = np.array([[0, 0, 1, -1]])
    x = np.eye(4, dtype=np.float32)[None]
    g = T.pair_geometry(x, labels)
    pos = np.zeros((1, 4, 4), bool)
    pos[0, 0, 1] = pos[0, 1, 0] = True
    neg = np.zeros((1, 4, 4), bool)
    neg[0, [0, 1], 2] = neg[0, 2, [0, 1]] = True
    np.testing.assert_array_equal(g.pos.numpy(), pos)
    np.testing.assert_array_equal(g.neg.numpy(), neg)
    np.testing.assert_array_equal(g.valid.numpy(), [[True, True, True, False]])
    np.testing.assert_array_equal(g.n_pos.numpy(), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(g.n_neg.numpy(), [[1, 1, 2, 0]])
    # unit basis vectors are sqrt(2) apart (float64 Gram: exact to float32 rounding)
    np.testing.assert_allclose(g.dist.numpy()[0, :3, :3], np.sqrt(2.0) * (1 - np.eye(3)), rtol=1e-6)


def test_constant_inputs_inside_tf_function_match_argument_inputs():
    """Regression: with constant inputs TensorFlow's constant folding once broke a reshape when one half of the
    semi-hard rows was empty (every anchor has fewer positives than negatives here)."""
    rng = np.random.default_rng(21)
    emb = rng.normal(size=(1, 300, 8)).astype(np.float32)
    lab = rng.integers(0, 20, size=(1, 300)).astype(np.int64)

    def run(x, labels):
        return {**T.triplet_statistics(x, labels), **{m: T.triplet_loss(x, labels, mining=m) for m in T.MINING}}

    by_argument = tf.function(run)(tf.constant(emb), tf.constant(lab))
    by_constant = tf.function(lambda: run(tf.constant(emb), tf.constant(lab)))()
    for key, value in by_argument.items():
        np.testing.assert_array_equal(by_constant[key].numpy(), value.numpy(), err_msg=key)
