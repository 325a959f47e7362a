"""File access of EmbeddingStats and the report: Beam's FileSystems, so local paths and gs:// read and write alike.

Documents (JSON, HTML) appear whole: locally they are written beside the target and renamed
over it; an object store publishes an object whole when it is closed. The Trainer reads and
writes through TensorFlow's `tf.io.gfile` instead (components/trainer/fileio.py), the layer its
checkpoints and SavedModels use anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

FILE_MODE = 0o666  # permissions of locally written files before the umask, as open() gives
JSON_INDENT = 2


def is_local(path: str) -> bool:
    """True for a path on this machine's filesystem (no scheme: Beam has no file:// filesystem)."""
    return FileSystems.get_scheme(path) is None


def canonical(path: str) -> str:
    """A stable name for a path: absolute for local paths, a URI without its trailing slash."""
    return os.path.abspath(path) if is_local(path) else path.rstrip("/")


def same_location(a: str, b: str) -> bool:
    if is_local(a) and is_local(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return canonical(a) == canonical(b)


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


def read_json(path: str):
    """The JSON document at `path`."""
    return json.loads(read_text(path))


def write_bytes(path: str, data: bytes, mime_type: str = "application/octet-stream") -> None:
    """`data` at `path`, appearing whole (see the module docstring)."""
    if not is_local(path):
        with FileSystems.create(path, mime_type=mime_type, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"), mime_type="text/plain")


def write_json(path: str, document) -> None:
    write_bytes(path, json.dumps(document, indent=JSON_INDENT).encode("utf-8"), mime_type="application/json")


class ConcurrentUpdate(Exception):
    """The document at a path changed between reading it and writing over it."""


def read_json_version(path: str):
    """(the JSON document at `path` or None when absent, its version for `write_json_if_unchanged`).

    Raises ConcurrentUpdate when the document is replaced while it is being read (gs://).
    """
    if is_local(path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return json.loads(data), data  # local version: the bytes themselves (inodes are reused)
    from google.api_core.exceptions import NotFound, PreconditionFailed

    blob = _gcs_blob(path, reload=True)
    if blob is None:
        return None, None
    try:
        data = blob.download_as_bytes(if_generation_match=blob.generation)
    except (NotFound, PreconditionFailed):  # replaced between the lookup and the download
        raise ConcurrentUpdate(path) from None
    return json.loads(data), blob.generation


def write_json_if_unchanged(path: str, document, version) -> None:
    """Writes `document` at `path` only if it still holds `version` (None: no document); else ConcurrentUpdate.

    The compare and the write are one step: locally under an advisory lock on the folder, on
    gs:// by GCS's ifGenerationMatch precondition. Two writers racing never both win.
    """
    data = json.dumps(document, indent=JSON_INDENT).encode("utf-8")
    if is_local(path):
        with _folder_lock(os.path.dirname(os.path.abspath(path))):
            try:
                with open(path, "rb") as f:
                    current = f.read()
            except FileNotFoundError:
                current = None
            if current != version:
                raise ConcurrentUpdate(path)
            write_bytes(path, data)
        return
    from google.api_core.exceptions import PreconditionFailed

    try:
        _gcs_blob(path).upload_from_string(
            data, content_type="application/json", if_generation_match=version or 0
        )  # 0: only if absent
    except PreconditionFailed:
        raise ConcurrentUpdate(path) from None


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive advisory lock (flock) on a local folder itself: no lock file to leave behind."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _gcs_blob(path: str, reload: bool = False):
    """The google-cloud-storage Blob of a gs:// path (Beam's own client); with `reload`, None when absent."""
    from apache_beam.io.gcp import gcsio

    bucket, name = gcsio.parse_gcs_path(path)
    bucket = gcsio.GcsIO().client.bucket(bucket)
    return bucket.get_blob(name) if reload else bucket.blob(name)


def delete_tree(path: str) -> None:
    """Deletes a directory (or object prefix) and everything under it; nothing if absent."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif FileSystems.match([join(path, "**")])[0].metadata_list:
        FileSystems.delete([path.rstrip("/") + "/"])
