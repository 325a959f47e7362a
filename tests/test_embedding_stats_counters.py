"""EmbeddingStats Beam counters (issue #3): records read, good, rejected by reason, valid boxes,
empty examples, files read.

One real pipeline (`build_pipeline` on Beam's TestPipeline, FnApiRunner) over real TFRecord
files holding good generated grids, all-empty grids and bad records of three reasons (hand-made
bytes that are no tf.train.Example, wrong lengths, NaN in a valid box) plus a file whose
framing breaks. Every counter is compared with a count made here from what was written
(numpy on the good records' labels), never with the pipeline's own outputs.
"""

from __future__ import annotations

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from components import sample_data  # noqa: E402
from schemas import contract  # noqa: E402

GRID = contract.GridSpec(1, 3, 3, 2, dim=4)
GOOD_EXAMPLES = 11  # generated grids, about half the boxes labelled
EMPTY_EXAMPLES = 2  # grids with every box empty (label -1)
SEED = 3
SHARDS = 2
R = contract.Reason
# Distinct numbers per reason, so a counter reporting another reason's count fails.
UNPARSEABLE_RECORDS = 3
WRONG_LENGTH_RECORDS = 2
NON_FINITE_RECORDS = 1
NOT_AN_EXAMPLE = b"\x08\x96\x01 these bytes are no tf.train.Example"  # varint field, then garbage
TRUNCATED_COMPLETE_RECORDS = 2  # complete good records before the broken framing
TRUNCATE_BYTES = 10  # cut off the end of the truncated file's last record


def _bad_records(rng) -> dict:
    """reason -> serialized bad records (each a known, single reason)."""
    labels = rng.integers(0, 3, size=GRID.boxes)
    embeddings = rng.normal(size=(GRID.boxes, GRID.dim)).astype(np.float32)
    short = rng.normal(size=(GRID.boxes - 1, GRID.dim)).astype(np.float32)  # one box short
    nan = embeddings.copy()
    nan[int(np.argmax(labels >= 0)), 0] = np.nan  # in a valid box
    return {
        R.UNPARSEABLE: [NOT_AN_EXAMPLE] * UNPARSEABLE_RECORDS,
        R.WRONG_LENGTH: [sample_data.to_example(f"short-{i}", short, labels) for i in range(WRONG_LENGTH_RECORDS)],
        R.NON_FINITE: [sample_data.to_example(f"nan-{i}", nan, labels) for i in range(NON_FINITE_RECORDS)],
    }


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory):
    """Writes the input, runs the pipeline once; (counters by name, expected counts by name)."""
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline

    from components.embedding_stats.commit import RunInfo
    from components.embedding_stats.common import METRICS_NAMESPACE
    from components.embedding_stats.executor import build_pipeline
    from components.embedding_stats.options import EmbeddingStatsOptions

    root = tmp_path_factory.mktemp("counters")
    rng = np.random.default_rng(SEED)
    good = list(
        sample_data.sample_arrays(
            sample_data.SampleOptions(examples=GOOD_EXAMPLES, grid=GRID, empty_fraction=0.5, seed=SEED)
        )
    )
    good += [
        (
            f"empty-{i}",
            rng.normal(size=(GRID.boxes, GRID.dim)).astype(np.float32),
            np.full(GRID.boxes, contract.EMPTY_LABEL, np.int64),
        )
        for i in range(EMPTY_EXAMPLES)
    ]
    bad = _bad_records(rng)

    # Good and bad records interleaved over SHARDS files.
    records = [sample_data.to_example(*item) for item in good[TRUNCATED_COMPLETE_RECORDS:]]
    bad_flat = [record for reason in bad for record in bad[reason]]
    mixed = []
    for i in range(max(len(records), len(bad_flat))):
        mixed += records[i : i + 1] + bad_flat[i : i + 1]
    files = sample_data.write_records(mixed, str(root / "input"), shards=SHARDS)
    # One more file: two good records, then a third cut short (framing broken: corrupt_file).
    truncated_dir = str(root / "truncated")
    (truncated,) = sample_data.write_records(
        [sample_data.to_example(*item) for item in good[:TRUNCATED_COMPLETE_RECORDS]] + [records[0]], truncated_dir
    )
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - TRUNCATE_BYTES)
    files.append(truncated)

    options = EmbeddingStatsOptions(
        [
            "--input",
            os.path.join(str(root), "*", "*"),
            "--output",
            str(root / "output"),
            "--grid",
            ",".join(map(str, GRID.grid_shape)),
            "--dim",
            str(GRID.dim),
            "--runner",
            "FnApiRunner",
        ]
    )
    with TestPipeline(options=options) as p:
        build_pipeline(p, options, RunInfo.start(str(root / "output"), options.input, files, {}))
    result = p.result  # set by the context manager, after waiting until the run finished
    counters = collections.Counter()
    for metric in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]:
        counters[metric.key.metric.name] += metric.committed  # summed over the steps reporting it

    good_labels = np.stack([labels for _, _, labels in good])  # [examples, boxes]
    expected = {
        "files_read": len(files),
        "records_read": len(good) + len(bad_flat),  # the cut-short record is never read
        "records_good": len(good),
        "examples": len(good),
        "valid_boxes": int((good_labels >= 0).sum()),
        "empty_examples": int((~(good_labels >= 0).any(axis=1)).sum()),
        **{f"rejected_{reason}": 0 for reason in R.ALL},
        **{f"rejected_{reason}": len(rows) for reason, rows in bad.items()},
        f"rejected_{R.CORRUPT_FILE}": 1,
    }
    return counters, expected


def test_fixture_covers_every_counted_case(counted_run):
    """The input really has empty examples, valid boxes and bad records of several reasons."""
    _, expected = counted_run
    assert expected["empty_examples"] >= EMPTY_EXAMPLES
    assert 0 < expected["valid_boxes"] < expected["records_good"] * GRID.boxes
    assert sum(1 for name, n in expected.items() if name.startswith("rejected_") and n) == 4


@pytest.mark.parametrize(
    "name",
    [
        "files_read",
        "records_read",
        "records_good",
        "examples",
        "valid_boxes",
        "empty_examples",
        *(f"rejected_{reason}" for reason in R.ALL),
    ],
)
def test_counter_equals_independent_count(counted_run, name):
    counters, expected = counted_run
    assert counters[name] == expected[name], f"counter {name}: {counters[name]} != {expected[name]}"


def test_counts_add_up(counted_run):
    """Read = good + rejected by the validator (corrupt_file rows are whole-file events, not records)."""
    counters, _ = counted_run
    rejected = sum(counters[f"rejected_{reason}"] for reason in R.ALL if reason != R.CORRUPT_FILE)
    assert counters["records_read"] == counters["records_good"] + rejected
