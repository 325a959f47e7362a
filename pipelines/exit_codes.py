"""Exit codes of every `tripletflow` command: one enum, so a scheduler can tell the cases apart."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the run failed (or a date of `nightly` did): nothing was published; retrying may help
    USAGE = 2  # bad flags, inputs or paths, or not a finished run: found before any work; retrying won't help
    ALL_WRONG_LENGTH = 3  # `run`: outputs published, but no good record and some of the wrong length (--grid/--dim?)
    ALERT = 4  # the report raised alerts and --fail-on-alert was given
    REPORT_FAILED = 5  # the run is published but its report could not be written: neither re-run nor blame the flags
