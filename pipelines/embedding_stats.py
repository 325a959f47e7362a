"""`tripletflow run`: EmbeddingStats on a TFRecord glob (thin entry; see components/embedding_stats).

`run(argv)` checks the flags, submits the pipeline (which commits its own output) and, unless
`--no-wait`, waits for it, prints its counts and writes the report. The nightly and Flex
Template entry points call it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from components.embedding_stats.executor import InputError, execute
from components.embedding_stats.options import LOCAL_RUNNER, EmbeddingStatsOptions
from pipelines import report
from pipelines.cli import HelpFormatter
from pipelines.exit_codes import ExitCode
from schemas import contract

MESSAGE_LIMIT_CHARS = 2000  # a failed run's message on one line, cut beyond this (set DEBUG_ENV for all)
DEBUG_ENV = "TRIPLETFLOW_DEBUG"  # set to 1 for the full traceback of a failed run
PROG = "tripletflow run"
USAGE = f"{PROG} --input GLOB --output DIR [options] [Beam pipeline options]"
EPILOG = (
    f"Any Beam pipeline option may be added, e.g. --runner (default {LOCAL_RUNNER}, Beam's local runner), "
    "--direct_num_workers, --direct_running_mode; for Dataflow --runner DataflowRunner --project --region "
    "--temp_location --dry_run (see Beam's PipelineOptions). "
    f"Exit codes: {', '.join(f'{code.value} {code.name.lower()}' for code in ExitCode)}."
)


def launcher_parser() -> argparse.ArgumentParser:
    """Flags of the launching process itself: not pipeline options, they never reach the workers."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        add_help=False,
    )
    launcher = parser.add_argument_group("launcher")
    launcher.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    launcher.add_argument(
        "--no-wait",
        "--no_wait",
        dest="wait",
        action="store_false",
        default=True,
        help="exit once the runner has accepted the job; the job commits its output itself "
        "(no report: run `tripletflow report` once MANIFEST.json is there)",
    )
    report.add_report_arguments(parser.add_argument_group("report, written after the run"), skippable=True)
    return parser


def help_text() -> str:
    """Every flag with its default and meaning: the launcher's, then the pipeline's (EmbeddingStatsOptions)."""
    parser = launcher_parser()
    EmbeddingStatsOptions._add_argparse_args(
        parser.add_argument_group("pipeline options (EmbeddingStatsOptions: they travel with the job to the workers)")
    )
    return parser.format_help()


def one_line(error: BaseException) -> str:
    """The error's whole message on one line (Beam's option validation puts its reasons on later lines)."""
    text = " ".join(str(error).split())
    return text if len(text) <= MESSAGE_LIMIT_CHARS else text[:MESSAGE_LIMIT_CHARS] + " ..."


def _report(output_dir: str, launcher) -> ExitCode:
    """Writes the run's report unless --no-report; ALERT with --fail-on-alert."""
    if not launcher.report:
        return ExitCode.OK
    code = report.write_report(
        output_dir,
        history_root=launcher.history,
        thresholds=launcher.threshold,
        fail_on_alert=launcher.fail_on_alert,
        prog=PROG,
    )
    # Thresholds were checked before the run: after a published run, a report failure is never a usage error.
    return ExitCode.REPORT_FAILED if code == ExitCode.USAGE else code


def run(argv=None) -> int:
    try:
        launcher, pipeline_argv = launcher_parser().parse_known_args(list(argv or []))
        if launcher.help:
            print(help_text())
            return ExitCode.OK
        try:
            report.check_thresholds(launcher.threshold)
        except ValueError as error:
            raise InputError(str(error)) from None
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
        options = EmbeddingStatsOptions(pipeline_argv)
        result = execute(options, wait=launcher.wait)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    except SystemExit as error:  # argparse errors (e.g. --margin abc) already printed a line
        return ExitCode.USAGE if error.code else ExitCode.OK
    except Exception as error:  # the run failed: nothing was published
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"{PROG}: error: the run failed, nothing was published: {type(error).__name__}: {one_line(error)}",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    if result.dry_run:
        print(f"EmbeddingStats: dry run: job built, nothing ran, nothing written under {result.output_dir}")
        return ExitCode.OK
    if not launcher.wait:
        job = f"job {result.job_id}" if result.job_id else "the job"
        print(
            f"EmbeddingStats: submitted {job} (run {result.run_id}); it commits {result.output_dir}/"
            f"{contract.MANIFEST_FILE} when it succeeds"
        )
        return ExitCode.OK
    s = result.summary
    print(
        f"EmbeddingStats: {s['records_read']} records read, {s['records_good']} good, "
        f"{s['records_rejected']} rejected; outputs under {result.output_dir}"
    )
    for warning in result.warnings:
        print(f"{PROG}: error: {warning}", file=sys.stderr)
    if result.warnings:
        return ExitCode.ALL_WRONG_LENGTH
    return _report(result.output_dir, launcher)
