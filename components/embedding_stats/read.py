"""Read stage: input files -> raw TFRecord records, or one corrupt_file dead letter per broken file.

Each file is read with tf.data (compression chosen by the file's content, not its name), so
a framing error is caught per file: the records before it are kept, the rest is reported.
TFXIO's TFExampleRecord source would choose compression by file extension and fail the whole
job on one broken frame; the records read here are decoded by tfx-bsl into exactly TFXIO's
Arrow record batches (validate.py) and reach tf.Transform through a TFXIO TensorAdapterConfig.

Before tf.data sees a file: its compression is told from its first bytes (a plain file's
first 12 bytes are a length and that length's masked CRC, which a GZIP header matches by
chance once in 2^32: the GZIP magic alone is not enough); a local file that is not a regular
file (a FIFO would block the read forever) is refused; and a local plain file's record
lengths are checked against the file's size, because tf.data allocates a record's length
before reading it and a corrupt length field with a valid CRC crashes the process. A remote
plain object is read here instead, in one pass with the same checks (`stream_plain_records`),
so it is not downloaded twice; GZIP streams are safe in tf.data (it reads them incrementally).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from apache_beam.metrics import Metrics

from components.embedding_stats.common import DEAD, METRICS_NAMESPACE, dead_letter
from components.storage import is_local
from schemas import contract

GZIP_MAGIC = b"\x1f\x8b"
PLAIN = ""  # tf.data's compression_type of a plain TFRecord file
GZIP = "GZIP"
# TFRecord framing: [uint64 length][uint32 masked CRC32C of the length][data][uint32 masked CRC32C of the data]
HEADER = struct.Struct("<QI")
FOOTER = struct.Struct("<I")
FOOTER_BYTES = FOOTER.size
# A record longer than this cannot be a tf.train.Example (protobuf's 2 GiB message limit).
MAX_RECORD_BYTES = (1 << 31) - 1
READ_BUFFER_BYTES = 8 << 20  # tf.data read buffer per file
READ_BATCH = 64  # records fetched per tf.data step
# Batches tf.data reads ahead on its own thread while Python handles the current one: the file
# read overlaps decoding/transform/statistics (the second core), memory stays bounded (one batch).
READ_PREFETCH_BATCHES = 1

_LOG = logging.getLogger(__name__)


def is_plain_header(header: bytes) -> bool:
    """True if `header` (a file's first HEADER.size bytes) is a TFRecord length with its valid masked CRC."""
    if len(header) < HEADER.size:
        return False
    _, crc = HEADER.unpack(header[: HEADER.size])
    return _TFRecordUtil._masked_crc32c(header[:8]) == crc  # Beam's TFRecord CRC (google-crc32c)


def detect_compression(path: str) -> list[str]:
    """The readings of `path` to try, in order: [PLAIN], [GZIP], or [PLAIN, GZIP] when both fit.

    A valid first TFRecord header means plain, however its first two bytes look; failing
    that, the GZIP magic means GZIP; anything else is read as plain (and reported broken).
    A file that has both is read as plain first, as GZIP if that yields no record.
    """
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        header = f.read(HEADER.size)
    plain, gzip = is_plain_header(header), header[: len(GZIP_MAGIC)] == GZIP_MAGIC
    if plain and gzip:
        return [PLAIN, GZIP]
    return [GZIP] if gzip else [PLAIN]


def not_regular_file(path: str) -> str | None:
    """Why a local `path` cannot be read as a TFRecord file (a FIFO, socket, device, dangling
    link, ...), or None: reading a FIFO would block forever. Remote objects are always files."""
    if not is_local(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return f"cannot be read: {error.strerror}"
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file"


def non_regular_files_error(pattern: str, files) -> str | None:
    """One line naming the matched files that are not regular files (see `not_regular_file`), or None.

    For the executor's up-front check: such inputs are refused before any work.
    """
    bad = [(path, why) for path in files if (why := not_regular_file(path))]
    if not bad:
        return None
    shown = "; ".join(f"{path} {why}" for path, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    return f"--input {pattern!r} matches {len(bad)} file(s) that cannot be read as TFRecord files: {shown}"


def _overrun(records: int, offset: int, length: int, left: int) -> str | None:
    """Why record `records` (its header at byte `offset`, `left` bytes after header and footer) cannot be read."""
    if length <= min(left, MAX_RECORD_BYTES):
        return None
    return (
        f"record {records} at byte {offset} has a length field of {length} bytes: more than the "
        f"{max(left, 0)} bytes left in the file or the {MAX_RECORD_BYTES} a tf.train.Example can hold"
    )


def plain_framing_break(path: str) -> tuple[int, str] | None:
    """(records before it, why) for the first record of a local plain file whose valid-CRC length
    field overruns the file or MAX_RECORD_BYTES, else None (other breaks are left to tf.data).

    tf.data allocates a record's length before reading it, so such a field (an allocation of
    gigabytes) would crash the worker. One small read per record header.
    """
    size = os.path.getsize(path)
    offset = records = 0
    with open(path, "rb") as f:
        while offset + HEADER.size <= size:
            header = os.pread(f.fileno(), HEADER.size, offset)
            if not is_plain_header(header):
                return None  # a corrupt length: tf.data reports it without allocating
            length = HEADER.unpack(header)[0]
            why = _overrun(records, offset, length, size - offset - HEADER.size - FOOTER_BYTES)
            if why:
                return records, why
            offset += HEADER.size + length + FOOTER_BYTES
            records += 1
    return None


class FramingError(ValueError):
    """A plain TFRecord stream breaks after `records` good records."""

    def __init__(self, records: int, why: str):
        super().__init__(why)
        self.records = records


def stream_plain_records(path: str):
    """The records of a plain TFRecord file (a remote object), read in one pass through Beam's FileSystems.

    Each length field is checked (its CRC, and that it fits the rest of the object and
    MAX_RECORD_BYTES) before its record is read, so a bogus length never becomes an allocation,
    and each record's CRC is checked: the safety of `plain_framing_break` without reading a
    remote object twice. Raises FramingError after the last good record.
    """
    size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    offset = records = 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while offset < size:
            header = f.read(HEADER.size)
            if not is_plain_header(header):
                raise FramingError(records, f"record {records} at byte {offset}: no valid TFRecord length field")
            length = HEADER.unpack(header)[0]
            why = _overrun(records, offset, length, size - offset - HEADER.size - FOOTER_BYTES)
            if why:
                raise FramingError(records, why)
            data, footer = f.read(length), f.read(FOOTER_BYTES)
            if len(footer) < FOOTER_BYTES or FOOTER.unpack(footer)[0] != _TFRecordUtil._masked_crc32c(data):
                raise FramingError(records, f"record {records} at byte {offset}: truncated or corrupt data (CRC)")
            yield data
            offset += HEADER.size + length + FOOTER_BYTES
            records += 1


def _clean_tf_message(message: str) -> str:
    """A TensorFlow error message without its op/function decorations."""
    message = re.sub(r"\{\{[^}]*\}\}", "", message)
    message = re.sub(r"\[Op:[^\]]*\].*$", "", message)
    return " ".join(message.split())


class _ReadFileFn(beam.DoFn):
    """file path -> (path, raw record) ...; broken framing -> one corrupt_file dead letter.

    tf.data reports a truncated record, a bad CRC, or a file that is not TFRecord as an
    OpError; the records before it are kept and the rest of the file is skipped. A file that
    cannot be read safely (see the module docstring) gets the same corrupt_file row.
    """

    def setup(self):
        import tensorflow as tf

        self._tf = tf
        self._corrupt = Metrics.counter(METRICS_NAMESPACE, f"rejected_{contract.Reason.CORRUPT_FILE}")
        self._files = Metrics.counter(METRICS_NAMESPACE, "files_read")

    def _records(self, path, compression, limit=None):
        """The file's records, `limit` at most; raises the OpError of a break after the last good one."""
        tf = self._tf
        dataset = tf.data.TFRecordDataset(path, compression_type=compression, buffer_size=READ_BUFFER_BYTES)
        if limit is not None:
            dataset = dataset.take(limit)
        index = 0
        try:  # fast path: records in batches (one eager step per READ_BATCH records)
            for records in dataset.batch(READ_BATCH).prefetch(READ_PREFETCH_BATCHES).as_numpy_iterator():
                yield from records
                index += len(records)
        except tf.errors.OpError:
            # The batch holding the break is lost: re-read one by one from the first record not
            # yet emitted, so every record before the break is kept and the error is exact.
            yield from dataset.skip(index).as_numpy_iterator()

    def _corrupt_row(self, path, good, message):
        detail = f"TFRecord framing broken after {good} good record(s); rest of file skipped: {message}"
        _LOG.warning("%s: %s", path, detail)
        self._corrupt.inc()
        return beam.pvalue.TaggedOutput(DEAD, dead_letter(path, contract.Reason.CORRUPT_FILE, detail))

    def process(self, path):
        tf = self._tf
        good = 0
        try:
            why = not_regular_file(path)
            if why:  # a FIFO would block the read forever
                raise OSError(f"{path} {why}")
            readings = detect_compression(path)
            if readings[0] == PLAIN and not is_local(path):  # read here in one checked pass, not by tf.data
                try:
                    for record in stream_plain_records(path):
                        yield path, record
                        good += 1
                    readings = []
                except FramingError as error:
                    if good or len(readings) == 1:
                        readings = []
                        yield self._corrupt_row(path, good, str(error))
                    else:
                        readings = readings[1:]  # no plain record at all: the GZIP reading is the file's
            overrun = plain_framing_break(path) if readings[:1] == [PLAIN] else None
            if overrun is not None and overrun[0] == 0 and len(readings) > 1:
                readings, overrun = readings[1:], None  # no plain record at all: the GZIP reading is the file's
            for attempt, compression in enumerate(readings):
                limit = overrun[0] if overrun is not None and compression == PLAIN else None
                try:
                    for record in self._records(path, compression, limit):
                        yield path, record
                        good += 1
                    break
                except tf.errors.OpError:
                    if good or attempt + 1 == len(readings):
                        raise
                    overrun = None  # nothing read as plain: the GZIP reading is the file's
            if overrun is not None:
                yield self._corrupt_row(path, good, overrun[1])
        except (tf.errors.OpError, OSError) as error:
            yield self._corrupt_row(path, good, _clean_tf_message(getattr(error, "message", None) or str(error)))
        self._files.inc()


class ReadRecords(beam.PTransform):
    """Input files -> tagged outputs: main (source_file, raw bytes), DEAD (corrupt_file rows)."""

    def __init__(self, files):
        super().__init__()
        self._files = list(files)

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self._files) | "SpreadFiles" >> beam.Reshuffle()
        return files | "ReadFile" >> beam.ParDo(_ReadFileFn()).with_outputs(DEAD, main="records")
