"""`tripletflow report`: write report.html and alerts.json for a finished run's output.

Exit codes: 0 (written; no alert, or no --fail-on-alert), components.report.ALERT_EXIT_CODE
(alerts with --fail-on-alert), 2 (bad arguments or not a finished run),
components.report.REPORT_FAILED_EXIT_CODE (a finished run whose report could not be written).
"""

from __future__ import annotations

import argparse
import sys

from schemas import contract

USAGE_ERROR = 2


def parse_args(argv):
    from components.report import ALERT_EXIT_CODE, threshold_names

    from components.report import REPORT_FAILED_EXIT_CODE

    description = (__doc__.replace("components.report.ALERT_EXIT_CODE", str(ALERT_EXIT_CODE))
                   .replace("components.report.REPORT_FAILED_EXIT_CODE", str(REPORT_FAILED_EXIT_CODE)))
    parser = argparse.ArgumentParser(prog="tripletflow report", description=description)
    parser.add_argument("--output", required=True, help="a run's output directory (holds MANIFEST.json)")
    parser.add_argument("--history", default=None,
                        help="root of date=YYYY-MM-DD partitions of earlier runs, for trends and AUC-drop alerts")
    parser.add_argument("--model", default=None,
                        help="a trainer output directory (default: OUTPUT/model when it holds metrics.json)")
    parser.add_argument("--fail-on-alert", action="store_true",
                        help="exit with a distinct non-zero code when any alert fires")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help=f"override an alert threshold (repeatable); names: {', '.join(threshold_names())}")
    return parser.parse_args(argv)


def write_report(output_dir, *, history_root=None, thresholds=(), model_dir=None, fail_on_alert=False,
                 prog="tripletflow report") -> int:
    """Writes report.html and alerts.json for a finished run and prints the alerts.

    Shared by `tripletflow report`, `run` and `nightly`. Returns 0, the report's
    ALERT_EXIT_CODE (alerts and `fail_on_alert`), USAGE_ERROR (bad threshold, not a finished
    run) or REPORT_FAILED_EXIT_CODE (anything else: the run stays published, its report is missing).
    """
    from components.report import (
        ALERT_EXIT_CODE,
        REPORT_FAILED_EXIT_CODE,
        RunDataError,
        generate_report,
        parse_overrides,
        storage,
    )

    try:
        overrides = parse_overrides(list(thresholds))
    except ValueError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    try:
        alerts = generate_report(output_dir, history_root=history_root, thresholds=overrides, model_dir=model_dir)
    except RunDataError as error:
        print(f"{prog}: report of {output_dir} failed: {error}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as error:  # noqa: BLE001 - a finished run's report must not pass for bad arguments
        message = " ".join(str(error).split())
        print(f"{prog}: the run's outputs are published, but its report failed: {type(error).__name__}: {message}",
              file=sys.stderr)
        return REPORT_FAILED_EXIT_CODE
    print(f"wrote {storage.join(output_dir, contract.REPORT_FILE)} and {contract.ALERTS_FILE}: {len(alerts)} alert(s)")
    for alert in alerts:
        print(f"  ALERT {alert['name']} ({alert['basis']}): {alert['message']}", file=sys.stderr)
    return ALERT_EXIT_CODE if alerts and fail_on_alert else 0


def run(argv=None) -> int:
    args = parse_args(argv)
    return write_report(args.output, history_root=args.history, thresholds=args.threshold, model_dir=args.model,
                        fail_on_alert=args.fail_on_alert)
