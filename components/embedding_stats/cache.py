"""Box cache: the box record batches of the analysis pass, kept on disk for the transform pass.

tf.Transform's analysis must see every record before any record can be transformed. Rather
than reading and decoding the input twice (each record is a whole grid), the first pass
writes its box batches (valid boxes only: ~5% of a sparse grid) to Arrow IPC files under the
run's scratch directory; the second pass replays them once the transform graph exists.
Memory stays bounded (files, not an in-memory PCollection); the files go with the scratch dir.
"""

from __future__ import annotations

import functools

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats.common import WriteBundleFilesFn

CACHE_FILE_BYTES = 64 << 20  # a cache file is closed (and can be replayed in parallel) beyond this
CACHE_SUFFIX = ".arrow"


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
        return batches | "WriteCache" >> beam.ParDo(
            WriteBundleFilesFn(
                self._directory,
                CACHE_SUFFIX,
                functools.partial(pa.ipc.new_stream, schema=self._schema),
                roll_bytes=CACHE_FILE_BYTES,
            )
        )


class ReplayCache(beam.PTransform):
    """Cache file paths -> their record batches, read only once `after` (a PCollection) is complete."""

    def __init__(self, after):
        super().__init__()
        self._after = after

    def expand(self, paths):
        # The wait makes the paths a barrier: replay starts once the analysis pass is over, and the
        # replayed batches stream through one fused stage (transform, statistics, writes).
        return (
            paths
            | "SpreadFiles" >> beam.Reshuffle()
            | "Replay" >> beam.FlatMap(_replay, beam.pvalue.AsIter(self._after))
        )


def delete_cache(directory: str, *_waited_for) -> None:
    """Deletes the cache directory (called once every replay has finished)."""
    if FileSystems.exists(directory):
        FileSystems.delete([directory])
