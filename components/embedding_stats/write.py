"""Write stage: vectors/, examples/, dead_letter/ Parquet tables and summary.json (+ .parquet) under the output dir.

The big vectors table is written inside the stage that produces it (one file per bundle);
the small tables go through Beam's Parquet sink.
"""

from __future__ import annotations

import functools

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats.common import WriteBundleFilesFn
from components.storage import write_json
from schemas import contract

TABLE_BATCH_ROWS = 4096  # rows gathered into one Parquet row group for small tables
PARQUET_CODEC = "snappy"
PARQUET_SUFFIX = ".parquet"


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth Parquet dictionary encoding: all but list (vector) columns.

    The float elements of vectors almost never repeat: pyarrow would build a dictionary for each row group
    only to fall back to plain encoding (bench/README_stats.md: ~6x the writing time of the
    vectors table and 1.5x its size). Same values either way, only the file encoding differs.
    """
    return [field.name for field in schema if not (pa.types.is_list(field.type) or pa.types.is_large_list(field.type))]


def _rows_to_table(rows) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=contract.DEAD_LETTER_SCHEMA)


def _concat(tables) -> pa.Table:
    return pa.concat_tables(list(tables))


def _write_summary(document: dict, directory: str) -> str:
    """summary.json, and the same as the one row of summary.parquet (contract.SUMMARY_SCHEMA)."""
    import pyarrow.parquet as pq

    with FileSystems.create(FileSystems.join(directory, contract.SUMMARY_PARQUET_FILE)) as f:
        pq.write_table(pa.Table.from_pylist([document], schema=contract.SUMMARY_SCHEMA), f, compression=PARQUET_CODEC)
    path = FileSystems.join(directory, contract.SUMMARY_FILE)
    write_json(path, document)
    return path


class WriteTable(beam.PTransform):
    """pyarrow Tables -> Parquet files `<dir>/part-*.parquet` with the declared schema."""

    def __init__(self, directory: str, schema: pa.Schema, rebatch: bool):
        super().__init__()
        self._directory = directory
        self._schema = schema
        self._rebatch = rebatch

    def expand(self, tables):
        from apache_beam.io.parquetio import WriteToParquetBatched

        if self._rebatch:  # small tables -> row groups of a useful size
            tables = (
                tables
                | "Rebatch" >> beam.BatchElements(min_batch_size=1, max_batch_size=TABLE_BATCH_ROWS // 16)
                | "Concat" >> beam.Map(_concat)
            )
        return tables | "Parquet" >> WriteToParquetBatched(
            FileSystems.join(self._directory, "part"),
            schema=self._schema,
            codec=PARQUET_CODEC,
            file_name_suffix=PARQUET_SUFFIX,
        )


def _parquet_writer(stream, schema: pa.Schema):
    import pyarrow.parquet as pq

    return pq.ParquetWriter(stream, schema, compression=PARQUET_CODEC, use_dictionary=dictionary_columns(schema))


def _commit_staged(paths, directory: str, staging_dir: str, schema: pa.Schema) -> int:
    """Renames the committed staged files to part-NNNNN-of-MMMMM.parquet; an empty table if none."""
    import pyarrow.parquet as pq

    paths = sorted(paths)
    if not paths:
        with FileSystems.create(FileSystems.join(directory, f"part-00000-of-00001{PARQUET_SUFFIX}")) as f:
            pq.write_table(schema.empty_table(), f, compression=PARQUET_CODEC)
        return 0
    FileSystems.rename(
        paths,
        [FileSystems.join(directory, f"part-{i:05d}-of-{len(paths):05d}{PARQUET_SUFFIX}") for i in range(len(paths))],
    )
    FileSystems.delete([staging_dir])
    return len(paths)


class WriteTableFused(beam.PTransform):
    """pyarrow Tables -> Parquet `<dir>/part-*.parquet`, written in the producing stage itself.

    For the big `vectors` table. Beam's Parquet sink (WriteToParquetBatched) takes a side input
    that keeps FnApiRunner from fusing its writer with the producer, so every table would be
    held in memory until the writer's stage runs (peak memory growing with the data, measured
    in bench/). Here each bundle streams its tables into one staged file; the committed files
    are renamed in place at the end (only their names cross a shuffle).
    """

    def __init__(self, directory: str, schema: pa.Schema):
        super().__init__()
        self._directory = directory
        self._schema = schema

    def expand(self, tables):
        staging = FileSystems.join(self._directory, ".staging")
        return (
            tables
            | "WriteBundles"
            >> beam.ParDo(
                WriteBundleFilesFn(staging, PARQUET_SUFFIX, functools.partial(_parquet_writer, schema=self._schema))
            )
            | "Staged" >> beam.combiners.ToList()
            | "Commit" >> beam.Map(_commit_staged, self._directory, staging, self._schema)
        )


class WriteOutputs(beam.PTransform):
    """Writes vectors/, examples/, dead_letter/ Parquet and summary.json / summary.parquet under `output_dir`.

    Returns one PCollection per write, each complete once its files are (for the commit's barrier).
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, inputs):
        vectors, examples, dead, summary = inputs
        out = self._output_dir
        dead_tables = (
            dead
            | "BatchDead" >> beam.BatchElements(min_batch_size=1, max_batch_size=TABLE_BATCH_ROWS)
            | "DeadTable" >> beam.Map(_rows_to_table)
        )
        return (
            vectors
            | "WriteVectors" >> WriteTableFused(FileSystems.join(out, contract.VECTORS_DIR), contract.VECTORS_SCHEMA),
            examples
            | "WriteExamples"
            >> WriteTable(FileSystems.join(out, contract.EXAMPLES_DIR), contract.EXAMPLES_SCHEMA, True),
            dead_tables
            | "WriteDeadLetter"
            >> WriteTable(FileSystems.join(out, contract.DEAD_LETTER_DIR), contract.DEAD_LETTER_SCHEMA, False),
            summary | "WriteSummary" >> beam.Map(_write_summary, out),
        )
