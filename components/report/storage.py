"""File access for the report through Beam's FileSystems, so local and gs:// runs read alike.

A run's output may live on a local disk or in a bucket (Dataflow); `tripletflow run` calls the
report on whichever it wrote.  Local writes go through a temporary file and a rename (readers
never see half a report); object stores publish an object whole when it is closed.
"""

from __future__ import annotations

import os
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

FILE_MODE = 0o666  # permissions of locally written files before the umask, as open() gives


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def join(path: str, *parts: str) -> str:
    return FileSystems.join(path, *parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def match(pattern: str) -> list[str]:
    """Paths of the files matching a glob, sorted (folders themselves are not listed)."""
    return sorted(metadata.path for metadata in FileSystems.match([pattern])[0].metadata_list)


def open_read(path: str):
    """A binary, seekable file object (pyarrow reads only the columns it needs from it)."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_text(path: str) -> str:
    with open_read(path) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    data = text.encode("utf-8")
    if not is_local(path):
        with FileSystems.create(path, mime_type="text/plain", compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
        return
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def same_location(a: str, b: str) -> bool:
    if is_local(a) and is_local(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")
