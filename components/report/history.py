"""Earlier runs under a root of date partitions, read from their manifests and summaries.

Layout: `ROOT/date=YYYY-MM-DD/` holding a run's output (MANIFEST.json, summary.json), either
directly or one folder down.  A partition without MANIFEST.json did not finish and is
skipped (and listed as such); only runs dated before the current one count as history.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from components.report import alerts as alerts_lib
from components.report.run_data import RunDataError, read_json
from schemas import contract

PARTITION_PREFIX = "date="
DATE_PATTERN = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
ISO_DATE_LENGTH = len("YYYY-MM-DD")


@dataclasses.dataclass
class History:
    """Earlier runs' figures (oldest first, each with "date" and "output_dir"), and what was skipped."""

    runs: list[dict]
    skipped: list[str]  # "PATH: why" per partition left out


def partition_date(path: str) -> str | None:
    """The YYYY-MM-DD of the nearest `date=` folder in `path`, or None."""
    for part in reversed(os.path.normpath(os.path.abspath(path)).split(os.sep)):
        match = DATE_PATTERN.match(part)
        if match:
            return match.group(1)
    return None


def run_date(output_dir: str, manifest: dict) -> str | None:
    """A run's date: its partition folder's, else the day its manifest says it started."""
    date = partition_date(output_dir)
    if date is None and isinstance(manifest.get("start_time"), str):
        date = manifest["start_time"][:ISO_DATE_LENGTH]
    return date


def _run_dir(partition: str) -> str | None:
    if os.path.isfile(os.path.join(partition, contract.MANIFEST_FILE)):
        return partition
    nested = sorted(glob.glob(os.path.join(partition, "*", contract.MANIFEST_FILE)))
    return os.path.dirname(nested[-1]) if nested else None


def load_history(root: str, current_dir: str, current_date: str | None) -> History:
    """Finished runs under `root` dated before `current_date` (all other runs when it is None)."""
    if not os.path.isdir(root):
        raise RunDataError(f"--history {root!r} is not a directory")
    current = os.path.realpath(current_dir)
    runs, skipped = [], []
    for partition in sorted(glob.glob(os.path.join(root, PARTITION_PREFIX + "*"))):
        match = DATE_PATTERN.match(os.path.basename(partition))
        if not match or not os.path.isdir(partition):
            continue
        date = match.group(1)
        if current_date is not None and date >= current_date:
            continue
        run_dir = _run_dir(partition)
        if run_dir is None:
            skipped.append(f"{partition}: no {contract.MANIFEST_FILE} (run did not finish)")
            continue
        if os.path.realpath(run_dir) == current:
            continue
        try:
            read_json(os.path.join(run_dir, contract.MANIFEST_FILE))
            summary = read_json(os.path.join(run_dir, contract.SUMMARY_FILE))
        except RunDataError as error:
            skipped.append(f"{partition}: {error}")
            continue
        runs.append({"date": date, "output_dir": run_dir, **alerts_lib.run_figures(summary, None)})
    return History(runs, skipped)
