"""Benchmark components.triplet_loss: time and peak memory of the loss graph vs boxes.

For each case (boxes x label pattern) a fresh subprocess builds one tf.function that
computes all three triplet_loss minings (summed) plus triplet_statistics, and times it
warm, forward only and forward+backward.  Peak memory is the growth of ru_maxrss over
the process's own baseline after importing TensorFlow (tracemalloc cannot see TF).
Where it fits (boxes^3 * 8 bytes <= 2 GB) a vectorised O(boxes^3) float64 numpy
reference computes the same three losses, for its time and the largest difference.

    .venv/bin/python bench/bench_loss.py            # full table (~2-3 minutes)
    .venv/bin/python bench/bench_loss.py --boxes 128 512 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 100
SEED_POSITIVES = 36  # the seed grid: 36 boxes labelled 1, the rest 0
IDENTITIES = 20
MARGIN = 0.2
REFERENCE_LIMIT_BYTES = 2 * 1024**3  # skip the O(n^3) reference above this


def make_case(pattern, boxes, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(1, boxes, DIM)).astype(np.float32)
    if pattern == "seed":
        labels = np.zeros((1, boxes), np.int32)
        labels[0, rng.choice(boxes, min(SEED_POSITIVES, boxes), replace=False)] = 1
    else:
        labels = rng.integers(0, IDENTITIES, size=(1, boxes)).astype(np.int32)
    return emb, labels


def reference_losses(emb, labels, margin=MARGIN):
    """Vectorised brute force (float64, O(n^3) memory): batch-all, batch-hard, semi-hard."""
    x = emb[0].astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
    lab = labels[0]
    valid = lab >= 0
    same = (lab[:, None] == lab[None, :]) & valid[:, None] & valid[None, :]
    pos = same & ~np.eye(len(lab), dtype=bool)
    neg = ~same & valid[:, None] & valid[None, :]
    hinge = d[:, :, None] - d[:, None, :] + margin  # [a, p, n]
    mask = pos[:, :, None] & neg[:, None, :]
    active = mask & (hinge > 0)
    batch_all = hinge[active].sum() / max(active.sum(), 1)
    del active
    hardest_pos = np.where(pos, d, -np.inf).max(1)
    hardest_neg = np.where(neg, d, np.inf).min(1)
    anchors = pos.any(1) & neg.any(1)
    batch_hard = np.maximum(hardest_pos - hardest_neg + margin, 0)[anchors].mean()
    d_an = np.broadcast_to(d[:, None, :], hinge.shape)
    farther = np.where(mask & (d_an > d[:, :, None]), d_an, np.inf).min(-1)
    farthest = np.where(neg, d, -np.inf).max(1)[:, None]
    chosen = np.where(np.isfinite(farther), farther, farthest)
    pairs = pos & neg.any(1)[:, None]
    semi_hard = np.maximum(d - chosen + margin, 0)[pairs].mean()
    return float(batch_all), float(batch_hard), float(semi_hard)


def timed(fn, reps):
    """Median wall seconds and median process CPU seconds (all threads) of warm calls."""
    fn()  # warm (trace + first run)
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def run_case(pattern, boxes, reps):
    """One case in this (fresh) process; returns a dict of results."""
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from components.triplet_loss import MINING, triplet_loss, triplet_statistics

    tf.constant(0.0) + 1.0  # initialise the runtime before the baseline
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    emb, labels = make_case(pattern, boxes)
    x, lab = tf.constant(emb), tf.constant(labels)

    def all_losses(e):
        total = tf.add_n([triplet_loss(e, lab, mining=m, margin=MARGIN) for m in MINING])
        return total, triplet_statistics(e, lab, margin=MARGIN)

    @tf.function
    def forward():
        total, stats = all_losses(x)
        return total, [stats[k] for k in ("batch_all_loss", "batch_hard_loss", "semi_hard_loss")]

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            total, stats = all_losses(x)
        return total, tape.gradient(total, x), stats  # stats returned so they are not pruned

    t_fwd, _ = timed(lambda: [t.numpy() for t in tf.nest.flatten(forward())], reps)
    t_bwd, cpu_bwd = timed(lambda: [t.numpy() for t in tf.nest.flatten(forward_backward())], reps)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    got = [float(v.numpy()[0]) for v in forward()[1]]
    _, grad, _ = forward_backward()
    result = dict(
        pattern=pattern,
        boxes=boxes,
        fwd_s=t_fwd,
        fwd_bwd_s=t_bwd,
        fwd_bwd_cpu_s=cpu_bwd,
        peak_mb=peak_mb,
        grad_finite=bool(np.isfinite(grad.numpy()).all()),
        ref_s=None,
        max_diff=None,
        losses=got,
    )
    if boxes**3 * 8 <= REFERENCE_LIMIT_BYTES:
        start = time.perf_counter()
        want = reference_losses(emb, labels)
        result["ref_s"] = time.perf_counter() - start
        result["max_diff"] = float(np.max(np.abs(np.array(got) - np.array(want))))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 512, 1024, 1690])
    parser.add_argument("--patterns", nargs="+", default=["seed", "identities"], choices=["seed", "identities"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--case", nargs=2, metavar=("PATTERN", "BOXES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.reps)))
        return

    rows = []
    for pattern in args.patterns:
        for boxes in args.boxes:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", pattern, str(boxes), "--reps", str(args.reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"case {pattern} {boxes} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"done {pattern} {boxes}", file=sys.stderr, flush=True)

    print(f"dim {DIM}, margin {MARGIN}, euclidean, normalize; all three minings + statistics in one tf.function;")
    print(
        f"median of {args.reps} warm runs; {os.cpu_count()} CPU cores, load average at the end "
        f"{os.getloadavg()[0]:.1f}; CPU ms = process CPU time of all threads; "
        "peak = ru_maxrss growth over a fresh process with TF imported\n"
    )
    print(
        "| labels | boxes | fwd ms | fwd+bwd ms | fwd+bwd CPU ms | peak MB "
        "| numpy O(n^3) ms | numpy / fwd | max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = f"{r['ref_s'] * 1000:.0f}" if r["ref_s"] is not None else "skipped (>2 GB)"
        ratio = f"{r['ref_s'] / r['fwd_s']:.1f}x" if r["ref_s"] is not None else "-"
        diff = f"{r['max_diff']:.1e}" if r["max_diff"] is not None else "-"
        assert r["grad_finite"], r
        print(
            f"| {r['pattern']} | {r['boxes']} | {r['fwd_s'] * 1000:.0f} | {r['fwd_bwd_s'] * 1000:.0f} "
            f"| {r['fwd_bwd_cpu_s'] * 1000:.0f} | {r['peak_mb']:.0f} | {ref} | {ratio} | {diff} |"
        )


if __name__ == "__main__":
    main()
