"""EmbeddingStats executor: checks inputs up front, builds the pipeline, submits it, and (unless
told not to) waits and reads back what the job committed.

The job commits itself (commit.py): its last stage, on the workers, writes MANIFEST.json
once every file is written, so a run becomes visible whether or not the launcher is still
there. A failed run leaves the output as it was (the previous manifest, and so the previous
run, stays current); a re-run into the same output replaces the old results whole. Paths go
through Beam's FileSystems, so input and output may be gs://.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from components.embedding_stats.cache import CacheBatches, ReplayCache, delete_cache
from components.embedding_stats.commit import (
    BOX_CACHE_DIR,
    TFT_TEMP_DIR,
    CommitRun,
    RunInfo,
    discard,
    read_manifest,
    refuse_if_superseded,
)
from components.embedding_stats.common import DEAD, EXAMPLES, LABEL_SET, NORMS, PARTIAL
from components.embedding_stats.norms import AnalyzeNorms, ReadDatasetConstants, TransformNorms, WriteTransformGraph
from components.embedding_stats.options import (
    EmbeddingStatsOptions,
    loss_settings_of,
    stage_project_code,
    use_local_runner_by_default,
    validate_options,
)
from components.embedding_stats.read import ReadRecords, non_regular_files_error
from components.embedding_stats.statistics import PairStatistics
from components.embedding_stats.summary import Summarize
from components.embedding_stats.validate import ValidateRecords
from components.embedding_stats.vectors import VectorsTable
from components.embedding_stats.write import WriteOutputs
from components.storage import canonical, is_local, read_json
from schemas import contract


class InputError(ValueError):
    """A problem with the inputs or options, found before any work starts (one-line message)."""


@dataclasses.dataclass
class RunResult:
    """What `execute` saw: the committed manifest and summary (empty for a dry run or a detached launch)."""

    output_dir: str
    summary: dict
    manifest: dict
    warnings: list
    dry_run: bool = False
    job_id: str | None = None  # the runner's job id when it has one (Dataflow, a job service)
    run_id: str | None = None
    pipeline_result: object = None  # the runner's PipelineResult (a dry run's holds the built job)


def expand_input(pattern: str) -> list[str]:
    """The files matching `pattern`, sorted; InputError when there are none."""
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as error:  # Beam raises BeamIOError for a bad pattern / missing bucket
        raise InputError(f"--input {pattern!r}: cannot list files: {error}") from None
    files = sorted(m.path for m in metadata if not (is_local(m.path) and os.path.isdir(m.path)))
    if not files:
        raise InputError(f"--input {pattern!r} matches no files")
    if problem := non_regular_files_error(pattern, files):  # e.g. a FIFO: reading it would block forever
        raise InputError(problem)
    return files


def check_output(output: str) -> None:
    """InputError when `output` is a file or (locally) cannot be created/written."""
    output = output.rstrip("/")
    if not is_local(output):
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


def check_input_outside_output(pattern: str, files, output_dir: str) -> None:
    """InputError when the input glob matches files under the output: the run would read its own outputs."""
    root = canonical(output_dir)
    inside = [path for path in files if canonical(path).startswith(root + "/")]
    if inside:
        raise InputError(
            f"--input {pattern!r} matches {len(inside)} file(s) under --output {output_dir!r} "
            f"(e.g. {inside[0]}): a run must not read its own outputs; narrow the glob or move the output"
        )


def check_beam_options(options) -> None:
    """InputError listing every reason when Beam's own validation of the options fails (as the runner would)."""
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
    from apache_beam.runners.runner import create_runner

    standard = options.view_as(beam.options.pipeline_options.StandardOptions)
    try:
        runner = create_runner(standard.runner)
    except ValueError as error:  # an unknown runner name
        raise InputError(f"--runner {standard.runner!r}: {' '.join(str(error).split())}") from None
    errors = PipelineOptionsValidator(options, runner).validate()
    if errors:
        raise InputError("invalid pipeline options: " + "; ".join(" ".join(e.split()) for e in errors))


def option_values(options) -> dict:
    """The EmbeddingStats flags and the runner, for the manifest."""
    parser = argparse.ArgumentParser()
    EmbeddingStatsOptions._add_argparse_args(parser)
    opts = options.view_as(EmbeddingStatsOptions)
    values = {action.dest: getattr(opts, action.dest) for action in parser._actions if action.dest != "help"}
    values["runner"] = str(options.view_as(beam.options.pipeline_options.StandardOptions).runner)
    return values


def build_pipeline(p: beam.Pipeline, options, run: RunInfo, tft_temp_dir: str | None = None) -> dict:
    """Adds EmbeddingStats to `p`, writing `run`'s files and committing them last. Runner-agnostic.

    tf.Transform's scratch space (created while the graph is built) is inside the run's
    directory unless `tft_temp_dir` says otherwise. Returns the main PCollections (for tests
    and other entry points); "manifest" is the commit's.
    """
    opts = options.view_as(EmbeddingStatsOptions)
    grid = validate_options(options)
    temp_dir = tft_temp_dir or run.path(TFT_TEMP_DIR)
    cache_dir = run.path(BOX_CACHE_DIR)

    # One read. tf.Transform's analysis takes the valid boxes straight from the read; the same
    # boxes are cached on disk and replayed, once the transform graph exists, into the
    # transform and everything downstream (streaming: memory does not grow with the input).
    read = p | "ReadRecords" >> ReadRecords(run.input_files)
    validated = read.records | "ValidateRecords" >> ValidateRecords(grid)
    boxes = validated.good  # box record batches: the valid boxes of the good records
    transform_fn = boxes | "AnalyzeNorms" >> AnalyzeNorms(
        grid,
        normalize=opts.normalize,
        center=opts.center,
        norm_buckets=opts.norm_buckets,
        batch_size=opts.batch_size,
        temp_dir=temp_dir,
    )
    graph_dir = run.path(contract.TRANSFORM_GRAPH_DIR)
    graph_written = p | "WriteTransformGraph" >> WriteTransformGraph(grid, transform_fn, graph_dir)
    constants = graph_written | "ReadDatasetConstants" >> ReadDatasetConstants(graph_dir)
    cached = boxes | "CacheBoxes" >> CacheBatches(cache_dir, contract.BOX_ARROW_SCHEMA)
    replayed = cached | "ReplayBoxes" >> ReplayCache(after=transform_fn[0])
    transformed = replayed | "TransformNorms" >> TransformNorms(
        grid, transform_fn, batch_size=opts.batch_size, temp_dir=temp_dir
    )
    loss = loss_settings_of(options)
    stats = transformed | "PairStatistics" >> PairStatistics(
        grid, loss=loss, bins=opts.histogram_bins, constants=constants
    )
    dead = (read[DEAD], validated[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    summary = {
        **{tag: stats[tag] for tag in (PARTIAL, LABEL_SET, NORMS)},
        DEAD: dead,
    } | "Summarize" >> Summarize(loss=loss, bins=opts.histogram_bins, constants=constants)
    vectors = transformed | "VectorsTable" >> VectorsTable(grid)
    written = (vectors, stats[EXAMPLES], dead, summary) | "WriteOutputs" >> WriteOutputs(run.run_dir)
    cache_deleted = (
        p
        | "CacheDir" >> beam.Create([cache_dir])
        | "DeleteBoxCache" >> beam.Map(delete_cache, *[beam.pvalue.AsIter(w) for w in written])
    )
    manifest = (summary, graph_written, cache_deleted, *written) | "CommitRun" >> CommitRun(run)
    return {"stats": stats, "dead": dead, "summary": summary, "written": written, "manifest": manifest}


def execute(options, wait: bool = True) -> RunResult:
    """Runs EmbeddingStats; raises InputError before any work on bad inputs/options.

    With `wait` (the default) it waits for the job and returns what it committed; without,
    it returns once the runner has accepted the job, which then commits itself.
    """
    opts = options.view_as(EmbeddingStatsOptions)
    try:
        validate_options(options)
    except ValueError as error:
        raise InputError(str(error)) from None
    dry_run = options.view_as(beam.options.pipeline_options.TestOptions).dry_run
    # A dry run builds the job offline: a remote glob is not listed (that needs the bucket) and
    # stands for its files in the job's graph, which has the same shape whatever the files.
    files = (opts.input,) if dry_run and not is_local(opts.input) else expand_input(opts.input)
    output_dir = opts.output.rstrip("/")
    check_output(output_dir)
    check_input_outside_output(opts.input, files, output_dir)
    use_local_runner_by_default(options)
    check_beam_options(options)
    stage_project_code(options)
    run = RunInfo.start(output_dir, opts.input, files, option_values(options))
    if dry_run:  # e.g. Dataflow --dry_run: the job is built, nothing runs, nothing is written
        with tempfile.TemporaryDirectory(prefix="tripletflow-dry-run-") as scratch:  # never under the output
            p = beam.Pipeline(options=options)
            build_pipeline(p, options, run, tft_temp_dir=scratch)
            result = p.run()
        return RunResult(output_dir, {}, {}, [], True, _job_id(result), run.run_id, result)
    try:
        p = beam.Pipeline(options=options)
        build_pipeline(p, options, run)
        result = p.run()
        job_id = _job_id(result)
        if not wait:
            return RunResult(output_dir, {}, {}, [], False, job_id, run.run_id, result)
        state = result.wait_until_finish()
        if state not in (None, beam.runners.runner.PipelineState.DONE):
            raise RuntimeError(f"pipeline ended in state {state}")
    except BaseException as error:
        discard(run)  # best effort: the next commit deletes what a killed launcher left
        if isinstance(error, Exception):  # a later run that committed meanwhile deleted this one's files?
            refuse_if_superseded(run, read_manifest(output_dir))
        raise
    manifest = read_manifest(output_dir)
    # This run committed, and then a later-started one committed too, replacing it.
    refuse_if_superseded(run, manifest, outcome="this run's outputs were published, then replaced")
    if not manifest or manifest.get("run_id") != run.run_id:
        raise RuntimeError(f"the job ended but run {run.run_id} is not the output's committed run")
    summary = read_json(contract.listed_files(output_dir, manifest, contract.SUMMARY_FILE)[0])
    warnings = []
    wrong = summary["rejected_by_reason"].get(contract.Reason.WRONG_LENGTH, 0)
    if summary["records_good"] == 0 and wrong:  # no record fits the grid: surely a wrong --grid/--dim
        warnings.append(
            f"no good record and {wrong} of {summary['records_read']} have the wrong length for --grid {opts.grid} "
            f"--dim {opts.dim}; check the grid shape (lengths found are in {contract.DEAD_LETTER_DIR}/)"
        )
    return RunResult(output_dir, summary, manifest, warnings, False, job_id, run.run_id, result)


def _job_id(result) -> str | None:
    """The runner's id of the submitted job, where it has one (Dataflow, portable job services)."""
    try:
        return result.job_id()
    except (AttributeError, NotImplementedError):
        # Beam's portable runner keeps the job service's id without a public accessor.
        return getattr(result, "_job_id", None)
