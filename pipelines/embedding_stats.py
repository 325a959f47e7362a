"""`tripletflow run`: EmbeddingStats on a TFRecord glob (thin entry; see components/embedding_stats).

`create_pipeline(options)` / `build_pipeline(p, options)` are runner-agnostic and reused by
the nightly and Dataflow entry points; `run(argv)` adds the up-front checks, the manifest,
the atomic publish and the report hook.
"""

from __future__ import annotations

import logging
import os
import sys

from components.embedding_stats.executor import InputError, build_pipeline, create_pipeline, execute  # noqa: F401
from components.embedding_stats.options import EmbeddingStatsOptions

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ALL_WRONG_LENGTH = 3  # no good record and some of the wrong length: outputs written, but surely a wrong --grid/--dim

DEBUG_ENV = "TRIPLETFLOW_DEBUG"  # set to 1 for the full traceback of a failed run
PROG = "tripletflow run"
USAGE = (f"usage: {PROG} --input GLOB --output DIR [--grid L,H,W,A] [--dim E] [--margin 0.2] "
         "[--distance euclidean|squared|cosine] [--no-normalize] [--center] [--batch-size N] "
         "[--no-report] [--fail-on-alert] [--history ROOT] [--threshold NAME=VALUE] [any Beam pipeline option, e.g. --runner, --direct_num_workers]")


def _report(options) -> int:
    """Writes the run's report unless --no-report; the alert exit code with --fail-on-alert."""
    opts = options.view_as(EmbeddingStatsOptions)
    if not opts.report:
        return EXIT_OK
    from pipelines import report

    return report.write_report(opts.output, history_root=opts.history, thresholds=opts.threshold or (),
                               fail_on_alert=opts.fail_on_alert, prog=PROG)


def run(argv=None) -> int:
    argv = list(argv or [])
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return EXIT_OK
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        options = EmbeddingStatsOptions(argv)
        result = execute(options)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as error:  # argparse errors (e.g. --margin abc) already printed a line
        return EXIT_USAGE if error.code else EXIT_OK
    except Exception as error:  # the run failed: nothing was published
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{PROG}: error: the run failed, nothing was published: {type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else ''}", file=sys.stderr)
        return EXIT_FAILED
    if result.dry_run:
        print(f"EmbeddingStats: dry run: job built, nothing ran, nothing written under {result.output_dir}")
        return EXIT_OK
    s = result.summary
    print(f"EmbeddingStats: {s['records_read']} records read, {s['records_good']} good, "
          f"{s['records_rejected']} rejected; outputs under {result.output_dir}")
    for warning in result.warnings:
        print(f"{PROG}: error: {warning}", file=sys.stderr)
    if result.warnings:
        return EXIT_ALL_WRONG_LENGTH
    return _report(options)
