"""Reads one run's output directory (the data contract in schemas/) for the report.

Only the columns the report plots are read from Parquet (never the `embedding` lists), and
of `vectors` (one row per valid box) only a uniform sample of at most MAX_PLOTTED_BOXES rows,
streamed batch by batch, so the report's memory does not grow with the run.  Missing tables read as empty ones with the
contract's schema, so a run with no valid box still gets a report.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components import storage
from components.trainer.spec import METRICS_FILE as TRAINER_METRICS_FILE
from schemas import contract

# Columns of `vectors` the report plots: position in the grid, raw and z-scored norm.
VECTOR_COLUMNS = (contract.COL_LEVEL, contract.COL_ANCHOR, contract.COL_L2_NORM, contract.COL_L2_NORM_Z)
# Boxes in the norm figures: a uniform sample this large draws the same distributions as the
# whole table, and bounds the report's memory (~20 bytes a box) whatever the run's size.
MAX_PLOTTED_BOXES = 200_000
SAMPLE_SEED = 0  # the sample is the same on every re-run of a report
EXAMPLE_COLUMNS = contract.check_columns(
    contract.EXAMPLES_SCHEMA,
    (
        contract.COL_EXAMPLE_ID,
        "n_boxes",
        "n_neg_pairs",
        "n_triplets",
        "n_active_triplets",
        "pos_dist_mean",
        "neg_dist_mean",
        "batch_all_loss",
        "batch_hard_loss",
        "semi_hard_loss",
    ),
    "the report",
)

MODEL_SUBDIR = "model"  # a trainer output directory placed inside the run's output


class RunDataError(ValueError):
    """The directory is not a (complete) EmbeddingStats run output."""


@dataclasses.dataclass
class RunData:
    """Everything the report shows about one run."""

    output_dir: str
    summary: dict
    manifest: dict
    vectors: pa.Table  # VECTOR_COLUMNS, a uniform sample of at most MAX_PLOTTED_BOXES valid boxes
    vectors_total: int  # valid boxes in the run (rows of `vectors`)
    examples: pa.Table  # EXAMPLE_COLUMNS, one row per good record
    model_dir: str | None = None
    trainer_metrics: dict | None = None


def read_json(path: str) -> dict:
    """Reads a JSON object; raises RunDataError naming the file when missing or malformed."""
    if not storage.exists(path):
        raise RunDataError(f"{path} not found")
    try:
        value = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDataError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(value, dict):
        raise RunDataError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def listed_files(output_dir: str, manifest: dict, item: str) -> list[str]:
    """The committed files of `item` (a table or a file of the run), as its manifest lists them."""
    try:
        return contract.listed_files(output_dir, manifest, item)
    except (KeyError, TypeError, ValueError) as error:
        raise RunDataError(f"{storage.join(output_dir, contract.MANIFEST_FILE)}: cannot list {item}: {error}") from None


def read_summary(output_dir: str, manifest: dict) -> dict:
    """The committed run's summary.json, checked for the contract's keys."""
    paths = listed_files(output_dir, manifest, contract.SUMMARY_FILE)
    if not paths:
        raise RunDataError(f"the {contract.MANIFEST_FILE} of {output_dir} lists no {contract.SUMMARY_FILE}")
    summary = read_json(paths[0])
    missing = [key for key in contract.SUMMARY_KEYS if key not in summary]
    if missing:
        raise RunDataError(f"{contract.SUMMARY_FILE} in {output_dir} lacks keys {missing}")
    return summary


def read_table(files: list[str], schema: pa.Schema, columns) -> pa.Table:
    """Reads `columns` of the Parquet `files` (empty table when none)."""
    wanted = pa.schema([schema.field(name) for name in columns])
    if not files:
        return wanted.empty_table()
    tables = []
    for path in files:
        with storage.open_read(path) as f:
            tables.append(pq.read_table(f, columns=list(columns)).cast(wanted))
    return pa.concat_tables(tables)


def sample_table(files: list[str], schema: pa.Schema, columns, max_rows: int, seed: int = SAMPLE_SEED):
    """(uniform sample of at most `max_rows` rows of `columns`, total rows) of the Parquet `files`,
    streamed batch by batch: memory is bounded by the sample, not the table."""
    wanted = pa.schema([schema.field(name) for name in columns])
    counts = []
    for path in files:
        with storage.open_read(path) as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    total = sum(counts)
    if total == 0:
        return wanted.empty_table(), 0
    keep = np.sort(np.random.default_rng(seed).choice(total, size=min(total, max_rows), replace=False))
    pieces, offset = [], 0
    for path in files:
        with storage.open_read(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=list(columns)):
                lo, hi = np.searchsorted(keep, [offset, offset + batch.num_rows])
                if hi > lo:
                    pieces.append(pa.Table.from_batches([batch.take(pa.array(keep[lo:hi] - offset))]).cast(wanted))
                offset += batch.num_rows
    return pa.concat_tables(pieces), total


def find_model_dir(output_dir: str, model_dir: str | None = None) -> str | None:
    """The trainer output beside the run: `model_dir` if given, else `<output>/model/` if it has metrics."""
    if model_dir:
        return model_dir
    candidate = storage.join(output_dir, MODEL_SUBDIR)
    if storage.exists(storage.join(candidate, TRAINER_METRICS_FILE)):
        return candidate
    return None


def load_run(output_dir: str, model_dir: str | None = None) -> RunData:
    """Loads a finished run (MANIFEST.json present) and the trainer metrics beside it, if any."""
    manifest_path = storage.join(output_dir, contract.MANIFEST_FILE)
    if not storage.exists(manifest_path):
        raise RunDataError(f"{output_dir} has no {contract.MANIFEST_FILE}: the run did not finish")
    manifest = read_json(manifest_path)
    summary = read_summary(output_dir, manifest)
    vectors, vectors_total = sample_table(
        listed_files(output_dir, manifest, contract.VECTORS_DIR),
        contract.VECTORS_SCHEMA,
        VECTOR_COLUMNS,
        MAX_PLOTTED_BOXES,
    )
    examples = read_table(
        listed_files(output_dir, manifest, contract.EXAMPLES_DIR), contract.EXAMPLES_SCHEMA, EXAMPLE_COLUMNS
    )
    model = find_model_dir(output_dir, model_dir)
    metrics = None
    if model is not None:
        path = storage.join(model, TRAINER_METRICS_FILE)
        if not storage.exists(path):
            raise RunDataError(f"--model {model!r} has no {TRAINER_METRICS_FILE}")
        metrics = read_json(path)
    return RunData(output_dir, summary, manifest, vectors, vectors_total, examples, model, metrics)


def finite_or_none(value):
    """A float when `value` is a finite number, else None (JSON null, NaN and text all read as None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
