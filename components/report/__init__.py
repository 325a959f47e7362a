"""Report and alerts: one self-contained report.html (matplotlib PNGs inlined) and alerts.json.

`generate_report(output_dir, history_root=None, thresholds=None)` reads a finished run
(summary.json, MANIFEST.json, the Parquet tables, a trainer's metrics.json beside it),
earlier runs under a root of date partitions, checks the alert thresholds and writes both
files; it returns the alerts.  Entry points exit with `ExitCode.ALERT` (pipelines/exit_codes.py)
on alerts when asked to (`--fail-on-alert`), so a scheduler marks the night red.
"""

from components.report.alerts import ALERT_NAMES, Thresholds, parse_overrides, threshold_names
from components.report.builder import generate_report
from components.report.run_data import RunDataError

__all__ = ["ALERT_NAMES", "RunDataError", "Thresholds", "generate_report", "parse_overrides", "threshold_names"]
