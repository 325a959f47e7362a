"""Beam's own GCS filesystem against the loopback emulator (tests/gcs_emulator.py): bytes
written through FileSystems come back exactly, match reports the real sizes, rename and
prefix delete do what GCS does, and a FnApiRunner pipeline writes and reads gs:// shards.
"""

from __future__ import annotations

import os
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

# Beam's BeamBlobWriter uploads in 16 MiB resumable chunks: one byte past that needs two.
BEAM_UPLOAD_CHUNK_BYTES = 16 * 1024 * 1024
BIG_BYTES = BEAM_UPLOAD_CHUNK_BYTES + 1
PIPELINE_LINES = 200
PIPELINE_SHARDS = 3


def unique_root(gcs_bucket: str) -> str:
    return f"{gcs_bucket}/{uuid.uuid4().hex}"


def write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def sizes(pattern: str) -> dict[str, int]:
    """path -> size in bytes of every object `pattern` matches."""
    return {m.path: m.size_in_bytes for result in FileSystems.match([pattern]) for m in result.metadata_list}


def test_filesystems_round_trip(gcs_bucket):
    root = unique_root(gcs_bucket)
    rng = np.random.default_rng(0)
    files = {
        f"{root}/run/a.txt": b"hello gcs",
        f"{root}/run/sub/big.bin": rng.bytes(BIG_BYTES),
        f"{root}/run/sub/deeper/c.txt": b"",
        f"{root}/keep/x.txt": b"sibling",
    }
    for path, data in files.items():
        write(path, data)

    assert sizes(f"{root}/run/*") == {f"{root}/run/a.txt": len(b"hello gcs")}  # * stops at '/'
    run_files = {path: len(data) for path, data in files.items() if path.startswith(f"{root}/run/")}
    assert sizes(f"{root}/run/**") == run_files
    assert sizes(f"{root}/run/sub/*.bin") == {f"{root}/run/sub/big.bin": BIG_BYTES}
    for path, data in files.items():
        with FileSystems.open(path) as handle:
            assert handle.read() == data, path
    with FileSystems.open(f"{root}/run/sub/big.bin") as handle:  # ranged read across the chunk boundary
        handle.seek(BEAM_UPLOAD_CHUNK_BYTES - 2)
        assert (
            handle.read(4)
            == files[f"{root}/run/sub/big.bin"][BEAM_UPLOAD_CHUNK_BYTES - 2 : BEAM_UPLOAD_CHUNK_BYTES + 1]
        )

    FileSystems.rename([f"{root}/run/a.txt"], [f"{root}/moved/a.txt"])
    assert not FileSystems.exists(f"{root}/run/a.txt")
    with FileSystems.open(f"{root}/moved/a.txt") as handle:
        assert handle.read() == b"hello gcs"

    FileSystems.delete([f"{root}/run/"])  # a "directory" is a prefix: everything under it goes
    assert sizes(f"{root}/run/**") == {}
    assert sizes(f"{root}/keep/*") == {f"{root}/keep/x.txt": len(b"sibling")}


def test_pipeline_writes_and_reads_gs_shards(gcs_bucket):
    root = unique_root(gcs_bucket)
    lines = [f"line-{i}" for i in range(PIPELINE_LINES)]
    flags = ["--runner=FnApiRunner", f"--temp_location={root}/tmp"]
    with beam.Pipeline(options=PipelineOptions(flags)) as pipeline:
        _ = pipeline | beam.Create(lines) | beam.io.WriteToText(f"{root}/out/part", num_shards=PIPELINE_SHARDS)
    shards = sizes(f"{root}/out/part-*")
    assert sorted(os.path.basename(p) for p in shards) == [
        f"part-{i:05d}-of-{PIPELINE_SHARDS:05d}" for i in range(PIPELINE_SHARDS)
    ]
    assert sum(shards.values()) == sum(len(line) + 1 for line in lines)  # one '\n' per line
    leftovers = [path for path in sizes(f"{root}/**") if "beam-temp" in path]
    assert leftovers == []  # finalize renamed the temp shards and removed their directory

    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        assert_that(pipeline | beam.io.ReadFromText(f"{root}/out/part-*"), equal_to(lines))
