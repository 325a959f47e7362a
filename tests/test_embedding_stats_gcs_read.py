"""Remote plain TFRecord objects (issue #14): read in one checked pass, a bogus length field is a corrupt_file row.

On gs:// (the loopback emulator, Beam's own GCS filesystem) a plain object is not read by tf.data,
which would allocate a record's length before reading it: the reader checks every length field
against the object's size first, as it does for local files.
"""

from __future__ import annotations

import struct

import apache_beam as beam
import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from components.embedding_stats import read as read_lib
from components.embedding_stats.common import DEAD
from schemas import contract
from tests.conftest import write_tfrecords

HUGE_LENGTH = 10**11  # bytes: tf.data would allocate this before reading (and crash)
RECORDS = [f"record-{i}".encode() * (i + 1) for i in range(5)]  # framing only: any bytes are a record


def _upload(data: bytes, remote: str) -> str:
    with FileSystems.create(remote, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    return remote


def _frame_header(length: int) -> bytes:
    header = struct.pack("<Q", length)
    return header + struct.pack("<I", read_lib._TFRecordUtil._masked_crc32c(header))


@pytest.fixture(scope="module")
def remote_files(gcs_bucket, tmp_path_factory):
    local = write_tfrecords(str(tmp_path_factory.mktemp("plain") / "good.tfrecord"), RECORDS)
    with open(local, "rb") as f:
        good = f.read()
    return {
        "good": _upload(good, f"{gcs_bucket}/read/good.tfrecord"),
        "huge": _upload(good + _frame_header(HUGE_LENGTH) + b"x" * 64, f"{gcs_bucket}/read/huge.tfrecord"),
        "truncated": _upload(good[:-3], f"{gcs_bucket}/read/truncated.tfrecord"),  # the last record overruns
        "corrupt": _upload(good[:-6] + bytes([good[-6] ^ 1]) + good[-5:], f"{gcs_bucket}/read/corrupt.tfrecord"),
    }


def test_a_remote_plain_object_reads_every_record(remote_files):
    assert list(read_lib.stream_plain_records(remote_files["good"])) == RECORDS


def test_a_bogus_length_field_or_a_cut_record_keeps_the_records_before_it(remote_files):
    with pytest.raises(read_lib.FramingError, match=f"length field of {HUGE_LENGTH} bytes") as broken:
        for _ in read_lib.stream_plain_records(remote_files["huge"]):
            pass
    assert broken.value.records == len(RECORDS)
    for name, why in (("truncated", "length field of"), ("corrupt", "truncated or corrupt data")):
        seen = []
        with pytest.raises(read_lib.FramingError, match=why):
            for record in read_lib.stream_plain_records(remote_files[name]):
                seen.append(record)
        assert seen == RECORDS[:-1], name


def test_read_records_on_gs_routes_records_and_one_corrupt_file_row_per_broken_object(remote_files):
    paths = [remote_files[name] for name in ("good", "huge", "truncated")]
    expected = (
        [(paths[0], r) for r in RECORDS] + [(paths[1], r) for r in RECORDS] + [(paths[2], r) for r in RECORDS[:-1]]
    )
    with test_pipeline.TestPipeline() as p:
        read = p | read_lib.ReadRecords(paths)
        assert_that(read.records, equal_to(expected), label="Records")
        dead = read[DEAD] | beam.Map(
            lambda row: (
                row[contract.COL_SOURCE_FILE],
                row[contract.COL_REASON],
                f"after {len(RECORDS) - (row[contract.COL_SOURCE_FILE] == paths[2])} "
                "good record(s)" in row[contract.COL_DETAIL],
            )
        )
        assert_that(
            dead,
            equal_to([(paths[1], contract.Reason.CORRUPT_FILE, True), (paths[2], contract.Reason.CORRUPT_FILE, True)]),
            label="Dead",
        )
