"""Benchmark components.triplet_loss against a numpy sort-and-prefix-sum batch-all, in one run.

Targets (issue 13), N = 1,690 boxes (the seed grid), dim 100, L2-normalized, margin 0.2:
all three losses + statistics, forward+backward, within 2x of the numpy batch-all forward
(`numpy_batch_all`, written below: each anchor's negatives sorted, prefix sums, searchsorted),
for both label patterns ("all": one `triplet_losses` call for the three, differentiated, and
`triplet_statistics`; also timed as three `triplet_loss` calls, which take three distance
backward passes); batch-all alone forward+backward within 1.5x; peak memory under
300 MB.  Also the shapes the other components use: a batch of 16 padded sets, dense
(1,690 boxes) and sparse (85 valid boxes padded to 96, as the pipeline pads), in sets/s.

Each case runs in a fresh subprocess (peak memory = growth of ru_maxrss over the process
after importing TensorFlow; on a GPU, the device allocator's peak).  Inside it the
measurements are interleaved, `--repeats` rounds (a sparse16 round: `SPARSE_CALLS_PER_ROUND` calls),
and each keeps its fastest and median round: the machine is shared, so ratios are
taken within one process, of the fastest rounds.  `--module PATH` times another version
of the loss module (e.g. `git show REV:components/triplet_loss.py > /tmp/old.py`) in the
same run, for before/after figures.  TensorFlow's CPU allocator is the one `tripletflow` gives it
(BFC, `pipelines.cli.use_bfc_cpu_allocator`); `TF_CPU_ALLOCATOR_USE_BFC=false` in the environment
times TensorFlow's default instead.  glibc's malloc keeps the numpy baseline's arrays
(`BASELINE_MALLOC`), so neither side of a ratio pays fresh pages each round.

    .venv/bin/python bench/bench_loss.py                       # ~3 minutes on 2 cores
    .venv/bin/python bench/bench_loss.py --module /tmp/old.py  # adds the old module's rows
    .venv/bin/python bench/bench_loss.py --device GPU          # on a GPU machine (gpu_trainer.sh)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 100
BOXES = 1690  # the seed grid: 2 x 13 x 13 x 5
SEED_POSITIVES = 36  # the seed grid: 36 boxes labelled 1, the rest 0
IDENTITIES = 20
MARGIN = 0.2
BATCH = 16  # the Trainer's and the pipeline's batch of padded sets
SPARSE_BOXES, SPARSE_PADDED = 85, 96  # ~5% of the grid's boxes hold an object; padded as the pipeline pads
NORM_EPS = 1e-12
TARGET_ALL, TARGET_BATCH_ALL, TARGET_PEAK_MB = 2.0, 1.5, 300.0
# A sparse16 call takes ~10 ms, near the machine's scheduling noise: its rounds time this many calls each.
SPARSE_CALLS_PER_ROUND = 20
# glibc malloc serves the numpy baseline's arrays (up to 23 MB) from its heap, kept, instead of fresh
# pages from the OS each round: under TensorFlow's BFC allocator nothing else keeps that heap warm,
# and the page faults (5.6 us a page on AMD VMs here) made numpy 20-30% slower, flattering the ratios.
BASELINE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def make_labels(pattern, boxes, rng):
    if pattern == "seed":
        labels = np.zeros(boxes, np.int32)
        labels[rng.choice(boxes, min(SEED_POSITIVES, boxes), replace=False)] = 1
        return labels
    return rng.integers(0, IDENTITIES, size=boxes).astype(np.int32)


def make_batch(pattern, sets, boxes, padded, seed=0):
    """[sets, padded, DIM] float32 embeddings and [sets, padded] labels (-1 padding)."""
    rng = np.random.default_rng(seed)
    emb = np.zeros((sets, padded, DIM), np.float32)
    lab = np.full((sets, padded), -1, np.int32)
    for b in range(sets):
        emb[b, :boxes] = rng.normal(size=(boxes, DIM))
        lab[b, :boxes] = make_labels(pattern, boxes, rng)
    return emb, lab


def numpy_batch_all(emb, labels, margin=MARGIN):
    """Exact batch-all loss of one set, forward only, in numpy (float32): the baseline.

    Distances from the Gram matrix; each anchor's negatives sorted (non-negatives at +inf)
    with prefix sums; for each positive pair, v = d(a,p) + margin, k = #negatives below v by
    one flat searchsorted (rows offset so the concatenation is sorted), hinge sum
    k v - prefix[k]; the loss is the hinge sum over the active-triplet count.
    """
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), NORM_EPS)
    sq = (x * x).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0))
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    pos = same & ~np.eye(n, dtype=bool)
    srt = np.sort(np.where(same, np.inf, d), axis=1)
    finite = np.isfinite(srt)
    prefix = np.concatenate([np.zeros((n, 1), np.float32), np.cumsum(np.where(finite, srt, 0.0), axis=1)], axis=1)
    row_span = 2.0 * (2.0 + margin)  # > any distance + margin: offset rows never overlap
    offset = (np.arange(n, dtype=np.float64) * row_span)[:, None]
    flat = (np.where(finite, srt, 2.0 + margin + 1.0) + offset).ravel()
    anchors, _ = np.nonzero(pos)
    v = (d + margin)[pos]
    k = np.searchsorted(flat, v + offset[anchors, 0], side="left") - anchors * n
    hinge_sum = float((k * v - prefix[anchors, k]).sum())
    return hinge_sum / max(int(k.sum()), 1)


def load_module(path):
    sys.path.insert(0, ROOT)
    if not path:
        from components import triplet_loss

        return triplet_loss
    spec = importlib.util.spec_from_file_location("triplet_loss_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(args):
    """Time one label pattern (or the batch shapes) in this fresh process; returns a dict."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    T = load_module(args.module)
    device = "/GPU:0" if args.device == "GPU" else "/CPU:0"
    tf.constant(0.0) + 1.0  # initialise the runtime before the memory baseline
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pattern = args.case
    if pattern in ("dense16", "sparse16"):
        boxes, padded = (BOXES, BOXES) if pattern == "dense16" else (SPARSE_BOXES, SPARSE_PADDED)
        emb, lab = make_batch("seed" if pattern == "dense16" else "identities", BATCH, boxes, padded)
    else:
        emb, lab = make_batch(pattern, 1, args.boxes, args.boxes)
    with tf.device(device):
        x, labels = tf.constant(emb), tf.constant(lab)

    def fwd_bwd(minings, with_stats, together=True):
        """minings' losses summed, fwd+bwd: one triplet_losses call, or (together=False) one triplet_loss each."""

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                if together and hasattr(T, "triplet_losses"):  # an older --module may lack it
                    losses = list(T.triplet_losses(x, labels, minings=minings, margin=MARGIN).values())
                else:
                    losses = [T.triplet_loss(x, labels, mining=m, margin=MARGIN) for m in minings]
                total = tf.add_n(losses)
            out = [total, tape.gradient(total, x)]
            if with_stats:
                out += list(T.triplet_statistics(x, labels, margin=MARGIN).values())
            return out

        return step

    @tf.function
    def statistics():
        return T.triplet_statistics(x, labels, margin=MARGIN)

    steps = {"all": fwd_bwd(T.MINING, True)}
    if pattern not in ("dense16", "sparse16"):
        steps["all_separate"] = fwd_bwd(T.MINING, True, together=False)
    if pattern in ("dense16", "sparse16"):
        steps["statistics"] = statistics
    else:
        steps["batch_all"] = fwd_bwd(["batch_all"], False)
        steps["batch_hard"] = fwd_bwd(["batch_hard"], False)
    with tf.device(device):
        for step in steps.values():  # trace and warm
            tf.nest.map_structure(lambda t: t.numpy(), step())
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    if args.device == "GPU":  # the device's own allocator peak, not host memory
        peak_mb = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    rounds = {name: [] for name in steps}
    if pattern not in ("dense16", "sparse16"):
        rounds["numpy"] = []
        numpy_batch_all(emb[0], lab[0])  # warm
    calls = SPARSE_CALLS_PER_ROUND if pattern == "sparse16" else 1
    for _ in range(args.repeats):
        for name in rounds:
            start = time.perf_counter()
            for _ in range(calls):
                if name == "numpy":
                    numpy_value = numpy_batch_all(emb[0], lab[0])
                else:
                    with tf.device(device):
                        tf.nest.map_structure(lambda t: t.numpy(), steps[name]())
            rounds[name].append((time.perf_counter() - start) / calls)
    result = dict(
        case=pattern,
        peak_mb=peak_mb,
        fastest={k: min(v) for k, v in rounds.items()},
        median={k: float(np.median(v)) for k, v in rounds.items()},
    )
    if "numpy" in rounds:
        with tf.device(device):
            got = float(T.triplet_loss(x, labels, mining="batch_all", margin=MARGIN))
        result["batch_all_diff"] = abs(got - numpy_value)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=BOXES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["seed", "identities", "dense16", "sparse16"],
        choices=["seed", "identities", "dense16", "sparse16"],
    )
    parser.add_argument("--module", default=None, help="another version of components/triplet_loss.py, also timed")
    parser.add_argument("--device", default="CPU", choices=["CPU", "GPU"])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return

    sys.path.insert(0, ROOT)
    from pipelines import cli

    cli.use_bfc_cpu_allocator()  # as `tripletflow` runs; the cases' processes inherit it
    for name, value in BASELINE_MALLOC.items():
        os.environ.setdefault(name, value)
    modules = [("this", None)] + ([("--module", os.path.abspath(args.module))] if args.module else [])
    results = []
    for case in args.cases:
        for label, path in modules:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--case",
                case,
                "--boxes",
                str(args.boxes),
                "--repeats",
                str(args.repeats),
                "--device",
                args.device,
            ] + (["--module", path] if path else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"case {case} ({label}) failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["module"] = label
            results.append(row)
            print(f"done {case} ({label})", file=sys.stderr, flush=True)

    print(
        f"{args.device}; {os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}; dim {DIM}, "
        f"margin {MARGIN}, euclidean, normalized; {cli.BFC_ALLOCATOR_ENV}={os.environ[cli.BFC_ALLOCATOR_ENV]}; "
        f"fastest of {args.repeats} interleaved rounds (median in brackets)"
    )
    print(
        f"\nOne set of {args.boxes} boxes, forward+backward; numpy = sort-and-prefix-sum batch-all, forward only; "
        f"targets: all <= {TARGET_ALL}x, batch-all <= {TARGET_BATCH_ALL}x numpy, peak < {TARGET_PEAK_MB:.0f} MB\n"
    )
    print(
        "| labels | module | numpy ms | all three + stats ms | / numpy | three triplet_loss calls + stats ms | / numpy "
        "| batch-all ms | / numpy | batch-hard ms | peak MB | batch-all vs numpy |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r["case"] in ("dense16", "sparse16"):
            continue
        f, m = r["fastest"], r["median"]
        print(
            f"| {r['case']} | {r['module']} | {f['numpy'] * 1e3:.0f} ({m['numpy'] * 1e3:.0f}) "
            f"| {f['all'] * 1e3:.0f} ({m['all'] * 1e3:.0f}) | **{f['all'] / f['numpy']:.2f}x** "
            f"| {f['all_separate'] * 1e3:.0f} ({m['all_separate'] * 1e3:.0f}) | {f['all_separate'] / f['numpy']:.2f}x "
            f"| {f['batch_all'] * 1e3:.0f} ({m['batch_all'] * 1e3:.0f}) | **{f['batch_all'] / f['numpy']:.2f}x** "
            f"| {f['batch_hard'] * 1e3:.0f} ({m['batch_hard'] * 1e3:.0f}) | {r['peak_mb']:.0f} "
            f"| {r['batch_all_diff']:.1e} |"
        )
    batch_rows = [r for r in results if r["case"] in ("dense16", "sparse16")]
    if batch_rows:
        print(
            f"\nBatches of {BATCH} padded sets (dense: {BOXES} boxes, seed labels; sparse: {SPARSE_BOXES} boxes "
            f"of {IDENTITIES} identities padded to {SPARSE_PADDED}), sets/s\n"
        )
        print("| shape | module | all three + stats, fwd+bwd (Trainer) | statistics, forward (pipeline) | peak MB |")
        print("|---|---|---:|---:|---:|")
        for r in batch_rows:
            f, m = r["fastest"], r["median"]
            print(
                f"| {r['case']} | {r['module']} | {BATCH / f['all']:.1f} ({BATCH / m['all']:.1f}) "
                f"| {BATCH / f['statistics']:.1f} ({BATCH / m['statistics']:.1f}) | {r['peak_mb']:.0f} |"
            )


if __name__ == "__main__":
    main()
