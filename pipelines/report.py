"""`tripletflow report`: write report.html and alerts.json for a finished run's output.

Also home of the report's flags, which `tripletflow run` and `nightly` share (`add_report_arguments`).
"""

from __future__ import annotations

import argparse
import sys

from pipelines.cli import HelpFormatter
from pipelines.exit_codes import ExitCode
from schemas import contract

PROG = "tripletflow report"
EPILOG = (
    f"exit codes: {ExitCode.OK} written (no alert, or no --fail-on-alert); {ExitCode.ALERT} alerts with "
    f"--fail-on-alert; {ExitCode.USAGE} bad arguments or not a finished run; {ExitCode.REPORT_FAILED} a "
    "finished run whose report could not be written"
)


def _threshold_help() -> str:
    from components.report import threshold_names

    return f"override an alert threshold (repeatable); names: {', '.join(threshold_names())}"


def add_report_arguments(parser, *, skippable: bool) -> None:
    """The report's flags on `parser` (an argparse parser or group); `skippable` adds --no-report."""
    if skippable:
        parser.add_argument(
            "--no-report",
            dest="report",
            action="store_false",
            default=True,
            help="do not write report.html/alerts.json after the run",
        )
    parser.add_argument(
        "--history",
        default=None,
        help="root of date=YYYY-MM-DD partitions of earlier runs, for trends and AUC-drop alerts",
    )
    parser.add_argument(
        "--fail-on-alert",
        dest="fail_on_alert",
        action="store_true",
        default=False,
        help=f"exit {ExitCode.ALERT} when any alert fires (a scheduler marks the night red)",
    )
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE", help=_threshold_help())


def check_thresholds(pairs) -> None:
    """ValueError (one line) unless every NAME=VALUE is a known threshold with a finite value."""
    from components.report import parse_overrides

    try:
        parse_overrides(list(pairs or ()))
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from None


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--output", required=True, help="a run's output directory (holds MANIFEST.json)")
    parser.add_argument(
        "--model", default=None, help="a trainer output directory (default: OUTPUT/model when it holds metrics.json)"
    )
    add_report_arguments(parser, skippable=False)
    return parser


def write_report(
    output_dir, *, history_root=None, thresholds=(), model_dir=None, fail_on_alert=False, prog=PROG
) -> ExitCode:
    """Writes report.html and alerts.json for a finished run and prints the alerts.

    Shared by `tripletflow report`, `run` and `nightly`. Returns OK, ALERT (alerts and
    `fail_on_alert`), USAGE (bad threshold, not a finished run) or REPORT_FAILED (anything
    else: the run stays published, its report is missing).
    """
    from components import storage
    from components.report import RunDataError, generate_report, parse_overrides

    try:
        overrides = parse_overrides(list(thresholds))
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        alerts = generate_report(output_dir, history_root=history_root, thresholds=overrides, model_dir=model_dir)
    except RunDataError as error:
        print(f"{prog}: report of {output_dir} failed: {error}", file=sys.stderr)
        return ExitCode.USAGE
    except Exception as error:  # noqa: BLE001 - a finished run's report must not pass for bad arguments
        message = " ".join(str(error).split())
        print(
            f"{prog}: the run's outputs are published, but its report failed: {type(error).__name__}: {message}",
            file=sys.stderr,
        )
        return ExitCode.REPORT_FAILED
    print(f"wrote {storage.join(output_dir, contract.REPORT_FILE)} and {contract.ALERTS_FILE}: {len(alerts)} alert(s)")
    for alert in alerts:
        print(f"  ALERT {alert['name']} ({alert['basis']}): {alert['message']}", file=sys.stderr)
    return ExitCode.ALERT if alerts and fail_on_alert else ExitCode.OK


def run(argv=None) -> int:
    args = parser().parse_args(argv)
    return write_report(
        args.output,
        history_root=args.history,
        thresholds=args.threshold,
        model_dir=args.model,
        fail_on_alert=args.fail_on_alert,
    )
