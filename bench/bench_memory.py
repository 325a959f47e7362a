"""Benchmark: peak memory of a local `tripletflow run` does not grow with the number of examples.

Issue #7 item 3. Generates sparse sample grids (`components.sample_data`) at a small and a
large size (default 2,000 and 20,000 examples), runs the real pipeline on each with the CLI
(`tripletflow run`, default local runner, `--no-report`) in a fresh process, and prints
each run's peak RSS (the child's own `ru_maxrss`, from `os.wait4`), the ratio large/small
(target ~1.0: no growth beyond run-to-run noise), run time and examples/s. The report step
(`tripletflow report`, a separate process) is measured the same way, for information.

Then one dense grid of the maximum configured size (default 2,13,13,5 boxes of 100 floats,
every box labelled: 1690 boxes, 1.43 M pairs) is processed alone, with its peak RSS: the loss
graph works on [batch, boxes, boxes] tensors in calls of bounded size, no per-pair Python
object. Baseline in the same run: the peak RSS of a process that only imports the stack.

    .venv/bin/python bench/bench_memory.py                                  # grid 1,13,13,5 dim 32
    .venv/bin/python bench/bench_memory.py --grid 2,13,13,5 --dim 100  # the seed grid (13.8 GB of input, ~9-10 min)

All data lives in a temp dir under /tmp, deleted at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from schemas import contract  # noqa: E402

DEFAULT_SIZES = "2000,20000"
# Sparse grids, smaller than the seed grid by default: at 2,13,13,5 dim 100 one record is 0.69 MB
# and takes ~23 ms to generate, so 22,000 of them are ~15 GB and 6-7 min of generation alone
# (2 processes, 2 cores); at 1,13,13,5 dim 32 they are 0.12 MB and ~4 ms each (~1.5 min in all).
DEFAULT_SPARSE_GRID = "1,13,13,5"
DEFAULT_SPARSE_DIM = 32
EMPTY_FRACTION = 0.95  # ~5% of boxes labelled, as in bench_stats' sparse shape
SHARDS_PER_PART = 4  # TFRecord files per generator process
GENERATOR_PROCESSES = 2  # the input is generated in this many parts in parallel (one seed each)
DENSE_EXAMPLES = 1  # the dense grid of the maximum configured size, processed alone
TARGET_RATIO = 1.0  # peak RSS large / small
NOISE_TOLERANCE = 0.10  # run-to-run spread of peak RSS (bench/README_stats.md: about +-100 MiB of ~1.6 GiB)
KIB_PER_MIB = 1024
RSS_POLL_SECONDS = 0.5  # RSS sampling period of a measured process (its timeline)
TIMELINE_PARTS = 10  # the timeline is shown as the highest RSS in each tenth of the run
IMPORT_FLOOR = "import apache_beam, tensorflow, tensorflow_transform, tfx_bsl, pyarrow"


def tripletflow_command() -> list[str]:
    """The `tripletflow` console script of this environment (or the same entry point via -m)."""
    script = os.path.join(os.path.dirname(sys.executable), "tripletflow")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "pipelines.cli"]


def measure(command: list[str], log_path: str) -> dict:
    """Runs `command` in a fresh process; its wall time and its own peak RSS (ru_maxrss via wait4)."""
    timeline = []  # (seconds since start, RSS MiB), sampled every RSS_POLL_SECONDS
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            rss = _rss_mib(process.pid)
            if rss is not None:
                timeline.append((time.perf_counter() - start, rss))
            time.sleep(RSS_POLL_SECONDS)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        with open(log_path, "rb") as log:
            tail = log.read()[-3000:].decode("utf-8", "replace")
        raise SystemExit(f"{' '.join(command[:3])} ... failed ({process.returncode}):\n{tail}")
    return {
        "seconds": seconds,
        "peak_rss_mib": usage.ru_maxrss / KIB_PER_MIB,  # Linux: KiB
        "timeline": timeline,
    }


def _rss_mib(pid: int) -> float | None:
    """Current resident set of `pid` (VmRSS in /proc), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / KIB_PER_MIB
    except OSError:
        return None
    return None


def rss_by_tenth(timeline, seconds: float) -> list[float]:
    """Highest sampled RSS MiB in each tenth of the run's wall time (0 where no sample fell)."""
    tenths = [0.0] * TIMELINE_PARTS
    for at, rss in timeline:
        part = min(int(at / seconds * TIMELINE_PARTS), TIMELINE_PARTS - 1)
        tenths[part] = max(tenths[part], rss)
    return tenths


def _generate_part(directory: str, examples: int, grid: contract.GridSpec, empty_fraction: float, seed: int) -> None:
    from components import sample_data

    sample_data.generate(
        directory,
        sample_data.SampleOptions(
            examples=examples, shards=SHARDS_PER_PART, grid=grid, empty_fraction=empty_fraction, seed=seed
        ),
    )


def generate(directory: str, examples: int, grid: contract.GridSpec, empty_fraction: float) -> tuple[str, float]:
    """Sample TFRecords in GENERATOR_PROCESSES parts (distinct seeds, so distinct example ids); (glob, seconds)."""
    start = time.perf_counter()
    parts = min(GENERATOR_PROCESSES, examples)
    counts = [examples // parts + (1 if k < examples % parts else 0) for k in range(parts)]
    with concurrent.futures.ProcessPoolExecutor(parts) as pool:
        futures = [
            pool.submit(
                _generate_part, os.path.join(directory, f"gen-{k}"), count, grid, empty_fraction, examples * parts + k
            )
            for k, count in enumerate(counts)
        ]
        for future in futures:
            future.result()
    return os.path.join(directory, "gen-*", "part-*"), time.perf_counter() - start


def run_once(
    root: str, name: str, examples: int, grid: contract.GridSpec, empty_fraction: float, with_report: bool
) -> dict:
    """Generate -> `tripletflow run` -> (optionally) `tripletflow report`; deletes the input and output after."""
    work = os.path.join(root, name)
    input_glob, gen_seconds = generate(os.path.join(work, "input"), examples, grid, empty_fraction)
    input_bytes = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(work, "input")) for f in files
    )
    output = os.path.join(work, "output")
    grid_flag = ",".join(map(str, grid.grid_shape))
    row = measure(
        [
            *tripletflow_command(),
            "run",
            "--input",
            input_glob,
            "--output",
            output,
            "--grid",
            grid_flag,
            "--dim",
            str(grid.dim),
            "--no-report",
        ],
        os.path.join(root, f"{name}-run.log"),
    )
    with open(os.path.join(output, contract.MANIFEST_FILE)) as f:
        summary_path = contract.listed_files(output, json.load(f), contract.SUMMARY_FILE)[0]
    with open(summary_path) as f:
        summary = json.load(f)
    if summary["records_good"] != examples:
        raise SystemExit(f"{name}: {summary['records_good']} good records of {examples} generated")
    row.update(
        examples=examples, valid_boxes=summary["valid_boxes"], input_gb=input_bytes / 1e9, generate_seconds=gen_seconds
    )
    if with_report:
        report = measure(
            [*tripletflow_command(), "report", "--output", output], os.path.join(root, f"{name}-report.log")
        )
        row["report"] = report
    shutil.rmtree(work)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="two example counts small,large")
    parser.add_argument("--grid", default=DEFAULT_SPARSE_GRID, help="grid L,H,W,A of the sparse runs")
    parser.add_argument("--dim", default=DEFAULT_SPARSE_DIM, type=int, help="embedding size of the sparse runs")
    parser.add_argument(
        "--no-report-step",
        dest="report",
        action="store_false",
        default=True,
        help="do not measure `tripletflow report` after each sparse run",
    )
    parser.add_argument(
        "--no-dense",
        dest="dense",
        action="store_false",
        default=True,
        help="skip the dense grid of the maximum configured size",
    )
    args = parser.parse_args(argv)
    small, large = sorted(int(s) for s in args.sizes.split(","))
    sparse_grid = contract.GridSpec.parse(args.grid, args.dim)
    dense_grid = contract.GridSpec()  # the maximum configured size: the contract's default grid

    with tempfile.TemporaryDirectory(prefix="bench_memory_", dir="/tmp") as root:
        floor = measure([sys.executable, "-c", IMPORT_FLOOR], os.path.join(root, "floor.log"))
        rows = {
            size: run_once(root, f"sparse-{size}", size, sparse_grid, EMPTY_FRACTION, args.report)
            for size in (small, large)
        }
        dense = run_once(root, "dense", DENSE_EXAMPLES, dense_grid, 0.0, False) if args.dense else None

    shape = f"grid {args.grid} dim {args.dim}, empty fraction {EMPTY_FRACTION}"
    print(f"\n## Peak memory vs number of examples ({shape}; `tripletflow run --no-report`, FnApiRunner)")
    print(f"baseline: a process importing the stack peaks at {floor['peak_rss_mib']:.0f} MiB")
    print(
        "| examples | input GB | valid boxes | run s | examples/s | peak RSS MiB | over baseline MiB |"
        + (" report s | report peak RSS MiB |" if args.report else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.report else ""))
    for size in (small, large):
        r = rows[size]
        line = (
            f"| {size:,} | {r['input_gb']:.2f} | {r['valid_boxes']:,} | {r['seconds']:.1f} "
            f"| {size / r['seconds']:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - floor['peak_rss_mib']:.0f} |"
        )
        if args.report:
            line += f" {r['report']['seconds']:.1f} | {r['report']['peak_rss_mib']:.0f} |"
        print(line)
    ratio = rows[large]["peak_rss_mib"] / rows[small]["peak_rss_mib"]
    verdict = "met" if ratio <= TARGET_RATIO + NOISE_TOLERANCE else "NOT met"
    print(
        f"\npeak RSS ratio {large:,}/{small:,} examples: {ratio:.3f} (target ~{TARGET_RATIO:.1f}, "
        f"<= {TARGET_RATIO + NOISE_TOLERANCE:.2f} with noise: {verdict}); {large // small}x the examples"
    )
    if args.report:
        report_ratio = rows[large]["report"]["peak_rss_mib"] / rows[small]["report"]["peak_rss_mib"]
        print(
            f"report step peak RSS ratio: {report_ratio:.3f} (for information: the report reads the "
            f"vectors table's small columns)"
        )
    for size in (small, large):
        r = rows[size]
        print(
            f"RSS MiB of the {size:,}-example run by tenth of its {r['seconds']:.0f} s (highest sample in each): "
            + " ".join(f"{v:.0f}" for v in rss_by_tenth(r["timeline"], r["seconds"]))
        )
    marginal = (large - small) / max(rows[large]["seconds"] - rows[small]["seconds"], 1e-9)
    print(f"marginal throughput (examples between the sizes / extra seconds): {marginal:.0f} examples/s")
    print(
        "generation s (not part of the runs): "
        + ", ".join(f"{size:,}: {rows[size]['generate_seconds']:.0f}" for size in (small, large))
    )
    if dense is not None:
        boxes = dense_grid.boxes
        print(
            f"\n## Dense grid of the maximum configured size, alone ({','.join(map(str, dense_grid.grid_shape))} "
            f"dim {dense_grid.dim}, every box labelled)"
        )
        print(
            f"{DENSE_EXAMPLES} example, {dense['valid_boxes']:,} valid boxes, {boxes * (boxes - 1) // 2:,} pairs: "
            f"run {dense['seconds']:.1f} s, peak RSS {dense['peak_rss_mib']:.0f} MiB "
            f"({dense['peak_rss_mib'] - floor['peak_rss_mib']:.0f} MiB over the import baseline)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
