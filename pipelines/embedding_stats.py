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
from components.embedding_stats.options import EmbeddingStatsOptions
from schemas import contract

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ALL_WRONG_LENGTH = 3  # no good record and some of the wrong length: outputs written, but surely a wrong --grid/--dim

MESSAGE_LIMIT_CHARS = 2000  # a failed run's message on one line, cut beyond this (set DEBUG_ENV for all)
DEBUG_ENV = "TRIPLETFLOW_DEBUG"  # set to 1 for the full traceback of a failed run
PROG = "tripletflow run"
USAGE = (f"usage: {PROG} --input GLOB --output DIR [--grid L,H,W,A] [--dim E] [--margin 0.2] "
         "[--distance euclidean|squared|cosine] [--no-normalize] [--center] [--batch-size N] "
         "[--no-report] [--fail-on-alert] [--history ROOT] [--threshold NAME=VALUE] [--no-wait] "
         "[any Beam pipeline option, e.g. --runner, --direct_num_workers]")


def launcher_parser() -> argparse.ArgumentParser:
    """Flags of the launching process itself (not pipeline options: they never reach the workers)."""
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    parser.add_argument("--no-wait", "--no_wait", dest="wait", action="store_false", default=True,
                        help="exit once the runner has accepted the job; the job commits its output itself "
                             "(no report: run `tripletflow report` once MANIFEST.json is there)")
    return parser


def one_line(error: BaseException) -> str:
    """The error's whole message on one line (Beam's option validation puts its reasons on later lines)."""
    text = " ".join(str(error).split())
    return text if len(text) <= MESSAGE_LIMIT_CHARS else text[:MESSAGE_LIMIT_CHARS] + " ..."


def _report(options) -> int:
    """Writes the run's report unless --no-report; the alert exit code with --fail-on-alert."""
    opts = options.view_as(EmbeddingStatsOptions)
    if not opts.report:
        return EXIT_OK
    from components.report import REPORT_FAILED_EXIT_CODE
    from pipelines import report

    code = report.write_report(opts.output, history_root=opts.history, thresholds=opts.threshold or (),
                               fail_on_alert=opts.fail_on_alert, prog=PROG)
    # Thresholds were checked before the run: after a published run, a report failure is never a usage error.
    return REPORT_FAILED_EXIT_CODE if code == report.USAGE_ERROR else code


def run(argv=None) -> int:
    argv = list(argv or [])
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return EXIT_OK
    launcher, argv = launcher_parser().parse_known_args(argv)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        options = EmbeddingStatsOptions(argv)
        result = execute(options, wait=launcher.wait)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as error:  # argparse errors (e.g. --margin abc) already printed a line
        return EXIT_USAGE if error.code else EXIT_OK
    except Exception as error:  # the run failed: nothing was published
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{PROG}: error: the run failed, nothing was published: {type(error).__name__}: {one_line(error)}",
              file=sys.stderr)
        return EXIT_FAILED
    if result.dry_run:
        print(f"EmbeddingStats: dry run: job built, nothing ran, nothing written under {result.output_dir}")
        return EXIT_OK
    if not launcher.wait:
        job = f"job {result.job_id}" if result.job_id else "the job"
        print(f"EmbeddingStats: submitted {job} (run {result.run_id}); it commits {result.output_dir}/"
              f"{contract.MANIFEST_FILE} when it succeeds")
        return EXIT_OK
    s = result.summary
    print(f"EmbeddingStats: {s['records_read']} records read, {s['records_good']} good, "
          f"{s['records_rejected']} rejected; outputs under {result.output_dir}")
    for warning in result.warnings:
        print(f"{PROG}: error: {warning}", file=sys.stderr)
    if result.warnings:
        return EXIT_ALL_WRONG_LENGTH
    return _report(options)
