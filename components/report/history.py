"""Earlier runs under a root of date partitions, read from their manifests and summaries.

Layout: `ROOT/date=YYYY-MM-DD/` holding a run's output (MANIFEST.json, summary.json), either
directly or one folder down; ROOT may be local or a bucket (gs://...).  A partition holding
files but no MANIFEST.json did not finish and is skipped (and listed as such); only runs
dated before the current one count as history.
"""

from __future__ import annotations

import dataclasses
import os
import re

from components import storage
from components.report import alerts as alerts_lib
from components.report.run_data import RunDataError, read_json, read_summary
from schemas import contract

PARTITION_PREFIX = "date="
DATE_PATTERN = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
ISO_DATE_LENGTH = len("YYYY-MM-DD")
MAX_RUN_DEPTH = 1  # a run's MANIFEST.json sits in the partition or at most this many folders below


@dataclasses.dataclass
class History:
    """Earlier runs' figures (oldest first, each with "date" and "output_dir"), and what was skipped."""

    runs: list[dict]
    skipped: list[str]  # "PATH: why" per partition left out


def partition_date(path: str) -> str | None:
    """The YYYY-MM-DD of the nearest `date=` folder in `path`, or None."""
    for part in reversed(path.replace(os.sep, "/").split("/")):
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


def _partitions(root: str) -> dict[str, list[str]]:
    """{partition folder: [its MANIFEST.json paths, shallowest first]} for every partition holding files.

    One listing of everything under ROOT/date=* (`**` crosses folders): on an object store
    each glob costs a listing of the whole prefix anyway.
    """
    partitions: dict[str, list[str]] = {}
    for path in storage.match(storage.join(root, PARTITION_PREFIX + "**")):
        relative = path[len(root) :].lstrip("/").split("/")
        if len(relative) < 2 or not DATE_PATTERN.match(relative[0]):
            continue
        manifests = partitions.setdefault(storage.join(root, relative[0]), [])
        if relative[-1] == contract.MANIFEST_FILE and len(relative) <= MAX_RUN_DEPTH + 2:
            manifests.append(path)
    for manifests in partitions.values():
        manifests.sort(key=lambda path: (path.count("/"), path))
    return partitions


def load_history(root: str, current_dir: str, current_date: str | None) -> History:
    """Finished runs under `root` dated before `current_date` (all other runs when it is None)."""
    root = root.rstrip("/") or "/"
    if storage.is_local(root) and not os.path.isdir(root):
        raise RunDataError(f"--history {root!r} is not a directory")
    runs, skipped = [], []
    for partition, manifests in sorted(_partitions(root).items()):
        date = DATE_PATTERN.match(partition.rstrip("/").split("/")[-1]).group(1)
        if current_date is not None and date >= current_date:
            continue
        if not manifests:
            skipped.append(f"{partition}: no {contract.MANIFEST_FILE} (run did not finish)")
            continue
        run_dir = manifests[0][: -len(contract.MANIFEST_FILE)].rstrip("/")  # the shallowest run
        if storage.same_location(run_dir, current_dir):
            continue
        try:
            summary = read_summary(run_dir, read_json(manifests[0]))
        except RunDataError as error:
            skipped.append(f"{partition}: {error}")
            continue
        runs.append({"date": date, "output_dir": run_dir, **alerts_lib.run_figures(summary, None)})
    return History(runs, skipped)
