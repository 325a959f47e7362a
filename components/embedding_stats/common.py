"""What every EmbeddingStats stage shares: the metrics namespace, the dead-letter output, helpers."""

from __future__ import annotations

import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from schemas import contract

METRICS_NAMESPACE = "tripletflow.embedding_stats"

# Tags of the stages' tagged outputs.
DEAD = "dead_letter"  # dead-letter rows (contract.DEAD_LETTER_SCHEMA), from the read and validate stages
EXAMPLES = "examples"  # EXAMPLES tables, from the pair-statistics stage, as are:
PARTIAL = "partial"  # per-batch partial summaries (statistics.partial_summary)
LABEL_SET = "labels"  # the distinct labels of a batch
NORMS = "norms"  # the L2 norms of a batch's valid boxes


def column_array(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A column as a flat numpy array (list columns flattened)."""
    column = batch.column(batch.schema.get_field_index(name))
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def one_per_row(values: pa.Array) -> pa.LargeListArray:
    """[rows] values -> list<value> of one value per row (TFXIO's layout of a scalar feature)."""
    return pa.LargeListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int64)), values)


def dead_letter(source_file, reason, detail, example_id=None, raw=None) -> dict:
    """One `dead_letter` row (contract.DEAD_LETTER_SCHEMA)."""
    return {
        contract.COL_SOURCE_FILE: source_file,
        contract.COL_REASON: reason,
        contract.COL_DETAIL: detail,
        contract.COL_EXAMPLE_ID: example_id,
        contract.COL_RAW: raw,
    }


def _in_global_window(value):
    """`value` as a windowed value, for outputs of a DoFn's finish_bundle (batch pipelines: global window)."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    from apache_beam.utils.windowed_value import WindowedValue

    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


class WriteBundleFilesFn(beam.DoFn):
    """pyarrow tables or record batches -> files under `directory`; emits each file's path once closed.

    One file per bundle, streamed by the pyarrow writer `open_writer(stream)` returns (anything
    with write() and close(), e.g. a ParquetWriter or an IPC stream writer) on a Beam FileSystems
    stream; with `roll_bytes`, a new file once that much was written. Paths are emitted only by
    committed bundles (the runner drops a failed attempt's outputs), so a retried bundle's file
    is never listed.
    """

    def __init__(self, directory: str, suffix: str, open_writer, roll_bytes: int | None = None):
        self._directory = directory
        self._suffix = suffix
        self._open_writer = open_writer
        self._roll_bytes = roll_bytes

    def start_bundle(self):
        self._path = self._stream = self._writer = None
        self._bytes = 0

    def process(self, data):
        if self._writer is None:
            self._path = FileSystems.join(self._directory, f"{uuid.uuid4().hex}{self._suffix}")
            self._stream = FileSystems.create(self._path)
            self._writer = self._open_writer(self._stream)
        self._writer.write(data)
        self._bytes += data.nbytes
        if self._roll_bytes is not None and self._bytes >= self._roll_bytes:
            yield self._close()

    def _close(self) -> str:
        self._writer.close()
        self._stream.close()
        path, self._path, self._stream, self._writer, self._bytes = self._path, None, None, None, 0
        return path

    def finish_bundle(self):
        if self._writer is not None:
            yield _in_global_window(self._close())
