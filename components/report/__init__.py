"""Report and alerts: one self-contained report.html (matplotlib PNGs inlined) and alerts.json.

`generate_report(output_dir, history_root=None, thresholds=None)` reads a finished run
(summary.json, MANIFEST.json, the Parquet tables, a trainer's metrics.json beside it),
earlier runs under a root of date partitions, checks the alert thresholds and writes both
files; it returns the alerts.  Entry points return ALERT_EXIT_CODE on alerts when asked to
(`--fail-on-alert`), so a scheduler marks the night red.
"""

from components.report.alerts import ALERT_NAMES, Thresholds, parse_overrides, threshold_names
from components.report.builder import generate_report
from components.report.run_data import RunDataError

ALERT_EXIT_CODE = 4  # distinct from 1 (failed), 2 (usage) and 3 (`tripletflow run`: every record of the wrong length)
# The run's outputs are there (published) but its report could not be written: distinct from
# 1 (the run failed, nothing published) and 2 (bad flags or paths), so a scheduler neither
# re-runs a good run nor blames its arguments.
REPORT_FAILED_EXIT_CODE = 5

__all__ = ["ALERT_EXIT_CODE", "ALERT_NAMES", "REPORT_FAILED_EXIT_CODE", "RunDataError", "Thresholds",
           "generate_report", "parse_overrides", "threshold_names"]
