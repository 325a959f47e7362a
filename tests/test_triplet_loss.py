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

REF_EPS = 1e-12  # the module's documented floor for x / max(||x||, eps)
MARGINS = (0.2, 1.0)


# ----------------------------------------------------------------------- reference


def ref_distance(x, y, distance, normalize):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if distance == "cosine":
        nx, ny = max(np.linalg.norm(x), REF_EPS), max(np.linalg.norm(y), REF_EPS)
        return 1.0 - float(np.dot(x, y)) / (nx * ny)
    if normalize:
        x = x / max(np.linalg.norm(x), REF_EPS)
        y = y / max(np.linalg.norm(y), REF_EPS)
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
    base = rng.normal(size=(4, dim))
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


def assert_matches(got, want, names, tol):
    for key in T.STATISTIC_NAMES:
        g = np.asarray(got[key])
        w = np.array([ref[key] for ref in want])
        if key.startswith("n_"):
            np.testing.assert_array_equal(g, w, err_msg=f"{key} for {names}")
        else:
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"{key} for {names}")


def tolerance(distance, normalize):
    # float32 Gram-matrix distances; unnormalised data has norms ~2-4 (squared ~16).
    return 2e-4 if normalize or distance == "cosine" else 2e-3


# ----------------------------------------------------------------------- statistics


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", T.DISTANCES)
def test_statistics_match_bruteforce_reference(distance, normalize):
    sets = make_sets(normalized=normalize or distance == "cosine")
    names = [s[0] for s in sets]
    emb, lab = pad_batch(sets)
    for margin in MARGINS:
        got = T.triplet_statistics(emb, lab, margin=margin, distance=distance, normalize=normalize)
        assert list(got) == list(T.STATISTIC_NAMES)
        want = [ref_set(e, l, margin, distance, normalize) for _, e, l in sets]
        assert_matches(got, want, names, tolerance(distance, normalize))


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

    def near_an_edge(values):  # float32 vs float64 may bin these either side
        scaled = np.array(values) / upper * bins
        return int(np.sum(np.abs(scaled - np.round(scaled)) < 1e-4))

    stats, pos, neg = T.triplet_statistics_and_histograms(
        emb, lab, bins=bins, upper_edge=upper, margin=margin, distance=distance)
    assert_matches(stats, [ref_set(e, l, margin, distance, True) for _, e, l in sets], [s[0] for s in sets],
                   tolerance(distance, True))
    for got, values in ((pos.numpy(), pos_d), (neg.numpy(), neg_d)):
        assert got.dtype == np.int64 and got.sum() == len(values)
        assert np.abs(got - ref_histogram(values)).sum() <= 2 * near_an_edge(values)
    assert ref_histogram(pos_d + neg_d)[-1] > 0 and int(pos[-1] + neg[-1]) > 0


def test_statistics_dtypes_shapes_and_known_values():
    # Three boxes on a line, labels a, a, b; one padding box.
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
    np.testing.assert_allclose(got["neg_dist_mean"].numpy(), [2.5])
    np.testing.assert_allclose(got["neg_dist_min"].numpy(), [2.0])
    np.testing.assert_allclose(got["pos_dist_max"].numpy(), [1.0])
    # hardest: anchor 0 -> max(0, 1 - 3 + .5) = 0; anchor 1 -> max(0, 1 - 2 + .5) = 0
    assert got["batch_hard_loss"].numpy()[0] == 0.0
    got = T.triplet_statistics(emb, lab, margin=2.5, distance="euclidean", normalize=False)
    # hinges: 1-3+2.5 = .5 and 1-2+2.5 = 1.5
    np.testing.assert_allclose(got["triplet_loss_sum"].numpy(), [2.0], rtol=1e-6)
    np.testing.assert_allclose(got["batch_all_loss"].numpy(), [1.0], rtol=1e-6)
    assert got["n_identities"].numpy()[0] == 2 and got["n_boxes"].numpy()[0] == 3


def test_single_sets_and_padding_do_not_interact():
    """Each set alone equals its row in a padded batch with huge/NaN padding."""
    sets = make_sets(seed=1, normalized=False)
    emb, lab = pad_batch(sets, garbage=1e30)
    batched = T.triplet_statistics(emb, lab, distance="euclidean", normalize=False)
    for b, (name, e, l) in enumerate(sets):
        alone = T.triplet_statistics(e[None], l[None], distance="euclidean", normalize=False)
        for key in T.STATISTIC_NAMES:
            np.testing.assert_allclose(
                batched[key].numpy()[b], alone[key].numpy()[0], rtol=1e-5, atol=1e-5, err_msg=f"{key} {name}"
            )


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
        want = [ref_set(e, l, 0.3, distance, normalize) for _, e, l in sets]
        assert_matches(stats(emb, lab), want, [s[0] for s in sets], tolerance(distance, normalize))
        loss, grad = loss_and_grad(emb, lab)
        assert loss.shape == ()
        assert float(loss) == pytest.approx(expected_loss(sets, "semi_hard", 0.3, distance, normalize), abs=1e-3)
        assert np.isfinite(grad.numpy()).all()
        assert np.abs(grad.numpy()).max() > 0


# ----------------------------------------------------------------------- losses


def expected_loss(sets, mining, margin, distance, normalize):
    refs = [ref_set(e, l, margin, distance, normalize) for _, e, l in sets]
    with_triplets = [r[MINING_KEY[mining]] for r in refs if r["n_triplets"] > 0]
    return float(np.mean(with_triplets)) if with_triplets else 0.0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("distance", T.DISTANCES)
def test_triplet_loss_is_mean_over_sets_with_triplets(distance, normalize):
    sets = make_sets(seed=2, normalized=normalize or distance == "cosine")
    emb, lab = pad_batch(sets)
    for mining in T.MINING:
        got = float(T.triplet_loss(emb, lab, mining=mining, distance=distance, normalize=normalize))
        want = expected_loss(sets, mining, 0.2, distance, normalize)
        assert got == pytest.approx(want, rel=1e-4, abs=tolerance(distance, normalize)), mining


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
    merged_e = np.concatenate([e for _, e, _ in sets])
    merged_l = np.concatenate([l for _, _, l in sets])
    want = [ref_set(merged_e, merged_l, 0.2, "euclidean", True)]
    assert_matches(T.triplet_statistics(m_emb, m_lab), want, ["merged"], 2e-4)


# ----------------------------------------------------------------------- gradients


def numeric_gradient(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


@pytest.mark.parametrize(
    "distance,normalize",
    [("euclidean", True), ("squared", True), ("cosine", True), ("euclidean", False), ("squared", False)],
)
@pytest.mark.parametrize("mining", T.MINING)
def test_gradient_matches_finite_differences(distance, normalize, mining):
    """The sort/searchsorted tricks must give the true gradient of the brute-force loss."""
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(2, 7, 3))
    lab = np.array([[0, 0, 1, 1, 0, 2, 1], [3, 3, 3, 4, 4, -1, 4]])
    margin = 0.5

    def ref_loss(flat):
        e = flat.reshape(emb.shape)
        losses = [ref_set(e[b], lab[b], margin, distance, normalize) for b in range(2)]
        return float(np.mean([r[MINING_KEY[mining]] for r in losses]))

    want = numeric_gradient(ref_loss, emb.copy())
    x = tf.constant(emb, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = T.triplet_loss(x, lab, mining=mining, margin=margin, distance=distance, normalize=normalize)
    got = tape.gradient(loss, x).numpy()
    assert np.abs(want).max() > 1e-3  # the case is not degenerate
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


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
    e = np.array([[[1.0, 0.0], [-1.0, 0.0]]], np.float32)  # antipodal unit vectors
    for distance in T.DISTANCES:
        d = T.pairwise_distances(e, distance)[0, 0, 1].numpy()
        assert d == pytest.approx(T.max_distance(distance, True), rel=1e-6)
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
    for s in (1e-20, 1e-9, 1e20):
        scaled = (emb.astype(np.float64) * s).astype(np.float32)
        got_u = T.triplet_statistics(scaled, lab, distance="euclidean", normalize=False, margin=0.2 * s)
        for key in keys:
            np.testing.assert_allclose(got_u[key].numpy() / s, base_u[key].numpy(), rtol=1e-4, atol=1e-5)
        if s > 1e-11:  # x / max(||x||, 1e-12) only normalises vectors longer than eps
            got_n = T.triplet_statistics(scaled, lab, distance="euclidean")
            for key in keys:
                np.testing.assert_allclose(got_n[key].numpy(), base_n[key].numpy(), rtol=1e-4, atol=1e-5)
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
    np.testing.assert_allclose(got[[0, 2, 3]], [[0.6, 0.8], [0.6, -0.8], [0.6, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0.0, 0.0])
    # below eps the formula x / max(||x||, eps) gives x / eps, not a unit vector
    np.testing.assert_allclose(got[4], [1e-18, 0.0], rtol=1e-6)
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
    np.testing.assert_allclose(stats["batch_hard_loss"].numpy()[0], np.maximum(hp - hn + 0.2, 0).mean(), rtol=1e-4)
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
