"""Benchmark: the whole EmbeddingStats pipeline (local runner) against the floor of the intrinsic work.

Floor = one plain process that reads and parses the same TFRecords with tf.data
(`tf.io.parse_example`) and runs the same loss graph (`triplet_statistics`, one compiled
call per batch, valid boxes gathered first as the pipeline does). Both are measured at two
sizes in the same run, each in a fresh subprocess (for its peak RSS), --repeats times
interleaved; the fastest run of each counts (noise on a shared machine only adds time).
Marginal cost per example = (time(large) - time(small)) / (large - small); start-up =
time(small) - small * marginal.

    .venv/bin/python bench/bench_stats.py            # dense 8,40 and sparse 400,2400 examples
    git worktree add /tmp/before <commit>            # A/B: another checkout's pipeline, interleaved
    .venv/bin/python bench/bench_stats.py --shape sparse --compare /tmp/before
Targets: pipeline marginal cost <= 2x the floor's; start-up < 10 s; peak memory flat in size.
Pipeline and floor run TensorFlow with the CPU allocator `tripletflow run` gives it (BFC;
`TF_CPU_ALLOCATOR_USE_BFC=false` for its default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import cli  # noqa: E402
from schemas import contract  # noqa: E402

cli.use_bfc_cpu_allocator()  # TensorFlow's CPU allocator as `tripletflow run` gives it, in both children

SHAPES = {"dense": 0.0, "sparse": 0.95}  # --empty-fraction of each shape
# Two sizes per shape: dense grids cost ~0.25 s/example on 2 cores (O(boxes^2) loss graph), so
# they are measured at tens of examples; sparse ones at thousands.
DEFAULT_SIZES = {"dense": "8,40", "sparse": "400,2400"}
SHARDS = 4
BATCH_SIZE = 16
DEFAULT_REPEATS = 3  # runs of each measurement; the fastest counts (a shared machine's noise only adds time)
TARGET_MARGINAL_RATIO = 2.0
TARGET_STARTUP_S = 10.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child_pipeline(input_glob: str, output: str) -> dict:
    from components.embedding_stats.executor import execute
    from components.embedding_stats.options import EmbeddingStatsOptions

    start = time.perf_counter()
    options = EmbeddingStatsOptions(
        [
            "--input",
            input_glob,
            "--output",
            output,
            "--runner",
            "FnApiRunner",
            "--no-report",
            "--batch-size",
            str(BATCH_SIZE),
        ]
    )
    result = execute(options)
    return {
        "seconds": time.perf_counter() - start,
        "examples": result.summary["examples"],
        "boxes": result.summary["valid_boxes"],
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_floor(input_glob: str) -> dict:
    start = time.perf_counter()
    import glob

    import numpy as np
    import tensorflow as tf

    from components import triplet_loss
    from components.embedding_stats.boxes import box_rows
    from components.embedding_stats.statistics import MAX_PAIR_CELLS_PER_CALL, BoxSets

    grid = contract.GridSpec()
    spec = {
        contract.EMBEDDINGS: tf.io.FixedLenFeature([grid.boxes, grid.dim], tf.float32),
        contract.LABELS: tf.io.FixedLenFeature([grid.boxes], tf.int64),
    }
    stats = tf.function(
        lambda e, l: triplet_loss.triplet_statistics(e, l),
        autograph=False,
        input_signature=[tf.TensorSpec([None, None, grid.dim], tf.float32), tf.TensorSpec([None, None], tf.int64)],
    )
    files = sorted(glob.glob(input_glob))
    dataset = tf.data.TFRecordDataset(files).batch(BATCH_SIZE).map(lambda raw: tf.io.parse_example(raw, spec))
    examples = boxes = 0
    for batch in dataset:
        labels = batch[contract.LABELS].numpy()
        sets, box = box_rows(labels)  # valid boxes gathered as the pipeline does, padded to the batch's largest
        row_labels = labels[sets, box]
        rows = BoxSets.from_rows(sets, row_labels >= 0)
        m = max(1, int(rows.valid_counts.max()))
        padded, padded_labels = rows.padded(
            batch[contract.EMBEDDINGS].numpy()[sets, box], row_labels, np.arange(len(labels)), m
        )
        chunk = max(1, MAX_PAIR_CELLS_PER_CALL // m**2)  # same memory bound as the pipeline
        for first in range(0, len(labels), chunk):
            out = stats(padded[first : first + chunk], padded_labels[first : first + chunk])
            boxes += int(out["n_boxes"].numpy().sum())
        examples += len(labels)
    return {"seconds": time.perf_counter() - start, "examples": examples, "boxes": boxes, "peak_rss_mb": _peak_rss_mb()}


def _run_child(*args, script: str = os.path.abspath(__file__)) -> dict:
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench child {args[:2]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fastest(runs: list[dict]) -> dict:
    """The fastest of repeated runs, with the highest peak RSS among them (memory is not flattered)."""
    return {**min(runs, key=lambda run: run["seconds"]), "peak_rss_mb": max(run["peak_rss_mb"] for run in runs)}


def measure(shape: str, sizes, root: str, repeats: int, compare: str | None = None) -> dict:
    """{size: {what: fastest run}}; what = floor, pipeline and, with `compare` (a checkout), "compare"."""
    from components import sample_data

    rows = {}
    for size in sizes:
        input_dir = os.path.join(root, f"{shape}-{size}", "input")
        sample_data.generate(
            input_dir, sample_data.SampleOptions(examples=size, shards=SHARDS, empty_fraction=SHAPES[shape], seed=size)
        )
        glob_ = os.path.join(input_dir, "*")
        output = os.path.join(root, f"{shape}-{size}", "output")
        runs = {"floor": [], "pipeline": []} | ({"compare": []} if compare else {})
        for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits all alike
            runs["floor"].append(_run_child("--child", "floor", glob_))
            runs["pipeline"].append(_run_child("--child", "pipeline", glob_, output))
            if compare:
                script = os.path.join(compare, "bench", "bench_stats.py")
                runs["compare"].append(_run_child("--child", "pipeline", glob_, output + "-compare", script=script))
        rows[size] = {what: _fastest(found) for what, found in runs.items()}
    return rows


def report(shape: str, rows: dict) -> None:
    small, large = sorted(rows)
    print(f"\n## {shape} (grid 2,13,13,5 dim 100, empty fraction {SHAPES[shape]}; fastest of the repeats)")
    print("| what | examples | seconds | examples/s | embeddings/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    measured = list(rows[small])
    for size in (small, large):
        for what in measured:
            r = rows[size][what]
            print(
                f"| {what} | {r['examples']} | {r['seconds']:.1f} | {r['examples'] / r['seconds']:.1f} "
                f"| {r['boxes'] / r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
            )
    marginal = {
        what: (rows[large][what]["seconds"] - rows[small][what]["seconds"]) / (large - small) for what in measured
    }
    startup = {what: rows[small][what]["seconds"] - small * marginal[what] for what in marginal}
    ratio = marginal["pipeline"] / marginal["floor"] if marginal["floor"] > 0 else float("inf")
    print(
        f"\nmarginal s/example: pipeline {marginal['pipeline']:.4f}, floor {marginal['floor']:.4f}, "
        f"ratio {ratio:.2f} (target <= {TARGET_MARGINAL_RATIO})"
    )
    print(
        f"start-up: pipeline {startup['pipeline']:.1f} s, floor {startup['floor']:.1f} s "
        f"(target pipeline < {TARGET_STARTUP_S} s)"
    )
    print(
        f"peak RSS pipeline: {rows[small]['pipeline']['peak_rss_mb']:.0f} MiB at {small}, "
        f"{rows[large]['pipeline']['peak_rss_mb']:.0f} MiB at {large}"
    )
    if "compare" in marginal:
        print(
            f"--compare checkout: marginal {marginal['compare']:.4f} s/example, start-up {startup['compare']:.1f} s; "
            f"this pipeline / that one: marginal {marginal['pipeline'] / marginal['compare']:.2f}, "
            f"time at {large} {rows[large]['pipeline']['seconds'] / rows[large]['compare']['seconds']:.2f}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument(
        "--sizes", default=None, help=f"two example counts small,large (default per shape: {DEFAULT_SIZES})"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="runs of each measurement, fastest kept (default %(default)s)",
    )
    parser.add_argument(
        "--compare", default=None, help="another checkout of tripletflow whose pipeline is measured too, interleaved"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_floor(*rest) if kind == "floor" else child_pipeline(*rest)))
        return 0
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    with tempfile.TemporaryDirectory(prefix="bench_stats_") as root:
        for shape in shapes:
            sizes = sorted(int(s) for s in (args.sizes or DEFAULT_SIZES[shape]).split(","))
            assert len(sizes) == 2 and sizes[0] < sizes[1], "--sizes takes two increasing counts"
            report(shape, measure(shape, sizes, root, args.repeats, args.compare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
