"""Box cache: the box record batches of the analysis pass, kept on disk for the transform pass.

tf.Transform's analysis must see every record before any record can be transformed. Rather
than reading and decoding the input twice (each record is a whole grid), the first pass
writes its box batches (valid boxes only: ~5% of a sparse grid) to Arrow IPC files under the
run's scratch directory; the second pass replays them once the transform graph exists.
Memory stays bounded (files, not an in-memory PCollection); the files go with the scratch dir.
"""

from __future__ import annotations

import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats.common import in_global_window

CACHE_FILE_BYTES = 64 << 20  # a cache file is closed (and can be replayed in parallel) beyond this
CACHE_SUFFIX = ".arrow"


class _WriteCacheFn(beam.DoFn):
    """Record batches -> Arrow IPC stream files; emits each file's path once it is closed.

    Paths are emitted only by committed bundles, so a retried bundle's file is never replayed.
    """

    def __init__(self, directory: str, schema: pa.Schema):
        self._directory = directory
        self._schema = schema

    def start_bundle(self):
        self._path = self._stream = self._writer = None
        self._bytes = 0

    def process(self, batch: pa.RecordBatch):
        if self._writer is None:
            self._path = FileSystems.join(self._directory, f"{uuid.uuid4().hex}{CACHE_SUFFIX}")
            self._stream = FileSystems.create(self._path)
            self._writer = pa.ipc.new_stream(self._stream, self._schema)
        self._writer.write_batch(batch)
        self._bytes += batch.nbytes
        if self._bytes >= CACHE_FILE_BYTES:
            yield self._close()

    def _close(self) -> str:
        self._writer.close()
        self._stream.close()
        path, self._path, self._stream, self._writer, self._bytes = self._path, None, None, None, 0
        return path

    def finish_bundle(self):
        if self._writer is not None:
            yield in_global_window(self._close())


def _replay(path: str, *_waited_for):
    with FileSystems.open(path) as f:
        yield from pa.ipc.open_stream(f)


class CacheBatches(beam.PTransform):
    """Record batches (of `schema`) -> paths of the cache files holding them, under `directory`."""

    def __init__(self, directory: str, schema: pa.Schema):
        super().__init__()
        self._directory = directory
        self._schema = schema

    def expand(self, batches):
        return batches | "WriteCache" >> beam.ParDo(_WriteCacheFn(self._directory, self._schema))


class ReplayCache(beam.PTransform):
    """Cache file paths -> their record batches, read only once `after` (a PCollection) is complete."""

    def __init__(self, after):
        super().__init__()
        self._after = after

    def expand(self, paths):
        # The wait makes the paths a barrier: replay starts once the analysis pass is over, and the
        # replayed batches stream through one fused stage (transform, statistics, writes).
        return (paths
                | "SpreadFiles" >> beam.Reshuffle()
                | "Replay" >> beam.FlatMap(_replay, beam.pvalue.AsIter(self._after)))


def delete_cache(directory: str, *_waited_for) -> None:
    """Deletes the cache directory (called once every replay has finished)."""
    if FileSystems.exists(directory):
        FileSystems.delete([directory])
