"""Path-agnostic file access of the Trainer: local paths and URIs (gs://, ram://, ...) alike.

Every file the Trainer touches goes through TensorFlow's filesystem layer `tf.io.gfile`,
which reads and writes gs:// natively (checkpoints and SavedModels already use it), so the
nightly DAG can train on EmbeddingStats runs that live on GCS. TensorFlow is imported on
first use only, so `tripletflow train` rejects bad flags before paying for it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from typing import Iterator

import pyarrow.parquet as pq

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # RFC 3986 scheme followed by "://"
JSON_INDENT = 2
TMP_SUFFIX = ".tmp"  # atomic JSON writes: written here, then renamed over the target


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def has_scheme(path: str) -> bool:
    """True for URIs such as gs://bucket/x or ram://x, False for local paths."""
    return bool(_SCHEME.match(path))


def canonical(path: str) -> str:
    """A stable name for a path: absolute for local paths, a URI exactly as given."""
    return path if has_scheme(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _gfile().exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern (sorted: a run's files are read in a fixed order)."""
    return sorted(_gfile().glob(pattern))


def makedirs(path: str) -> None:
    _gfile().makedirs(path)


def read_json(path: str, default=None):
    """The JSON document at `path`, or `default` when there is no such file."""
    gfile = _gfile()
    if not gfile.exists(path):
        return default
    with gfile.GFile(path, "r") as f:
        return json.load(f)


def write_json(path: str, document) -> None:
    """Writes to `<path>.tmp`, then renames it over `path`: a reader never sees half a document.

    Atomic on local filesystems; on GCS a rename is copy + delete, but each object appears
    whole when written, so a reader still sees either the old or the new document.
    """
    gfile = _gfile()
    tmp = f"{path}{TMP_SUFFIX}"
    with gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(document, indent=JSON_INDENT, sort_keys=True))
    gfile.rename(tmp, path, overwrite=True)


class _GFileReader(io.RawIOBase):
    """A `tf.io.gfile.GFile` as a seekable, readable Python file for pyarrow.

    pyarrow accepts any file object with read/seek/tell/closed; GFile lacks `closed`
    (pyarrow then reports "I/O operation on closed file"), which io.RawIOBase supplies.
    """

    def __init__(self, path: str):
        super().__init__()
        self._file = _gfile().GFile(path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def readinto(self, buffer) -> int:
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._file.seek(offset, whence)
        return self._file.tell()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


@contextlib.contextmanager
def open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """A `pyarrow.parquet.ParquetFile` over `tf.io.gfile`: the footer, then only the row groups
    and columns asked for are read (`iter_batches` streams; the whole file is never loaded)."""
    with _GFileReader(path) as raw:
        yield pq.ParquetFile(raw)
