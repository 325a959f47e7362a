"""TensorFlow's C++ start-up log, kept to what the user asked for.

TensorFlow's shared libraries log from static initializers (oneDNN, the CUDA stub) before
absl's logging is initialised, so those lines ignore TF_CPP_MIN_LOG_LEVEL; on a machine
without CUDA the device probe then logs "failed call to cuInit" at ERROR. The entry points
import TensorFlow and probe its devices once, with file descriptor 2 captured, and replay
only the lines at or above the level: the user's TF_CPP_MIN_LOG_LEVEL if set, else
DEFAULT_MIN_LOG_LEVEL, where the cuInit failure of a machine without a CUDA driver (not an
error there) is dropped too. Anything else, tracebacks included, is replayed as written.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_MIN_LOG_LEVEL = 2  # errors and above (0 info, 1 warning, 2 error, 3 fatal)
# absl's line prefix: severity letter, MMDD, then time and thread.
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_ABSL_PREAMBLE = "All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_CUDA_DRIVER = "Could not find cuda drivers on your machine"
_CUINIT_FAILED = "failed call to cuInit"


def kept_lines(lines: list[str], level: int, user_level: bool) -> list[str]:
    """The captured start-up `lines` to show at `level`; `user_level`: the user set it."""
    no_driver = any(_NO_CUDA_DRIVER in line for line in lines)
    kept = []
    for line in lines:
        found = _ABSL_LINE.match(line)
        if found and _SEVERITY[found.group(1)] < level:
            continue
        if _ABSL_PREAMBLE in line and level > _SEVERITY["I"]:
            continue  # absl's notice about its own set-up, not a TensorFlow message
        if _CUINIT_FAILED in line and no_driver and not user_level:
            continue  # a machine without a CUDA driver: the probe is expected to fail
        kept.append(line)
    return kept


@contextlib.contextmanager
def filtered_startup():
    """Captures file descriptor 2 in the block and replays the kept lines (kept_lines) after it."""
    user_level = os.environ.get(LEVEL_ENV, "").strip()
    os.environ.setdefault(LEVEL_ENV, str(DEFAULT_MIN_LOG_LEVEL))  # later C++ lines honour it
    level = int(user_level) if user_level.isdigit() else DEFAULT_MIN_LOG_LEVEL
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(kept_lines(lines, level, bool(user_level))))
            sys.stderr.flush()


def start_tensorflow() -> None:
    """Imports TensorFlow and probes its devices, where CUDA logs (call it inside filtered_startup)."""
    import tensorflow as tf

    tf.config.list_physical_devices("GPU")
