"""Bad input found by an outside test (issue #14): values at the edges of float32, compression
misread from the first bytes, length fields that would allocate gigabytes, non-regular files,
option values at their limits. Real files through the real pipeline; one run covers all records.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import threading
import zlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from components.embedding_stats import read as read_lib
from components.embedding_stats.common import DEAD
from components.embedding_stats.validate import MAX_L1_NORM
from pipelines import report as report_entry
from pipelines.exit_codes import ExitCode
from schemas import contract
from tests import embedding_stats_reference as ref
from tests.conftest import run_stats, write_tfrecords
from tests.test_embedding_stats_bad_input import GRID, MIXED_LABELS, _cli, _example, _grid_arrays

R = contract.Reason
F32 = np.finfo(np.float32)
VALID = np.asarray(MIXED_LABELS) >= 0
# Relative error of a float32 norm of `dim` terms (vector_norms: exact power-of-two scaling, then
# dim roundings of squares/sums and one of the square root): (dim + 2) units of 2^-24.
NORM_RTOL = (GRID.dim + 2) * 2.0**-24
# Statistics of L2-normalized float32 vectors (distances <= 2): each distance carries a few
# float32 roundings (~1e-7); the losses are means of such terms. 1e-4 absolute is a wide margin
# that a wrong formula (a wrong pair, a wrong normalization) still breaks.
STAT_ABS = 1e-4
MAGIC_LENGTH = 0x8B1F  # a first record of this length makes a plain file start with GZIP's magic 1f 8b
HUGE_LENGTH = 10**11  # bytes: tf.data would allocate this before reading (and crash)
# A box this much smaller than N(0, 1) has a norm in [NORM_EPS^2, NORM_EPS): normalized twice (transform graph,
# loss graph), it must still have no direction.
SHORT_SCALE = 1e-20
FIFO_WATCHDOG_S = 60  # a hanging read of the FIFO is released (EOF) after this, so the test fails, not hangs


def _signs(seed):
    return np.sign(np.random.default_rng(seed).normal(size=(GRID.boxes, GRID.dim))).astype(np.float32)


def accepted_records():
    """example_id -> (embeddings [boxes, dim] float32, labels): extreme but representable."""
    labels = np.asarray(MIXED_LABELS, np.int64)
    emb, _ = _grid_arrays(20, MIXED_LABELS)
    at_limit = _signs(21) * np.float32(MAX_L1_NORM / GRID.dim * 0.999)  # L1 just below the limit
    in_empty = emb.copy()
    in_empty[~VALID] = F32.max  # empty boxes are never read
    subnormal = emb * np.float32(F32.smallest_subnormal * 8)  # every component subnormal (or 0)
    huge_tiny = emb.copy()
    huge_tiny[0] *= np.float32(1e36)
    huge_tiny[1] *= np.float32(1e-30)  # tiny but normal: no flush to 0
    huge_tiny[3] *= np.float32(1e-10)
    short = emb.copy()
    short[3] *= np.float32(SHORT_SCALE)
    return {
        "short-vector": (short, labels),
        "at-limit": (at_limit, labels),
        "max-in-empty-box": (in_empty, labels),
        "subnormal": (subnormal, labels),
        "negative-zero": (np.full_like(emb, -0.0), labels),
        "huge-and-tiny": (huge_tiny, labels),
        "normal": (emb, labels),
    }


def overflowing_records():
    """example_id -> (embeddings, labels) whose norms do not fit: dead letter norm_overflow."""
    labels = np.asarray(MIXED_LABELS, np.int64)
    over = _signs(22) * np.float32(MAX_L1_NORM / GRID.dim * 1.001)
    one_box = _grid_arrays(23, MIXED_LABELS)[0]
    one_box[4] = F32.max  # one valid box at float32's max
    return {
        "over-limit": (over, labels),
        "e38": (_signs(24) * np.float32(1e38), labels),
        "3e38": (_signs(25) * np.float32(3e38), labels),
        "float32-max": (_signs(26) * F32.max, labels),
        "one-box-at-max": (one_box, labels),
    }


def padded_example(example_id, emb, labels, length) -> bytes:
    """A record of exactly `length` bytes: the example plus an extra (ignored) `padding` feature."""
    base = len(_example(example_id, emb, labels))
    for pad in range(max(0, length - base - 64), length - base + 1):  # the feature costs a few bytes more
        example = tf.train.Example.FromString(_example(example_id, emb, labels))
        example.features.feature["padding"].bytes_list.value.append(b"p" * pad)
        raw = example.SerializeToString()
        if len(raw) == length:
            return raw
    raise AssertionError(f"no padding gives {length} bytes")


def gzip_passing_plain_crc(path, records) -> str:
    """A real GZIP file of TFRecords whose first 12 bytes also pass as a plain TFRecord header.

    The gzip header's XFL, OS and FEXTRA length bytes are free, so they are set to the masked
    CRC of the first eight bytes (RFC 1952: ID1 ID2 CM FLG=FEXTRA MTIME).
    """
    raw = b"".join(
        struct.pack("<Q", len(r))
        + struct.pack("<I", read_lib._TFRecordUtil._masked_crc32c(struct.pack("<Q", len(r))))
        + r
        + struct.pack("<I", read_lib._TFRecordUtil._masked_crc32c(r))
        for r in records
    )
    first8 = b"\x1f\x8b\x08\x04" + struct.pack("<I", 12345)
    crc = struct.pack("<I", read_lib._TFRecordUtil._masked_crc32c(first8))
    extra_length = struct.unpack("<H", crc[2:])[0]
    deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    body = deflate.compress(raw) + deflate.flush()
    with open(path, "wb") as f:
        f.write(first8 + crc + b"\0" * extra_length + body + struct.pack("<II", zlib.crc32(raw), len(raw)))
    return path


@pytest.fixture(scope="module")
def edge_input(tmp_path_factory):
    directory = tmp_path_factory.mktemp("edge_input")
    accepted, overflowing = accepted_records(), overflowing_records()
    extremes = write_tfrecords(
        str(directory / "extremes.tfrecord"), [_example(k, *v) for k, v in {**accepted, **overflowing}.items()]
    )
    emb, labels = _grid_arrays(30, MIXED_LABELS)
    magic_ids = [f"magic-{i}" for i in range(3)]
    magic = write_tfrecords(
        str(directory / "gzip-magic.tfrecord"),
        [padded_example(magic_ids[0], emb, labels, MAGIC_LENGTH)] + [_example(i, emb, labels) for i in magic_ids[1:]],
    )
    both_ids = ["both-0", "both-1"]
    both = gzip_passing_plain_crc(
        str(directory / "gzip-passing-plain-crc.tfrecord"), [_example(i, emb, labels) for i in both_ids]
    )
    huge_ids = ["before-huge-0", "before-huge-1"]
    huge = write_tfrecords(str(directory / "huge-length.tfrecord"), [_example(i, emb, labels) for i in huge_ids])
    header = struct.pack("<Q", HUGE_LENGTH)
    with open(huge, "ab") as f:
        f.write(header + struct.pack("<I", read_lib._TFRecordUtil._masked_crc32c(header)) + b"x" * 64)
    return {
        "directory": str(directory),
        "pattern": str(directory / "*"),
        "accepted": accepted,
        "overflowing": overflowing,
        "extremes": extremes,
        "magic": (magic, magic_ids),
        "both": (both, both_ids),
        "huge": (huge, huge_ids),
        "emb": emb,
        "labels": labels,
    }


@pytest.fixture(scope="module")
def edge_run(edge_input, tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp("edge_run")), "out")
    _, result = run_stats(edge_input["pattern"], out, GRID)
    return out, result


def _float_values(table: pa.Table):
    """name -> every non-null float of a float or list-of-float column."""
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            column = column.combine_chunks().flatten()
        if pa.types.is_floating(column.type):
            yield name, column.drop_null().to_numpy(zero_copy_only=False)


def _json_numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _json_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_numbers(item)
    elif isinstance(value, float):
        yield value


def assert_every_output_finite(out):
    for name in (contract.VECTORS_DIR, contract.EXAMPLES_DIR):
        for column, values in _float_values(ref.read_table(out, name)):
            assert np.isfinite(values).all(), (name, column)
    with open(ref.run_file(out, contract.SUMMARY_FILE)) as f:
        summary = json.load(f)  # NaN and Infinity parse as floats, and fail below
    assert all(np.isfinite(v) for v in _json_numbers(summary))
    for column, values in _float_values(pq.read_table(ref.run_file(out, contract.SUMMARY_PARQUET_FILE))):
        assert np.isfinite(values).all(), column


def test_overflowing_norms_are_dead_letters_and_every_output_is_finite(edge_input, edge_run):
    out, result = edge_run
    dead = ref.read_table(out, contract.DEAD_LETTER_DIR).to_pylist()
    overflow = {row["example_id"]: row for row in dead if row["reason"] == R.NORM_OVERFLOW}
    assert set(overflow) == set(edge_input["overflowing"])
    assert "L1 norm above" in overflow["one-box-at-max"]["detail"] and "box 4" in overflow["one-box-at-max"]["detail"]
    examples = ref.read_table(out, contract.EXAMPLES_DIR).to_pandas().set_index("example_id")
    assert set(edge_input["accepted"]) <= set(examples.index)
    assert not set(edge_input["overflowing"]) & set(examples.index)
    assert_every_output_finite(out)
    s = result.summary
    assert s["records_read"] == s["records_good"] + s["records_rejected"]
    assert s["rejected_by_reason"][R.NORM_OVERFLOW] == len(edge_input["overflowing"])


def test_extreme_but_representable_values_match_numpy(edge_input, edge_run):
    out, _ = edge_run
    vectors = ref.read_table(out, contract.VECTORS_DIR).to_pandas()
    examples = ref.read_table(out, contract.EXAMPLES_DIR).to_pylist()
    rows = {row["example_id"]: row for row in examples}
    for key, (emb, labels) in edge_input["accepted"].items():
        if key == "short-vector":
            continue  # test_a_vector_shorter_than_norm_eps_keeps_no_direction
        x = emb[labels >= 0].astype(np.float64)
        got = vectors[vectors["example_id"] == key].sort_values(["level", "row", "col", "anchor"])
        assert len(got) == len(x), key
        # Subnormals may be flushed to 0 by TensorFlow's CPU/GPU kernels (FTZ/DAZ): a norm is
        # then 0 instead of ~1e-44, within float32's smallest normal of the exact value.
        for column, expected in (
            ("l2_norm", np.linalg.norm(x, axis=1)),
            ("l1_norm", np.abs(x).sum(axis=1)),
            ("max_abs", np.abs(x).max(axis=1)),
        ):
            np.testing.assert_allclose(got[column], expected, rtol=NORM_RTOL, atol=F32.tiny, err_msg=f"{key} {column}")
        expected = ref.example_statistics(emb.astype(np.float64), labels, "euclidean")
        for name in ("n_boxes", "n_pos_pairs", "n_neg_pairs", "n_triplets"):
            assert rows[key][name] == expected[name], (key, name)
        for name in ("pos_dist_mean", "neg_dist_min", "batch_all_loss", "batch_hard_loss", "semi_hard_loss"):
            assert rows[key][name] == pytest.approx(expected[name], abs=STAT_ABS), (key, name)
    # -0.0 and subnormal vectors have no direction: they stay zero after normalization.
    for key in ("negative-zero", "subnormal"):
        embedding = np.concatenate(vectors[vectors["example_id"] == key]["embedding"].to_numpy())
        assert np.abs(embedding).max() <= F32.tiny, key


def test_a_vector_shorter_than_norm_eps_keeps_no_direction(edge_input, edge_run):
    out, _ = edge_run
    emb, labels = edge_input["accepted"]["short-vector"]
    row = ref.read_table(out, contract.EXAMPLES_DIR).to_pandas().set_index("example_id").loc["short-vector"]
    expected = ref.example_statistics(emb.astype(np.float64), labels, "euclidean")
    assert row["pos_dist_mean"] == pytest.approx(expected["pos_dist_mean"], abs=STAT_ABS)


def test_report_of_a_run_with_extreme_values_is_written(edge_run, capsys):
    out, _ = edge_run
    assert report_entry.write_report(out) == 0
    assert os.path.getsize(os.path.join(out, contract.REPORT_FILE)) > 0


def test_a_report_that_cannot_be_written_after_a_published_run_exits_report_failed(edge_run, capsys):
    out, _ = edge_run
    blocker = os.path.join(out, contract.ALERTS_FILE)
    if os.path.exists(blocker):
        os.remove(blocker)
    os.mkdir(blocker)  # a directory where alerts.json goes: writing it fails, even as root
    try:
        code = report_entry.write_report(out)
    finally:
        os.rmdir(blocker)
    err = capsys.readouterr().err
    assert code == ExitCode.REPORT_FAILED and code not in (ExitCode.FAILED, ExitCode.USAGE)
    assert "published" in err and "report failed" in err


def test_plain_file_starting_with_gzip_magic_is_read_as_plain(edge_input, edge_run):
    out, _ = edge_run
    path, ids = edge_input["magic"]
    assert open(path, "rb").read(2) == read_lib.GZIP_MAGIC  # the case: a plain file that looks like GZIP
    assert read_lib.detect_compression(path) == [read_lib.PLAIN, read_lib.GZIP]
    both, both_ids = edge_input["both"]
    assert read_lib.detect_compression(both) == [read_lib.PLAIN, read_lib.GZIP]
    assert read_lib.detect_compression(edge_input["extremes"]) == [read_lib.PLAIN]
    examples = set(ref.read_table(out, contract.EXAMPLES_DIR).column("example_id").to_pylist())
    assert set(ids) <= examples and set(both_ids) <= examples  # every record of both files kept
    dead = ref.read_table(out, contract.DEAD_LETTER_DIR).to_pylist()
    assert not [row for row in dead if row["source_file"] in (path, both)]


def test_gzip_file_is_still_recognised_by_content(tmp_path):
    path = str(tmp_path / "no-suffix")
    with gzip.open(path, "wb") as f:
        f.write(b"anything")
    assert read_lib.detect_compression(path) == [read_lib.GZIP]


def test_length_field_beyond_the_file_is_a_corrupt_file_row_not_a_crash(edge_input, edge_run):
    out, result = edge_run
    path, ids = edge_input["huge"]
    dead = [row for row in ref.read_table(out, contract.DEAD_LETTER_DIR).to_pylist() if row["source_file"] == path]
    assert [row["reason"] for row in dead] == [R.CORRUPT_FILE]
    assert f"after {len(ids)} good record(s)" in dead[0]["detail"] and str(HUGE_LENGTH) in dead[0]["detail"]
    examples = set(ref.read_table(out, contract.EXAMPLES_DIR).column("example_id").to_pylist())
    assert set(ids) <= examples
    assert result.summary["rejected_by_reason"][R.CORRUPT_FILE] == 1


def test_centered_unnormalized_run_of_extremes_stays_finite(edge_input, tmp_path):
    """--center --no-normalize: the centered vector of a box at the limit stays finite (L1 <= 2 * limit)."""
    out = str(tmp_path / "out")
    _, result = run_stats(edge_input["extremes"], out, GRID, "--center", "--no-normalize", "--distance", "squared")
    assert_every_output_finite(out)
    assert result.summary["rejected_by_reason"][R.NORM_OVERFLOW] == len(edge_input["overflowing"])


def test_fifo_matching_the_input_is_refused_up_front(tmp_path, capsys):
    write_tfrecords(str(tmp_path / "a.tfrecord"), [_example("a", *_grid_arrays(1, MIXED_LABELS))])
    os.mkfifo(tmp_path / "b.tfrecord")
    code, err = _cli(
        [
            "--input",
            str(tmp_path / "*.tfrecord"),
            "--output",
            str(tmp_path / "out"),
            "--grid",
            ",".join(map(str, GRID.grid_shape)),
            "--dim",
            str(GRID.dim),
            "--no-report",
        ],
        capsys,
    )
    assert code == ExitCode.USAGE and "FIFO" in err and "b.tfrecord" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_reader_never_blocks_on_a_fifo(tmp_path):
    """The reader alone (e.g. a file replaced by a FIFO after listing): a corrupt_file row, no hang."""
    fifo = str(tmp_path / "fifo.tfrecord")
    os.mkfifo(fifo)

    def release():  # only matters if the reader blocks: EOF for it, and the assertion below fails
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waiting

    watchdog = threading.Timer(FIFO_WATCHDOG_S, release)
    watchdog.start()
    try:
        with test_pipeline.TestPipeline(
            options=beam.options.pipeline_options.PipelineOptions(["--runner", "FnApiRunner"])
        ) as p:
            read = p | read_lib.ReadRecords([fifo])
            assert_that(
                read[DEAD] | beam.Map(lambda row: (row["reason"], "FIFO" in row["detail"])),
                equal_to([(R.CORRUPT_FILE, True)]),
                label="dead",
            )
            assert_that(read.records, equal_to([]), label="records")
    finally:
        watchdog.cancel()


def test_option_values_at_their_limits_are_one_line_errors_before_any_work(edge_input, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--input", edge_input["extremes"], "--output", str(out)]
    cases = {
        "--margin": [["--margin", "inf"], ["--margin", "nan"], ["--margin", "1e30"]],
        "--batch-size": [["--batch-size", "0"], ["--batch-size", str(10**12)]],
        "--norm-buckets": [["--norm-buckets", "100000"]],
        "--histogram-bins": [["--histogram-bins", str(10**9)]],
        "a tf.train.Example can hold": [
            ["--grid", "65536,65536,65536,65536"],
            ["--grid", "1,1,1,1", "--dim", str(2**40)],
        ],
        "threshold min_auc": [["--threshold", "min_auc=nan"]],
    }
    for expected, variants in cases.items():
        for flags in variants:
            code, err = _cli([*base, *flags], capsys)
            assert code == ExitCode.USAGE and expected in err and "\n" not in err, (flags, code, err)
    assert not out.exists()
