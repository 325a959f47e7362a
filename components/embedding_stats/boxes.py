"""Good grid record batches -> box record batches (one row per valid box), for the validate stage.

Everything after validation works on the boxes that hold an object: sparse detection grids
(~5% of boxes labelled) cost their valid boxes, not the grid. An example without valid boxes
becomes one placeholder row labelled -1, so it still gets its (null) row in `examples`.
Layout: contract.BOX_ARROW_SCHEMA; the rows of one example are adjacent, in grid order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from components.embedding_stats.common import one_per_row
from schemas import contract

# Box record batches stay far below tf.Transform's 200 MB slicing threshold (a slice could
# separate the rows of one example): a batch is cut between examples beyond this.
MAX_BOX_BATCH_BYTES = 64 << 20


def _flat(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).flatten().to_numpy(zero_copy_only=False)


def box_rows(labels: np.ndarray):
    """(set, box) of each box row for labels [n, boxes]: valid boxes, one placeholder per empty example.

    Row-major, so the rows of an example are adjacent and in grid order.
    """
    keep = labels >= 0
    keep[~keep.any(axis=1), 0] = True  # placeholder: box 0 of an example without valid boxes
    return np.nonzero(keep)


def to_box_batch(grids: pa.RecordBatch, grid: contract.GridSpec) -> pa.RecordBatch:
    """Grid record batch (TFXIO layout of the input schema) -> box record batch (BOX_ARROW_SCHEMA)."""
    n = grids.num_rows
    labels = _flat(grids, contract.LABELS).reshape(n, grid.boxes)
    embeddings = _flat(grids, contract.EMBEDDINGS).reshape(n, grid.boxes, grid.dim)
    sets, boxes = box_rows(labels)
    row_labels = labels[sets, boxes]
    placeholder = row_labels < 0
    vectors = embeddings[sets, boxes]  # [rows, dim] copy
    vectors[placeholder] = 0.0  # an empty box may hold NaN: the placeholder carries zeros
    ids = grids.column(contract.EXAMPLE_ID).flatten().take(pa.array(sets))
    columns = {
        contract.BOX_EXAMPLE_ID: one_per_row(ids.cast(pa.large_binary())),
        contract.BOX_INDEX: one_per_row(pa.array(boxes.astype(np.int64))),
        contract.BOX_SET: one_per_row(pa.array(sets.astype(np.int64))),
        contract.BOX_LABEL: one_per_row(pa.array(np.where(placeholder, contract.EMPTY_LABEL, row_labels))),
        contract.BOX_EMBEDDING: pa.LargeListArray.from_arrays(
            pa.array(np.arange(len(sets) + 1, dtype=np.int64) * grid.dim), pa.array(vectors.reshape(-1))
        ),
    }
    return pa.RecordBatch.from_arrays(
        [columns[name] for name in contract.BOX_ARROW_SCHEMA.names], schema=contract.BOX_ARROW_SCHEMA
    )


def to_box_batches(grids: pa.RecordBatch, grid: contract.GridSpec):
    """Box record batches of `grids`, cut between examples so none nears tf.Transform's slicing threshold."""
    per_example = grid.embeddings_length * np.dtype(np.float32).itemsize
    step = max(1, MAX_BOX_BATCH_BYTES // per_example)
    for first in range(0, grids.num_rows, step):
        yield to_box_batch(grids.slice(first, step), grid)
