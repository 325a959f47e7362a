"""Trainer throughput on the seed grid (2,13,13,5, dim 100): input pipeline vs training step.

Writes `vectors` Parquet directly with pyarrow (VECTORS_SCHEMA, normalized sample vectors,
about half the boxes valid) plus a MANIFEST.json, then measures in the same process:
  1. input pipeline alone: Parquet -> regrouped, shuffled, padded batches (examples/s);
  2. training step alone: the same batches cached in memory, fed again and again (examples/s);
  3. the whole training epoch (Executor, no export) = both together (examples/s).
The ratios say which one bounds training. Prints a JSON line last.  TensorFlow runs with the
CPU allocator `tripletflow train` gives it (BFC; `TF_CPU_ALLOCATOR_USE_BFC=false` for its default).

    python bench/bench_trainer.py [--examples 256] [--batch-size 16] [--mining batch_all] [--mixed-precision]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from components import sample_data  # noqa: E402
from pipelines import cli  # noqa: E402
from schemas import contract  # noqa: E402

cli.use_bfc_cpu_allocator()  # TensorFlow's CPU allocator as `tripletflow train` runs it (before TF is imported)

ROWS_PER_FILE = 200_000  # Parquet rows per vectors file
WARMUP_STEPS = 2  # steps run before timing (tracing)


def write_vectors(root: str, examples: int, grid: contract.GridSpec, seed: int) -> int:
    """Writes a finished-looking run (vectors + MANIFEST.json); returns the valid boxes written."""
    run_dir = f"{contract.RUNS_DIR}/bench"
    os.makedirs(os.path.join(root, run_dir, contract.VECTORS_DIR), exist_ok=True)
    listed = []  # MANIFEST.json's "files": readers read only what it lists
    options = sample_data.SampleOptions(examples=examples, grid=grid, seed=seed)
    tables, rows, total, part = [], 0, 0, 0

    def flush():
        nonlocal tables, rows, part
        if tables:
            relative = f"{run_dir}/{contract.VECTORS_DIR}/part-{part:05d}.parquet"
            pq.write_table(pa.concat_tables(tables), os.path.join(root, relative))
            listed.append({"path": relative, "bytes": os.path.getsize(os.path.join(root, relative)), "rows": rows})
            tables, rows, part = [], 0, part + 1

    for example_id, embeddings, labels in sample_data.sample_arrays(options):
        valid = np.flatnonzero(labels >= 0)
        x = embeddings[valid]
        norms = np.linalg.norm(x, axis=1)
        level, row, col, anchor = grid.box_position(valid)
        n = len(valid)
        flat = pa.array((x / norms[:, None]).astype(np.float32).reshape(-1))
        columns = {
            "example_id": pa.array([example_id] * n),
            "level": pa.array(level, pa.int32()),
            "row": pa.array(row, pa.int32()),
            "col": pa.array(col, pa.int32()),
            "anchor": pa.array(anchor, pa.int32()),
            "label": pa.array(labels[valid], pa.int64()),
            "l2_norm": pa.array(norms, pa.float32()),
            "l1_norm": pa.array(np.abs(x).sum(1), pa.float32()),
            "max_abs": pa.array(np.abs(x).max(1), pa.float32()),
            "l2_norm_z": pa.array(np.zeros(n), pa.float32()),
            "l2_norm_bucket": pa.array(np.zeros(n), pa.int64()),
            "embedding": pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * grid.dim, pa.int32()), flat),
        }
        tables.append(pa.table(columns, schema=contract.VECTORS_SCHEMA))
        rows += n
        total += n
        if rows >= ROWS_PER_FILE:
            flush()
    flush()
    manifest = {
        "run_dir": run_dir,
        "files": listed,
        "note": "bench input",
        "options": {"grid": ",".join(map(str, grid.grid_shape)), "dim": grid.dim},
    }
    with open(os.path.join(root, contract.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mining", default="batch_all")
    p.add_argument("--hidden", default="")
    p.add_argument("--mixed-precision", action="store_true")
    p.add_argument("--step-repeats", type=int, default=3, help="passes over the cached batches when timing the step")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import tensorflow as tf

    from components.trainer import data
    from components.trainer import spec as spec_lib
    from components.trainer.executor import Executor, choose_strategy

    grid = contract.GridSpec()  # the seed grid 2,13,13,5, dim 100
    work = args.workdir or tempfile.mkdtemp(prefix="bench_trainer_")
    stats = os.path.join(work, "stats")
    start = time.perf_counter()
    boxes = write_vectors(stats, args.examples, grid, seed=0)
    write_seconds = time.perf_counter() - start

    hidden = tuple(int(w) for w in args.hidden.split(",") if w)
    options = spec_lib.TrainOptions(
        epochs=1,
        batch_size=args.batch_size,
        mining=args.mining,
        hidden=hidden,
        mixed_precision=args.mixed_precision,
        export=False,
        validation_fraction=0.01,
    )
    spec = spec_lib.TrainerSpec((stats,), os.path.join(work, "train"), options)
    executor = Executor(spec, verbose=False)
    n_train = executor.count_sets()[data.TRAIN]

    # 1. Input pipeline alone.
    start = time.perf_counter()
    seen = 0
    for batch in executor.dataset(data.TRAIN, grid.dim, epoch=1):
        seen += int(batch["labels"].shape[0])
    pipeline_seconds = time.perf_counter() - start
    assert seen == n_train, (seen, n_train)

    # 2. Training step alone, on the same batches cached in (device) memory: the Executor's model and step.
    strategy = choose_strategy()
    head, optimizer = executor.build_model(strategy, grid.dim)
    step = executor.train_step(strategy, head, optimizer)
    cached = list(strategy.experimental_distribute_dataset(executor.dataset(data.TRAIN, grid.dim, epoch=1).cache()))
    for batch in cached[:WARMUP_STEPS]:
        float(step(batch))
    start = time.perf_counter()
    for _ in range(args.step_repeats):
        for batch in cached:
            loss = step(batch)
    float(loss)
    step_seconds = (time.perf_counter() - start) / args.step_repeats

    # 3. Whole epochs through the Executor (pipeline and step together); the first pays tracing.
    document = Executor(spec_lib.TrainerSpec((stats,), os.path.join(work, "train"), options), verbose=False).run()
    epoch_seconds = document["epochs"][-1]["seconds"]

    figures = {
        "device": f"{type(strategy).__name__} x{strategy.num_replicas_in_sync} "
        f"({', '.join(d.name for d in tf.config.list_logical_devices('GPU')) or 'CPU'})",
        "grid": grid.as_list(),
        "dim": grid.dim,
        "train_examples": n_train,
        "valid_boxes_per_example": boxes / args.examples,
        "batch_size": args.batch_size,
        "mining": args.mining,
        "mixed_precision": args.mixed_precision,
        "write_parquet_seconds": write_seconds,
        "pipeline_examples_per_s": n_train / pipeline_seconds,
        "step_examples_per_s": n_train / step_seconds,
        "epoch_examples_per_s": n_train / epoch_seconds,
    }
    figures["pipeline_over_step"] = figures["pipeline_examples_per_s"] / figures["step_examples_per_s"]
    figures["epoch_over_step"] = figures["epoch_examples_per_s"] / figures["step_examples_per_s"]
    figures["bottleneck"] = "input pipeline" if figures["pipeline_over_step"] < 1 else "training step"
    print(
        f"device: {figures['device']}; {n_train} train examples of "
        f"~{figures['valid_boxes_per_example']:.0f} valid boxes"
    )
    print(f"input pipeline alone : {figures['pipeline_examples_per_s']:9.1f} examples/s")
    print(f"training step alone  : {figures['step_examples_per_s']:9.1f} examples/s")
    print(
        f"whole epoch          : {figures['epoch_examples_per_s']:9.1f} examples/s "
        f"({figures['epoch_over_step']:.2f} x step alone)"
    )
    print(f"pipeline / step      : {figures['pipeline_over_step']:9.2f}  -> bottleneck: {figures['bottleneck']}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
