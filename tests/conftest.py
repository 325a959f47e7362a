"""Shared, session-scoped fixtures: generated TFRecord input and one real EmbeddingStats run.

`sample_input`: 24 examples, grid 1,4,4,5, dim 16, over three files (plain, GZIP named
without .gz, GZIP named .gz), plus one file of two bad records (a NaN in a valid box and
a wrong length). `stats_run`: one real run over them (FnApiRunner, no report), reused by
every component's tests: `.output_dir`, `.options`, `.grid`, `.result`, `.input`.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from components import sample_data  # noqa: E402
from schemas import contract  # noqa: E402

SAMPLE_GRID = contract.GridSpec(1, 4, 4, 5, dim=16)
SAMPLE_EXAMPLES = 24
SAMPLE_SEED = 7
# file name -> GZIP?  (the second is GZIP without .gz: recognised by content)
SAMPLE_FILES = {"part-plain.tfrecord": False, "part-gzip-no-suffix.tfrecord": True, "part-gzip.tfrecord.gz": True}
BAD_FILE = "part-bad.tfrecord"
BAD_IDS = {"bad-nan": contract.Reason.NON_FINITE, "bad-length": contract.Reason.WRONG_LENGTH}


def write_tfrecords(path: str, records, gzip: bool = False) -> str:
    """Writes serialized records to one TFRecord file with tf.io (the reference writer)."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")) as writer:
        for record in records:
            writer.write(record)
    return path


@dataclasses.dataclass
class SampleInput:
    directory: str
    pattern: str
    grid: contract.GridSpec
    files: list
    good_ids: list
    bad_ids: dict  # example_id -> expected reason


@dataclasses.dataclass
class StatsRun:
    output_dir: str
    options: object  # EmbeddingStatsOptions
    grid: contract.GridSpec
    result: object  # executor.RunResult
    input: SampleInput


def bad_records(grid: contract.GridSpec):
    """The two bad records of the shared sample (ids in BAD_IDS)."""
    rng = np.random.default_rng(SAMPLE_SEED)
    labels = np.zeros(grid.boxes, np.int64)
    nan = rng.normal(size=(grid.boxes, grid.dim)).astype(np.float32)
    nan[3, 5] = np.nan
    short = rng.normal(size=(grid.boxes - 1, grid.dim)).astype(np.float32)
    return [sample_data.to_example("bad-nan", nan, labels), sample_data.to_example("bad-length", short, labels)]


@pytest.fixture(scope="session")
def sample_input(tmp_path_factory) -> SampleInput:
    directory = str(tmp_path_factory.mktemp("sample_input"))
    options = sample_data.SampleOptions(examples=SAMPLE_EXAMPLES, grid=SAMPLE_GRID, seed=SAMPLE_SEED)
    items = list(sample_data.sample_arrays(options))
    files = []
    for index, (name, gzip) in enumerate(SAMPLE_FILES.items()):
        chunk = items[index :: len(SAMPLE_FILES)]
        files.append(
            write_tfrecords(os.path.join(directory, name), (sample_data.to_example(*item) for item in chunk), gzip)
        )
    files.append(write_tfrecords(os.path.join(directory, BAD_FILE), bad_records(SAMPLE_GRID)))
    return SampleInput(
        directory,
        os.path.join(directory, "part-*"),
        SAMPLE_GRID,
        sorted(files),
        [item[0] for item in items],
        dict(BAD_IDS),
    )


def run_stats(input_pattern: str, output_dir: str, grid: contract.GridSpec, *flags: str):
    """One real EmbeddingStats run (FnApiRunner, no report); returns (options, RunResult)."""
    from components.embedding_stats.executor import execute
    from components.embedding_stats.options import EmbeddingStatsOptions

    options = EmbeddingStatsOptions(
        [
            "--input",
            input_pattern,
            "--output",
            output_dir,
            "--grid",
            ",".join(map(str, grid.grid_shape)),
            "--dim",
            str(grid.dim),
            "--runner",
            "FnApiRunner",
            "--no-report",
            *flags,
        ]
    )
    return options, execute(options)


@pytest.fixture(scope="session")
def stats_run(sample_input, tmp_path_factory) -> StatsRun:
    output_dir = os.path.join(str(tmp_path_factory.mktemp("stats_run")), "out")
    options, result = run_stats(sample_input.pattern, output_dir, sample_input.grid)
    return StatsRun(output_dir, options, sample_input.grid, result, sample_input)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A loopback GCS emulator (tests/gcs_emulator.py), env vars set for the session."""
    import gcs_emulator as emulators

    emulator = emulators.GcsEmulator()
    try:
        emulator.start()
    except emulators.EmulatorError as error:
        pytest.skip(f"GCS emulator unavailable: {error}")
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator):
    """`gs://<bucket>` on the loopback GCS emulator."""
    return gcs_emulator.root
