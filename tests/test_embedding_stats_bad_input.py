"""Bad input (issue #7): each kind gets its documented outcome (schemas/README.md, dead letter)."""

from __future__ import annotations

import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from components import sample_data
from components.embedding_stats.common import DEAD
from components.embedding_stats.read import ReadRecords
from components.embedding_stats.validate import ValidateRecords
from pipelines import embedding_stats as entry
from pipelines.exit_codes import ExitCode
from schemas import contract
from tests import embedding_stats_reference as ref
from tests.conftest import run_stats, write_tfrecords

GRID = contract.GridSpec(1, 2, 2, 3, dim=8)  # 12 boxes
HUGE = 1e30
R = contract.Reason


def _grid_arrays(seed, labels):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(GRID.boxes, GRID.dim)).astype(np.float32), np.asarray(labels, np.int64)


def _example(example_id, emb, labels):
    return sample_data.to_example(example_id, emb, labels)


def _features(**features) -> bytes:
    example = tf.train.Example()
    for name, (kind, values) in features.items():
        getattr(example.features.feature[name], kind).value[:] = values
    return example.SerializeToString()


MIXED_LABELS = [0, 0, 1, 1, 2, -1, -1, 0, 2, -1, 1, 1]


def good_records():
    """example_id -> serialized record of well-formed (if extreme) examples."""
    records = {}
    emb, labels = _grid_arrays(1, MIXED_LABELS)
    records["good-normal"] = (emb, labels)
    emb, labels = _grid_arrays(2, MIXED_LABELS)
    records["huge"] = (emb * np.float32(HUGE), labels)  # norms ~3e30: finite in float32
    emb, labels = _grid_arrays(3, MIXED_LABELS)
    emb[5, 2] = np.nan  # box 5 is empty: its values are never read
    emb[6, :] = np.inf
    records["nan-in-empty-box"] = (emb, labels)
    records["all-empty"] = _grid_arrays(4, [-1] * GRID.boxes)
    records["one-identity"] = _grid_arrays(5, [3] * 6 + [-1] * 6)
    return records


def bad_records():
    """example_id (None when unreadable) -> (serialized record, expected reason)."""
    emb, labels = _grid_arrays(6, MIXED_LABELS)
    nan, inf, low = emb.copy(), emb.copy(), labels.copy()
    nan[0, 0] = np.nan
    inf[4, 7] = -np.inf
    low[3] = -5
    return {
        "nan-valid": (_example("nan-valid", nan, labels), R.NON_FINITE),
        "inf-valid": (_example("inf-valid", inf, labels), R.NON_FINITE),
        "label-below": (_example("label-below", emb, low), R.BAD_LABEL),
        "wrong-length": (_example("wrong-length", emb[:-1], labels), R.WRONG_LENGTH),
        "missing-embeddings": (
            _features(example_id=("bytes_list", [b"missing-embeddings"]), labels=("int64_list", labels.tolist())),
            R.MISSING_FEATURE,
        ),
        "empty-id": (_example("", emb, labels), R.BAD_EXAMPLE_ID),
        None: (b"\x08\x96\x01 this is not a tf.train.Example", R.UNPARSEABLE),
        "wrong-type": (
            _features(
                example_id=("bytes_list", [b"wrong-type"]),
                embeddings=("float_list", emb.ravel()),
                labels=("float_list", labels.astype(float).tolist()),
            ),
            R.WRONG_TYPE,
        ),
    }


def framing_files(directory):
    """Files whose TFRecord framing is broken: name -> (path, good records before the break)."""
    emb, labels = _grid_arrays(7, MIXED_LABELS)
    records = [_example(f"framed-{i}", emb, labels) for i in range(3)]
    truncated = write_tfrecords(os.path.join(directory, "truncated.tfrecord"), records)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 10)  # last record cut short
    crc = write_tfrecords(os.path.join(directory, "bad-crc.tfrecord"), records[:2])
    data = bytearray(open(crc, "rb").read())
    data[-20] ^= 0xFF  # a byte inside the second record's payload: its data CRC no longer matches
    open(crc, "wb").write(bytes(data))
    not_tfrecord = os.path.join(directory, "not-tfrecord.tfrecord")
    open(not_tfrecord, "w").write("this is a text file, not a TFRecord file\n" * 20)
    return {"truncated": (truncated, 2), "bad-crc": (crc, 1), "not-tfrecord": (not_tfrecord, 0)}


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bad_input"))
    good = good_records()
    bad = bad_records()
    records = [_example(k, *v) for k, v in good.items()] + [raw for raw, _ in bad.values()]
    mixed = write_tfrecords(os.path.join(directory, "mixed.tfrecord"), records, gzip=True)
    framing = framing_files(directory)
    empty = os.path.join(directory, "empty.tfrecord")
    open(empty, "wb").close()
    return {
        "directory": directory,
        "pattern": os.path.join(directory, "*"),
        "good": good,
        "bad": bad,
        "mixed": mixed,
        "framing": framing,
        "empty": empty,
    }


@pytest.fixture(scope="module")
def bad_run(bad_input, tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp("bad_run")), "out")
    _, result = run_stats(bad_input["pattern"], out, GRID)
    return out, result


def test_each_bad_record_lands_in_dead_letter_with_its_reason(bad_input, bad_run):
    out, result = bad_run
    dead = ref.read_table(out, contract.DEAD_LETTER_DIR).to_pylist()
    records = [row for row in dead if row["reason"] != R.CORRUPT_FILE]
    assert sorted((row["example_id"] or "", row["reason"]) for row in records) == sorted(_expected_dead(bad_input))
    raws = {raw for raw, _ in bad_input["bad"].values()}
    assert all(row["raw"] in raws and row["source_file"] == bad_input["mixed"] and row["detail"] for row in records)


def _expected_dead(bad_input):
    """(example_id as the dead letter can know it, reason): unreadable records have no id."""
    for key, (_, reason) in bad_input["bad"].items():
        known = key if reason not in (R.WRONG_TYPE, R.UNPARSEABLE, R.BAD_EXAMPLE_ID) else ""
        yield known, reason


def test_broken_framing_gives_one_corrupt_file_row_per_file_and_keeps_earlier_records(bad_input, bad_run):
    out, _ = bad_run
    dead = ref.read_table(out, contract.DEAD_LETTER_DIR).to_pylist()
    corrupt = {row["source_file"]: row for row in dead if row["reason"] == R.CORRUPT_FILE}
    assert set(corrupt) == {path for path, _ in bad_input["framing"].values()}
    for path, good_before in bad_input["framing"].values():
        assert f"after {good_before} good record(s)" in corrupt[path]["detail"]
        assert corrupt[path]["raw"] is None
    examples = ref.read_table(out, contract.EXAMPLES_DIR).to_pandas()
    framed = examples[examples["example_id"].str.startswith("framed-")]
    assert len(framed) == sum(good for _, good in bad_input["framing"].values())
    assert bad_input["empty"] not in {row["source_file"] for row in dead}  # empty file: no records, nothing lost


def test_counts_add_up_and_nothing_else_is_lost(bad_input, bad_run):
    out, result = bad_run
    summary = result.summary
    n_framed = sum(good for _, good in bad_input["framing"].values())
    assert summary["records_good"] == len(bad_input["good"]) + n_framed
    assert summary["records_rejected"] == len(bad_input["bad"]) + len(bad_input["framing"])
    assert summary["records_read"] == summary["records_good"] + summary["records_rejected"]
    expected = {reason: 0 for reason in R.ALL}
    for _, reason in bad_input["bad"].values():
        expected[reason] += 1
    expected[R.CORRUPT_FILE] = len(bad_input["framing"])
    assert summary["rejected_by_reason"] == expected
    examples = ref.read_table(out, contract.EXAMPLES_DIR).to_pandas()
    # the records before each break are kept (each framing file starts framed-0, framed-1, ...)
    framed_ids = [f"framed-{i}" for _, good in bad_input["framing"].values() for i in range(good)]
    assert sorted(examples["example_id"]) == sorted([*bad_input["good"], *framed_ids])
    assert summary["empty_examples"] == 1


def test_extreme_values_give_finite_or_null_statistics_never_nan(bad_input, bad_run):
    out, _ = bad_run
    examples = ref.read_table(out, contract.EXAMPLES_DIR)
    vectors = ref.read_table(out, contract.VECTORS_DIR)
    for table in (examples, vectors):
        for name in table.column_names:
            column = table.column(name)
            if pa.types.is_floating(column.type):
                values = column.drop_null().to_numpy()
                assert np.isfinite(values).all(), name
    embedding = np.concatenate(vectors.column("embedding").to_numpy(zero_copy_only=False))
    assert np.isfinite(embedding).all()
    rows = {row["example_id"]: row for row in examples.to_pylist()}
    # all-empty grid: counts 0, every statistic null.
    assert rows["all-empty"]["n_boxes"] == 0
    assert all(rows["all-empty"][name] is None for name in contract.NULL_WHEN_ZERO)
    # one identity: no negatives -> negative distances and losses null, positives defined.
    one = rows["one-identity"]
    assert one["n_neg_pairs"] == 0 and one["n_triplets"] == 0 and one["n_pos_pairs"] == 15
    assert one["neg_dist_mean"] is None and one["batch_all_loss"] is None and one["pos_dist_mean"] is not None
    # huge values and NaN/Inf in empty boxes: statistics equal the numpy reference.
    for key in ("huge", "nan-in-empty-box", "good-normal"):
        emb, labels = bad_input["good"][key]
        expected = ref.example_statistics(emb.astype(np.float64), labels, "euclidean")
        for name in ("n_boxes", "n_pos_pairs", "n_neg_pairs", "n_triplets"):
            assert rows[key][name] == expected[name], (key, name)
        for name in ("pos_dist_mean", "neg_dist_min", "batch_hard_loss", "semi_hard_loss"):
            assert rows[key][name] == pytest.approx(expected[name], rel=1e-3, abs=1e-4), (key, name)
    huge = vectors.filter(pa.compute.equal(vectors.column("example_id"), "huge")).to_pandas()
    emb, labels = bad_input["good"]["huge"]
    np.testing.assert_allclose(
        np.sort(huge["l2_norm"]), np.sort(np.linalg.norm(emb[labels >= 0].astype(np.float64), axis=1)), rtol=1e-4
    )


def test_read_and_validate_transforms_route_records(bad_input):
    """The reader and validator alone, on Beam's TestPipeline with assert_that."""
    with test_pipeline.TestPipeline(
        options=beam.options.pipeline_options.PipelineOptions(["--runner", "FnApiRunner"])
    ) as p:
        read = p | ReadRecords([bad_input["mixed"], bad_input["empty"], bad_input["framing"]["bad-crc"][0]])
        validated = read.records | ValidateRecords(GRID)
        reasons = (read[DEAD], validated[DEAD]) | beam.Flatten() | beam.Map(lambda row: row["reason"])
        n_good = (
            validated.good  # box record batches: count their examples
            | "Examples" >> beam.Map(lambda batch: len(set(batch.column(contract.BOX_SET).flatten().to_pylist())))
            | "CountGood" >> beam.CombineGlobally(sum)
        )
        assert_that(
            reasons, equal_to([reason for _, reason in bad_input["bad"].values()] + [R.CORRUPT_FILE]), label="reasons"
        )
        assert_that(n_good, equal_to([len(bad_input["good"]) + 1]), label="good")


def _cli(argv, capsys):
    code = entry.run(argv)
    return code, capsys.readouterr().err.strip()


def test_up_front_errors_are_one_line_and_nonzero(bad_input, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    pattern = bad_input["pattern"]
    cases = {
        "matches no files": ["--input", str(tmp_path / "nothing-*.tfrecord"), "--output", str(tmp_path / "o")],
        "is a file": ["--input", pattern, "--output", str(a_file)],
        "cannot create": ["--input", pattern, "--output", str(a_file / "sub" / "out")],
        "--margin": ["--input", pattern, "--output", str(tmp_path / "o"), "--margin", "-0.1"],
        "--distance": ["--input", pattern, "--output", str(tmp_path / "o"), "--distance", "manhattan"],
        "--grid": ["--input", pattern, "--output", str(tmp_path / "o"), "--grid", "1,2,3"],
    }
    for expected, argv in cases.items():
        code, err = _cli(argv, capsys)
        assert code == ExitCode.USAGE, (expected, code, err)
        assert expected in err and "\n" not in err, (expected, err)
    assert not (tmp_path / "o").exists()


def test_all_records_mismatching_the_grid_publish_empty_tables_and_fail(bad_input, tmp_path, capsys):
    out = tmp_path / "out"
    # A previous run's leftovers must disappear: the new results replace the old whole.
    (out / contract.VECTORS_DIR).mkdir(parents=True)
    (out / contract.VECTORS_DIR / "part-stale.parquet").write_bytes(b"stale")
    (out / contract.MANIFEST_FILE).write_text("{}")
    code, err = _cli(
        [
            "--input",
            bad_input["mixed"],
            "--output",
            str(out),
            "--grid",
            "1,2,2,4",
            "--runner",
            "FnApiRunner",
            "--no-report",
        ],
        capsys,
    )
    assert code == ExitCode.ALL_WRONG_LENGTH and "wrong length" in err
    assert not (out / contract.VECTORS_DIR / "part-stale.parquet").exists()
    manifest = json.loads((out / contract.MANIFEST_FILE).read_text())
    counts = manifest["counts"]
    assert counts["records_good"] == 0 and counts["records_in"] == counts["records_rejected"] > 0
    for name, schema in contract.TABLE_SCHEMAS.items():
        table = ref.read_table(str(out), name)
        assert table is not None and table.schema.remove_metadata().equals(schema), name
        if name != contract.DEAD_LETTER_DIR:
            assert table.num_rows == 0
    assert sorted(os.listdir(out)) == [contract.MANIFEST_FILE, contract.RUNS_DIR]  # the old files are gone
    assert os.listdir(out / contract.RUNS_DIR) == [manifest["run_id"]]


def test_failed_run_publishes_nothing_and_keeps_old_results(bad_input, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure while summarizing")

    monkeypatch.setattr(
        "components.embedding_stats.summary.assemble_summary", fail
    )  # looked up by name when the pipeline runs
    fresh = tmp_path / "fresh"
    argv = [
        "--input",
        bad_input["mixed"],
        "--grid",
        ",".join(map(str, GRID.grid_shape)),
        "--dim",
        str(GRID.dim),
        "--runner",
        "FnApiRunner",
        "--no-report",
    ]
    code, err = _cli([*argv, "--output", str(fresh)], capsys)
    assert code == ExitCode.FAILED and "injected failure" in err and "\n" not in err
    assert not fresh.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / contract.MANIFEST_FILE).write_text('{"old": true}')
    code, _ = _cli([*argv, "--output", str(old)], capsys)
    assert code == ExitCode.FAILED
    assert json.loads((old / contract.MANIFEST_FILE).read_text()) == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["old"]  # no temp or old-results directories left behind
