"""EmbeddingStats executor: checks inputs up front, runs the pipeline into a sibling temp
directory, writes MANIFEST.json last and publishes the whole directory at once.

A failed run leaves the output directory as it was (no new manifest, no partial files);
a re-run into the same output replaces the old results whole. Paths go through Beam's
FileSystems, so the output may be gs://; a local output is published by directory
rename (atomic), a remote one file by file with the manifest written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import shutil
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats.cache import CacheBatches, ReplayCache, delete_cache
from components.embedding_stats.common import DEAD, write_json
from components.embedding_stats.norms import AnalyzeNorms, TransformNorms
from components.embedding_stats.read import ReadRecords, non_regular_files_error
from components.embedding_stats.statistics import EXAMPLES, FED_MAX, LABEL_SET, NORMS, PARTIAL, VECTORS, PairStatistics
from components.embedding_stats.summary import Summarize
from components.embedding_stats.validate import ValidateRecords
from components.embedding_stats.write import WriteOutputs
from components.embedding_stats.options import (
    EmbeddingStatsOptions,
    stage_project_code,
    use_local_runner_by_default,
    validate_options,
)
from schemas import contract

TEMP_SUFFIX = ".tmp-"  # <output>.tmp-<token>: where a run writes before publishing
OLD_SUFFIX = ".old-"  # <output>.old-<token>: previous results while being replaced
TFT_TEMP_DIR = ".tft_tmp"  # tf.Transform's scratch space inside the temp output
BOX_CACHE_DIR = ".box_cache"  # the analysis pass's box batches, replayed by the transform pass
VERSIONED_PACKAGES = ("tripletflow", "apache-beam", "tensorflow", "tensorflow-transform", "tfx-bsl",
                      "pyarrow", "numpy")


class InputError(ValueError):
    """A problem with the inputs or options, found before any work starts (one-line message)."""


@dataclasses.dataclass
class RunResult:
    output_dir: str
    summary: dict
    manifest: dict
    warnings: list
    dry_run: bool = False


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def expand_input(pattern: str) -> list[str]:
    """The files matching `pattern`, sorted; InputError when there are none."""
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as error:  # Beam raises BeamIOError for a bad pattern / missing bucket
        raise InputError(f"--input {pattern!r}: cannot list files: {error}") from None
    files = sorted(m.path for m in metadata if not (_is_local(m.path) and os.path.isdir(m.path)))
    if not files:
        raise InputError(f"--input {pattern!r} matches no files")
    if problem := non_regular_files_error(pattern, files):  # e.g. a FIFO: reading it would block forever
        raise InputError(problem)
    return files


def check_output(output: str) -> None:
    """InputError when `output` is a file or (locally) cannot be created/written."""
    output = output.rstrip("/")
    if not _is_local(output):
        return  # remote permissions are only known when writing; failures leave no manifest
    if os.path.exists(output) and not os.path.isdir(output):
        raise InputError(f"--output {output!r} is a file, not a directory")
    parent = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise InputError(f"--output {output!r}: cannot create its parent directory: {error.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.isdir(output) and not os.access(output, os.W_OK | os.X_OK)):
        raise InputError(f"--output {output!r} is not writable")


def option_values(options) -> dict:
    """The EmbeddingStats flags and the runner, for the manifest."""
    parser = argparse.ArgumentParser()
    EmbeddingStatsOptions._add_argparse_args(parser)
    opts = options.view_as(EmbeddingStatsOptions)
    values = {action.dest: getattr(opts, action.dest) for action in parser._actions if action.dest != "help"}
    values["runner"] = str(options.view_as(beam.options.pipeline_options.StandardOptions).runner)
    return values


def versions() -> dict:
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def build_pipeline(p: beam.Pipeline, options, *, output_dir: str | None = None, input_files=None) -> dict:
    """Adds EmbeddingStats to `p`, writing under `output_dir` (default --output). Runner-agnostic.

    Returns the main PCollections (for tests and other entry points). No manifest: that is
    the executor's last step, after the pipeline has succeeded.
    """
    opts = options.view_as(EmbeddingStatsOptions)
    grid = validate_options(options)
    output_dir = (output_dir or opts.output).rstrip("/")
    files = list(input_files) if input_files is not None else expand_input(opts.input)
    temp_dir = FileSystems.join(output_dir, TFT_TEMP_DIR)
    cache_dir = FileSystems.join(output_dir, BOX_CACHE_DIR)

    # One read. tf.Transform's analysis takes the valid boxes straight from the read; the same
    # boxes are cached on disk and replayed, once the transform graph exists, into the
    # transform and everything downstream (streaming: memory does not grow with the input).
    read = p | "ReadRecords" >> ReadRecords(files)
    validated = read.records | "ValidateRecords" >> ValidateRecords(grid)
    boxes = validated.good  # box record batches: the valid boxes of the good records
    transform_fn = boxes | "AnalyzeNorms" >> AnalyzeNorms(
        grid, normalize=opts.normalize, center=opts.center, norm_buckets=opts.norm_buckets,
        batch_size=opts.batch_size, temp_dir=temp_dir,
        transform_graph_dir=FileSystems.join(output_dir, contract.TRANSFORM_GRAPH_DIR))
    cached = boxes | "CacheBoxes" >> CacheBatches(cache_dir, contract.BOX_ARROW_SCHEMA)
    replayed = cached | "ReplayBoxes" >> ReplayCache(after=transform_fn[0])
    transformed = replayed | "TransformNorms" >> TransformNorms(
        grid, transform_fn, batch_size=opts.batch_size, temp_dir=temp_dir)
    stats = transformed | "PairStatistics" >> PairStatistics(
        grid, margin=opts.margin, distance=opts.distance, normalize=opts.normalize, bins=opts.histogram_bins)
    dead = (read[DEAD], validated[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    summary = {**{tag: stats[tag] for tag in (PARTIAL, LABEL_SET, NORMS, FED_MAX)}, DEAD: dead} | "Summarize" >> Summarize(
        distance=opts.distance, normalize=opts.normalize, bins=opts.histogram_bins)
    written = (stats[VECTORS], stats[EXAMPLES], dead, summary) | "WriteOutputs" >> WriteOutputs(output_dir)
    _ = (p | "CacheDir" >> beam.Create([cache_dir])
         | "DeleteBoxCache" >> beam.Map(delete_cache, beam.pvalue.AsIter(written)))
    return {"stats": stats, "dead": dead, "summary": summary, "written": written}


def create_pipeline(options) -> beam.Pipeline:
    """A pipeline writing straight into --output (no temp dir, no manifest), e.g. for Dataflow."""
    use_local_runner_by_default(options)
    stage_project_code(options)
    p = beam.Pipeline(options=options)
    build_pipeline(p, options)
    return p


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: str) -> dict:
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _delete_tree(path: str) -> None:
    if _is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif FileSystems.exists(path):
        FileSystems.delete([path])


def _files_under(root: str) -> list[str]:
    match = FileSystems.match([FileSystems.join(root, "**")])[0]
    return [m.path for m in match.metadata_list]


def publish(temp_dir: str, output_dir: str) -> None:
    """Replaces `output_dir` whole with `temp_dir` (whose MANIFEST.json was written last)."""
    if _is_local(output_dir):
        old = None
        if os.path.exists(output_dir):
            old = f"{output_dir}{OLD_SUFFIX}{uuid.uuid4().hex[:8]}"
            os.rename(output_dir, old)
        os.rename(temp_dir, output_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return
    # Object stores have no directory rename: retire the old manifest first (the old run is
    # then visibly incomplete), replace the files, and write the new manifest last.
    manifest = FileSystems.join(output_dir, contract.MANIFEST_FILE)
    if FileSystems.exists(manifest):
        FileSystems.delete([manifest])
    if FileSystems.exists(output_dir):
        FileSystems.delete([output_dir])
    sources = [path for path in _files_under(temp_dir) if not path.endswith("/" + contract.MANIFEST_FILE)]
    FileSystems.copy(sources, [output_dir + path[len(temp_dir):] for path in sources])
    FileSystems.copy([FileSystems.join(temp_dir, contract.MANIFEST_FILE)], [manifest])
    FileSystems.delete([temp_dir])


def execute(options) -> RunResult:
    """Runs EmbeddingStats end to end; raises InputError before any work on bad inputs/options."""
    opts = options.view_as(EmbeddingStatsOptions)
    try:
        validate_options(options)
    except ValueError as error:
        raise InputError(str(error)) from None
    files = expand_input(opts.input)
    output_dir = opts.output.rstrip("/")
    check_output(output_dir)
    use_local_runner_by_default(options)
    stage_project_code(options)
    dry_run = options.view_as(beam.options.pipeline_options.TestOptions).dry_run
    temp_dir = f"{output_dir}{TEMP_SUFFIX}{uuid.uuid4().hex[:8]}"
    start = _utc_now()
    try:
        p = beam.Pipeline(options=options)
        build_pipeline(p, options, output_dir=temp_dir, input_files=files)
        result = p.run()
        state = result.wait_until_finish()
        if state not in (None, beam.runners.runner.PipelineState.DONE):
            raise RuntimeError(f"pipeline ended in state {state}")
        if dry_run:  # e.g. Dataflow --dry_run: the job was built, nothing ran, nothing to publish
            if _is_local(temp_dir):
                _delete_tree(temp_dir)
            return RunResult(output_dir, {}, {}, [], dry_run=True)
        _delete_tree(FileSystems.join(temp_dir, TFT_TEMP_DIR))
        summary = _read_json(FileSystems.join(temp_dir, contract.SUMMARY_FILE))
        manifest = {
            "tripletflow_version": versions()["tripletflow"],
            "input_pattern": opts.input,
            "input_files": files,
            "options": option_values(options),
            "versions": versions(),
            "counts": {
                "records_in": summary["records_read"],
                "records_good": summary["records_good"],
                "records_rejected": summary["records_rejected"],
                "rejected_by_reason": summary["rejected_by_reason"],
                "examples": summary["examples"],
                "empty_examples": summary["empty_examples"],
                "valid_boxes": summary["valid_boxes"],
            },
            "start_time": start,
            "end_time": _utc_now(),
        }
        assert tuple(manifest) == contract.MANIFEST_KEYS, "manifest keys drifted from the contract"
        write_json(FileSystems.join(temp_dir, contract.MANIFEST_FILE), manifest)  # last file written
        publish(temp_dir, output_dir)
    except BaseException:
        _delete_tree(temp_dir)
        raise
    warnings = []
    wrong = summary["rejected_by_reason"].get(contract.Reason.WRONG_LENGTH, 0)
    if summary["records_good"] == 0 and wrong:  # no record fits the grid: surely a wrong --grid/--dim
        warnings.append(
            f"no good record and {wrong} of {summary['records_read']} have the wrong length for --grid {opts.grid} "
            f"--dim {opts.dim}; check the grid shape (lengths found are in {contract.DEAD_LETTER_DIR}/)")
    return RunResult(output_dir, summary, manifest, warnings)
