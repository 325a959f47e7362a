"""Commit stage: the pipeline's last step, on a worker, makes its run the output's current one.

The launcher may be gone by then (Dataflow, a Flex Template, Airflow), so committing is part
of the job: once every file of the run is written (the stage's side inputs are a barrier on
all writes), it checks that the tables hold what the summary counts, writes MANIFEST.json
(the commit record, listing every file with its size and rows) and deletes what the run
replaced. No data file is copied or renamed: files stay where the run wrote them, in
`<output>/runs/<run_id>/` (contract: layout and reader rule). A job that fails before this
step leaves the previous manifest, and so the previous output, untouched.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import logging
import os
import shutil
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats.write import PARQUET_SUFFIX
from components.storage import (
    ConcurrentUpdate,
    canonical,
    delete_tree,
    is_local,
    read_json,
    read_json_version,
    write_json_if_unchanged,
)
from schemas import contract

TFT_TEMP_DIR = ".tft_tmp"  # tf.Transform's scratch space inside the run directory
BOX_CACHE_DIR = ".box_cache"  # the analysis pass's box batches, replayed by the transform pass
SCRATCH_DIRS = (TFT_TEMP_DIR, BOX_CACHE_DIR)  # deleted before the commit: never part of a run
# A commit retried this often because other runs kept committing in between gives up (CommitError).
MAX_COMMIT_ATTEMPTS = 8
VERSIONED_PACKAGES = ("tripletflow", "apache-beam", "tensorflow", "tensorflow-transform", "tfx-bsl", "pyarrow", "numpy")
# Tables whose row count must equal a count of the summary before a run may commit.
COUNTED_TABLES = {
    contract.VECTORS_DIR: "valid_boxes",
    contract.EXAMPLES_DIR: "records_good",
    contract.DEAD_LETTER_DIR: "records_rejected",
}

_LOG = logging.getLogger(__name__)


class CommitError(RuntimeError):
    """The run cannot commit (superseded by a newer run, or its files disagree with its summary)."""


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso_time(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the launcher knows of a run; the commit stage writes it into the manifest."""

    output_dir: str
    run_id: str
    input_pattern: str
    input_files: tuple
    options: dict
    start_time: str

    @classmethod
    def start(cls, output_dir: str, input_pattern: str, input_files, options: dict) -> "RunInfo":
        """A new run: its id begins with its UTC start time, so run ids sort by start.

        A local output is made absolute: workers (other processes, other working directories) write there too.
        """
        now = utc_now()
        run_id = f"{now.strftime(contract.RUN_ID_TIME_FORMAT)}-{uuid.uuid4().hex[:8]}"
        return cls(canonical(output_dir), run_id, input_pattern, tuple(input_files), dict(options), iso_time(now))

    @property
    def run_dir_relative(self) -> str:
        return f"{contract.RUNS_DIR}/{self.run_id}"

    @property
    def run_dir(self) -> str:
        """Where every file of this run is written (and stays)."""
        return contract.output_path(self.output_dir, self.run_dir_relative)

    def path(self, *parts: str) -> str:
        return contract.output_path(self.run_dir, "/".join(parts))


def versions() -> dict:
    """The versions of tripletflow and its core libraries where the commit runs (the workers)."""
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def read_manifest(output_dir: str) -> dict | None:
    """The output's MANIFEST.json, or None when no run was committed there."""
    path = contract.output_path(output_dir, contract.MANIFEST_FILE)
    return read_json(path) if FileSystems.exists(path) else None


def discard(run: RunInfo) -> None:
    """Deletes a failed run's files (best effort), and locally the folders it created if left empty."""
    delete_tree(run.run_dir)
    if is_local(run.output_dir):
        for folder in (os.path.join(run.output_dir, contract.RUNS_DIR), run.output_dir):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (a previous run, another run in flight) or already gone
                break


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    with FileSystems.open(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _is_marker(path: str) -> bool:
    """True for a directory marker: the empty object "<dir>/" that tf.io.gfile (tf.Transform's
    writer) creates on an object store for every directory it makes. It holds no data and is no file."""
    return path.endswith("/")


def run_files(run: RunInfo) -> list[dict]:
    """Every file of the run (contract.MANIFEST_FILE_KEYS): path relative to the output, bytes, rows."""
    prefix = len(run.output_dir) + 1
    found = [m for m in FileSystems.match([run.path("**")])[0].metadata_list if not _is_marker(m.path)]
    files = []
    for metadata in sorted(found, key=lambda m: m.path):
        rows = _parquet_rows(metadata.path) if metadata.path.endswith(PARQUET_SUFFIX) else None
        files.append(dict(zip(contract.MANIFEST_FILE_KEYS, (metadata.path[prefix:], metadata.size_in_bytes, rows))))
    return files


def check_counts(run: RunInfo, files: list[dict], summary: dict) -> None:
    """CommitError unless each table holds the rows its summary count says (nothing lost, nothing twice)."""
    for table, key in COUNTED_TABLES.items():
        prefix = f"{run.run_dir_relative}/{table}/"
        rows = sum(entry["rows"] for entry in files if entry["path"].startswith(prefix))
        if rows != summary[key]:
            raise CommitError(f"{table} holds {rows} rows but the summary counts {summary[key]} {key}: not committed")


def build_manifest(run: RunInfo, summary: dict, files: list[dict]) -> dict:
    found = versions()
    manifest = {
        "tripletflow_version": found["tripletflow"],
        "run_id": run.run_id,
        "run_dir": run.run_dir_relative,
        "input_pattern": run.input_pattern,
        "input_files": list(run.input_files),
        "options": run.options,
        "versions": found,
        "counts": {
            "records_in": summary["records_read"],
            "records_good": summary["records_good"],
            "records_rejected": summary["records_rejected"],
            "rejected_by_reason": summary["rejected_by_reason"],
            "examples": summary["examples"],
            "empty_examples": summary["empty_examples"],
            "valid_boxes": summary["valid_boxes"],
        },
        "files": files,
        "start_time": run.start_time,
        "end_time": iso_time(utc_now()),
    }
    assert tuple(manifest) == contract.MANIFEST_KEYS, "manifest keys drifted from the contract"
    return manifest


def _replaced(run: RunInfo, relative: str) -> bool:
    """True for an entry of the output (path relative to it) that the committed run replaces.

    Everything but the new manifest and the new run is replaced, except runs that started
    after this one (they may still be in flight; the newest run commits last and wins). The
    directory markers of the output itself ("") and of its runs folder ("runs/") stay: on an
    object store deleting a marker deletes everything under it, the new run included.
    """
    if relative in (contract.MANIFEST_FILE, ""):
        return False
    parts = relative.split("/")
    return not (parts[0] == contract.RUNS_DIR and len(parts) > 1 and (parts[1] == "" or parts[1] >= run.run_id))


def delete_replaced(run: RunInfo) -> None:
    """Deletes the previous run, leftovers of failed or killed ones, and the previous report."""
    if is_local(run.output_dir):
        runs = os.path.join(run.output_dir, contract.RUNS_DIR)
        entries = [name for name in os.listdir(run.output_dir) if name != contract.RUNS_DIR]
        entries += [f"{contract.RUNS_DIR}/{name}" for name in os.listdir(runs)]
        for relative in filter(lambda r: _replaced(run, r), entries):
            path = os.path.join(run.output_dir, relative)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        return
    prefix = len(run.output_dir) + 1
    found = FileSystems.match([contract.output_path(run.output_dir, "**")])[0].metadata_list
    stale = [m.path for m in found if _replaced(run, m.path[prefix:])]
    if stale:
        FileSystems.delete(stale)


def refuse_if_superseded(run: RunInfo, manifest: dict | None, outcome: str = "nothing published") -> None:
    """CommitError when `manifest` (the output's current one) is of a run that started after `run`.

    Run ids order by start time; `outcome` says what became of this run's outputs.
    """
    if manifest and manifest.get("run_id", "") > run.run_id:
        raise CommitError(
            f"run {run.run_id} was superseded by run {manifest['run_id']}, which started later "
            f"and has committed: {outcome}"
        )


def commit(_, run: RunInfo, summary: dict, *written) -> dict:
    """Writes the run's MANIFEST.json, making it the output's current run; returns the manifest.

    `written` are the write stages' outputs, only waited for. Raises CommitError, publishing
    nothing, when a run that started later has already committed. The check and the write are
    one conditional step: a run committing in between sends this one back to the check.
    """
    for name in SCRATCH_DIRS:
        delete_tree(run.path(name))
    path = contract.output_path(run.output_dir, contract.MANIFEST_FILE)
    for _ in range(MAX_COMMIT_ATTEMPTS):
        try:
            previous, version = read_json_version(path)
            refuse_if_superseded(run, previous)
            files = run_files(run)
            try:
                check_counts(run, files, summary)
            except CommitError:  # files missing: deleted by a later-started run that committed meanwhile?
                refuse_if_superseded(run, read_json_version(path)[0])
                raise
            manifest = build_manifest(run, summary, files)
            write_json_if_unchanged(path, manifest, version)  # the commit
            break
        except ConcurrentUpdate:
            _LOG.info("run %s: another run committed meanwhile; checking again", run.run_id)
    else:
        raise CommitError(f"run {run.run_id}: {path} kept changing over {MAX_COMMIT_ATTEMPTS} attempts to commit")
    _LOG.info("committed run %s: %d files under %s", run.run_id, len(files), run.run_dir)
    delete_replaced(run)
    return manifest


class CommitRun(beam.PTransform):
    """(summary, *written PCollections) -> the committed manifest, once every write is done."""

    def __init__(self, run: RunInfo):
        super().__init__()
        self._run = run

    def expand(self, inputs):
        summary, *written = inputs
        return (
            summary.pipeline
            | "One" >> beam.Create([None])
            | "Commit"
            >> beam.Map(
                commit, self._run, beam.pvalue.AsSingleton(summary), *[beam.pvalue.AsList(pcoll) for pcoll in written]
            )
        )
