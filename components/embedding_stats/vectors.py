"""Vectors stage: transformed box record batches -> VECTORS tables, one row per valid box (contract.VECTORS_SCHEMA)."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa

from components.embedding_stats import preprocessing as pp
from components.embedding_stats.common import column_array
from schemas import contract


def vectors_table(batch: pa.RecordBatch, grid: contract.GridSpec) -> pa.Table:
    """The valid box rows (label >= 0) of a transformed batch, with their grid positions."""
    rows = batch.filter(pa.array(column_array(batch, pp.OUT_LABEL) >= 0))
    level, row, col, anchor = grid.box_position(column_array(rows, contract.BOX_INDEX))

    def per_box(name, dtype):
        return pa.array(column_array(rows, name).astype(dtype, copy=False), pa.from_numpy_dtype(dtype))

    embedding = rows.column(pp.OUT_EMBEDDING)
    arrays = [
        rows.column(contract.BOX_EXAMPLE_ID).flatten().cast(pa.string()),
        pa.array(level.astype(np.int32)),
        pa.array(row.astype(np.int32)),
        pa.array(col.astype(np.int32)),
        pa.array(anchor.astype(np.int32)),
        per_box(pp.OUT_LABEL, np.int64),
        per_box(pp.OUT_L2, np.float32),
        per_box(pp.OUT_L1, np.float32),
        per_box(pp.OUT_MAX_ABS, np.float32),
        per_box(pp.OUT_L2_Z, np.float32),
        per_box(pp.OUT_BUCKET, np.int64),
        pa.ListArray.from_arrays(
            pa.array(np.arange(len(rows) + 1, dtype=np.int32) * grid.dim, pa.int32()),
            embedding.flatten().cast(pa.float32()),
        ),
    ]
    return pa.Table.from_arrays(arrays, schema=contract.VECTORS_SCHEMA)


class VectorsTable(beam.PTransform):
    """Transformed box record batches -> VECTORS tables (fused with the pair statistics: no shuffle)."""

    def __init__(self, grid: contract.GridSpec):
        super().__init__()
        self._grid = grid

    def expand(self, batches):
        return (
            batches
            | "NonEmpty" >> beam.Filter(lambda batch: batch.num_rows > 0)
            | "ToTable" >> beam.Map(vectors_table, self._grid)
        )
