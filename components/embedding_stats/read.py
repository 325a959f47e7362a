"""Read stage: input files -> raw TFRecord records, or one corrupt_file dead letter per broken file.

Each file is read with tf.data (compression chosen by the file's content, not its name), so
a framing error is caught per file: the records before it are kept, the rest is reported.
TFXIO's TFExampleRecord source would choose compression by file extension and fail the whole
job on one broken frame; the records read here are decoded by tfx-bsl into exactly TFXIO's
Arrow record batches (validate.py) and reach tf.Transform through a TFXIO TensorAdapterConfig.
"""

from __future__ import annotations

import logging
import re

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from components.embedding_stats.common import DEAD, METRICS_NAMESPACE, dead_letter
from schemas import contract

GZIP_MAGIC = b"\x1f\x8b"
READ_BUFFER_BYTES = 8 << 20  # tf.data read buffer per file
READ_BATCH = 64  # records fetched per tf.data step
# Batches tf.data reads ahead on its own thread while Python handles the current one: the file
# read overlaps decoding/transform/statistics (the second core), memory stays bounded (one batch).
READ_PREFETCH_BATCHES = 1

_LOG = logging.getLogger(__name__)


def detect_compression(path: str) -> str:
    """"GZIP" if the file starts with the gzip magic bytes, else "" (plain TFRecord)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return "GZIP" if f.read(len(GZIP_MAGIC)) == GZIP_MAGIC else ""


def _clean_tf_message(message: str) -> str:
    """A TensorFlow error message without its op/function decorations."""
    message = re.sub(r"\{\{[^}]*\}\}", "", message)
    message = re.sub(r"\[Op:[^\]]*\].*$", "", message)
    return " ".join(message.split())


class _ReadFileFn(beam.DoFn):
    """file path -> (path, raw record) ...; broken framing -> one corrupt_file dead letter.

    tf.data reports a truncated record, a bad CRC, or a file that is not TFRecord as an
    OpError; the records before it are kept and the rest of the file is skipped.
    """

    def setup(self):
        import tensorflow as tf

        self._tf = tf
        self._corrupt = Metrics.counter(METRICS_NAMESPACE, f"rejected_{contract.Reason.CORRUPT_FILE}")
        self._files = Metrics.counter(METRICS_NAMESPACE, "files_read")

    def process(self, path):
        tf = self._tf
        index = 0
        try:
            compression = detect_compression(path)
            dataset = tf.data.TFRecordDataset(path, compression_type=compression, buffer_size=READ_BUFFER_BYTES)
            try:  # fast path: records in batches (one eager step per READ_BATCH records)
                for records in dataset.batch(READ_BATCH).prefetch(READ_PREFETCH_BATCHES).as_numpy_iterator():
                    for record in records:
                        yield path, record
                    index += len(records)
            except tf.errors.OpError:
                # The batch holding the break is lost: re-read one by one from the first record not
                # yet emitted, so every record before the break is kept and the error is exact.
                for record in dataset.skip(index).as_numpy_iterator():
                    yield path, record
                    index += 1
        except (tf.errors.OpError, OSError) as error:
            message = _clean_tf_message(getattr(error, "message", None) or str(error))
            detail = f"TFRecord framing broken after {index} good record(s); rest of file skipped: {message}"
            _LOG.warning("%s: %s", path, detail)
            self._corrupt.inc()
            yield beam.pvalue.TaggedOutput(DEAD, dead_letter(path, contract.Reason.CORRUPT_FILE, detail))
        self._files.inc()


class ReadRecords(beam.PTransform):
    """Input files -> tagged outputs: main (source_file, raw bytes), DEAD (corrupt_file rows)."""

    def __init__(self, files):
        super().__init__()
        self._files = list(files)

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self._files) | "SpreadFiles" >> beam.Reshuffle()
        return files | "ReadFile" >> beam.ParDo(_ReadFileFn()).with_outputs(DEAD, main="records")
