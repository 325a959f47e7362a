"""EmbeddingStats `vectors` Parquet -> padded per-image sets in `tf.data`, memory bounded.

Rows are streamed with `pyarrow.parquet.ParquetFile.iter_batches` (never the whole table;
files opened through `fileio.open_parquet`, so local paths and gs:// URIs alike),
regrouped into one set per `example_id` with a bounded window of open examples (an
example whose rows come back after it left the window is an error, never silently split),
assigned to train or validation by a fixed hash of `example_id` (stable across runs and
processes), shuffled with a seed derived from (seed, epoch), and padded per batch with the
contract's empty label (-1), which the loss graph ignores.
"""

from __future__ import annotations

import collections
import os
import zlib
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.trainer import fileio
from schemas import contract

ID_COLUMN, LABEL_COLUMN, EMBEDDING_COLUMN = contract.COL_EXAMPLE_ID, contract.COL_LABEL, contract.COL_EMBEDDING
for _name in (ID_COLUMN, LABEL_COLUMN, EMBEDDING_COLUMN):
    assert _name in contract.VECTORS_SCHEMA.names, _name

DEFAULT_GROUP_WINDOW = 16  # examples held open while regrouping rows (memory: window sets)
DEFAULT_READ_ROWS = 8192  # Parquet rows per Arrow batch read
HASH_BUCKETS = 2**32  # zlib.crc32 range: split = crc32(example_id) / 2**32 < fraction
EPOCH_SEED_STRIDE = 1_000_003  # shuffle seed of an epoch = seed * stride + epoch (distinct per pair)

TRAIN, VALIDATION = "train", "validation"
SPLITS = (TRAIN, VALIDATION)


class SplitExampleError(ValueError):
    """An example's rows are not close enough together in `vectors` to be regrouped."""


def read_manifest(stats_dir: str) -> dict:
    """The run's MANIFEST.json; a run without it did not finish (the contract), so refuse it."""
    manifest = fileio.read_json(os.path.join(stats_dir, contract.MANIFEST_FILE))
    if manifest is None:
        raise ValueError(f"{stats_dir!r} has no {contract.MANIFEST_FILE}: not a finished EmbeddingStats run")
    return manifest


def vector_files(stats_dir: str) -> list[str]:
    """The `vectors` Parquet files the run's manifest lists (the reader rule), sorted; raises when none."""
    paths = contract.listed_files(stats_dir, read_manifest(stats_dir), contract.VECTORS_DIR)
    if not paths:
        raise ValueError(f"{stats_dir!r}: its {contract.MANIFEST_FILE} lists no {contract.VECTORS_DIR} files")
    return paths


def transform_graph_dir(stats_dir: str) -> str:
    """The committed run's tf.Transform output directory."""
    return contract.run_path(stats_dir, read_manifest(stats_dir), contract.TRANSFORM_GRAPH_DIR)


def embedding_dim(stats_dirs: Sequence[str]) -> int:
    """The vectors' dim, read from the first row of each run; raises when runs disagree."""
    dims = {}
    for stats_dir in stats_dirs:
        for path in vector_files(stats_dir):
            with fileio.open_parquet(path) as reader:
                first = next(reader.iter_batches(batch_size=1, columns=[EMBEDDING_COLUMN]), None)
            if first is not None and first.num_rows:
                dims[stats_dir] = len(first.column(0)[0])
                break
    if not dims:
        raise ValueError(f"no vectors in {list(stats_dirs)}: nothing to train on")
    if len(set(dims.values())) != 1:
        raise ValueError(f"runs have different embedding dims: {dims}")
    return next(iter(dims.values()))


def is_validation(example_id: str, fraction: float) -> bool:
    """Validation split membership by crc32 of the UTF-8 id: stable across runs and processes."""
    return zlib.crc32(example_id.encode("utf-8")) / HASH_BUCKETS < fraction


def _batch_arrays(batch: pa.RecordBatch, dim: int, path: str):
    """(ids [rows] object, labels [rows] int64, embeddings [rows, dim] float32) of one Arrow batch."""
    ids = batch.column(ID_COLUMN).to_numpy(zero_copy_only=False)
    labels = batch.column(LABEL_COLUMN).to_numpy(zero_copy_only=False).astype(np.int64)
    vectors = batch.column(EMBEDDING_COLUMN)
    if vectors.null_count or pc.any(pc.not_equal(pc.list_value_length(vectors), dim)).as_py():
        raise ValueError(f"{path}: every embedding must be a list of {dim} floats")
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    embeddings = flat.reshape(len(ids), dim)
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(f"{path}: non-finite values in the embedding column")
    if np.any(labels < 0):
        raise ValueError(f"{path}: negative label in vectors (only valid boxes belong there)")
    return ids, labels, embeddings


def iter_run_sets(
    stats_dir: str, dim: int, window: int = DEFAULT_GROUP_WINDOW, read_rows: int = DEFAULT_READ_ROWS
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields (example_id, embeddings [boxes, dim] float32, labels [boxes] int64) per example of a run.

    At most `window` examples are open at once; rows of an example already emitted raise
    SplitExampleError (the run's vectors would have to be sorted by example_id first).
    """
    open_sets: collections.OrderedDict[str, list] = collections.OrderedDict()
    closed: set[str] = set()  # ids only: O(examples) strings, not vectors

    def close_oldest():
        example_id, chunks = open_sets.popitem(last=False)
        closed.add(example_id)
        return (
            example_id,
            np.concatenate([c[0] for c in chunks]),
            np.concatenate([c[1] for c in chunks]),
        )

    for path in vector_files(stats_dir):
        with fileio.open_parquet(path) as reader:
            for batch in reader.iter_batches(batch_size=read_rows, columns=[ID_COLUMN, LABEL_COLUMN, EMBEDDING_COLUMN]):
                if not batch.num_rows:
                    continue
                ids, labels, embeddings = _batch_arrays(batch, dim, path)
                starts = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1, [len(ids)]])
                for start, end in zip(starts[:-1], starts[1:]):
                    example_id = ids[start]
                    if example_id in closed:
                        raise SplitExampleError(
                            f"{path}: rows of example {example_id!r} appear again more than {window} examples "
                            f"after its earlier rows; vectors must keep each example's rows together"
                        )
                    if example_id in open_sets:
                        open_sets.move_to_end(example_id)
                    else:
                        open_sets[example_id] = []
                    open_sets[example_id].append((embeddings[start:end], labels[start:end]))
                    while len(open_sets) > window:
                        yield close_oldest()
    while open_sets:
        yield close_oldest()


def iter_sets(stats_dirs: Sequence[str], dim: int, split: str | None, fraction: float, **kwargs):
    """Sets of all runs in order, restricted to `split` (None = both)."""
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    for stats_dir in stats_dirs:
        for example_id, embeddings, labels in iter_run_sets(stats_dir, dim, **kwargs):
            if split is None or is_validation(example_id, fraction) == (split == VALIDATION):
                yield example_id, embeddings, labels


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of one epoch: a resumed run reshuffles exactly as an uninterrupted one."""
    return seed * EPOCH_SEED_STRIDE + epoch


def make_dataset(
    stats_dirs: Sequence[str],
    dim: int,
    split: str | None,
    fraction: float,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 1,
    **kwargs,
):
    """tf.data of padded batches: {example_id [b] string, embeddings [b, boxes, dim], labels [b, boxes]}.

    `boxes` is the largest set of the batch; shorter sets are padded with label -1 (ignored by
    the loss) and zero vectors. Shuffled with `shuffle_seed` when given (deterministic).
    """
    import tensorflow as tf

    def generate():
        for example_id, embeddings, labels in iter_sets(stats_dirs, dim, split, fraction, **kwargs):
            yield {"example_id": example_id, "embeddings": embeddings, "labels": labels}

    signature = {
        "example_id": tf.TensorSpec([], tf.string),
        "embeddings": tf.TensorSpec([None, dim], tf.float32),
        "labels": tf.TensorSpec([None], tf.int64),
    }
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    if shuffle_seed is not None:
        ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.padded_batch(
        batch_size,
        padding_values={
            "example_id": "",
            "embeddings": tf.constant(0.0, tf.float32),
            "labels": tf.constant(contract.EMPTY_LABEL, tf.int64),
        },
    )
    return ds.prefetch(tf.data.AUTOTUNE)
