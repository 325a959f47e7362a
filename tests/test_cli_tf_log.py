"""TensorFlow's C++ start-up lines: hidden by default, shown as TF_CPP_MIN_LOG_LEVEL asks (pipelines/tf_log.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pipelines import tf_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_TAG = re.compile(r"^[IWEF]\d{4} .*? (\S+\.cc:\d+)\]", re.M)  # severity, date ... file.cc:line]

CAPTURED = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796278886.354646   20602 cudart_stub.cc:31] Could not find cuda drivers on your machine\n",
    "W0000 00:00:1796278886.354700   20602 some_kernel.cc:12] a warning\n",
    "E0000 00:00:1796278889.380817   20602 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n",
    "E0000 00:00:1796278889.380900   20602 other.cc:7] a real error\n",
    "Traceback (most recent call last):\n",
    "ImportError: boom\n",
]


def test_default_level_keeps_errors_but_not_a_cpu_machines_cuinit_failure():
    assert tf_log.kept_lines(CAPTURED, tf_log.DEFAULT_MIN_LOG_LEVEL, user_level=False) == CAPTURED[4:]


def test_a_level_the_user_set_is_followed_as_is():
    assert tf_log.kept_lines(CAPTURED, 0, user_level=True) == CAPTURED
    assert tf_log.kept_lines(CAPTURED, 1, user_level=True) == CAPTURED[2:]
    assert tf_log.kept_lines(CAPTURED, 2, user_level=True) == CAPTURED[3:]  # the cuInit line too: asked for errors
    assert tf_log.kept_lines(CAPTURED, 3, user_level=True) == CAPTURED[5:]


def test_a_gpu_machines_cuinit_failure_is_kept():
    with_driver = [line for line in CAPTURED if "cuda drivers" not in line]
    assert any("cuInit" in line for line in tf_log.kept_lines(with_driver, 2, user_level=False))


def _stderr(args, level):
    env = {k: v for k, v in os.environ.items() if k != tf_log.LEVEL_ENV}  # conftest sets it for the suite
    if level is not None:
        env[tf_log.LEVEL_ENV] = level
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


@pytest.fixture(scope="module")
def tensorflow_lines_at_info():
    """The file:line tags of the lines TensorFlow itself logs at start-up with everything shown."""
    code = "import tensorflow as tf; tf.config.list_physical_devices('GPU')"
    return set(ABSL_TAG.findall(_stderr(["-c", code], "0")))


def test_a_command_starts_tensorflow_quietly_by_default(tmp_path, tensorflow_lines_at_info):
    if not tensorflow_lines_at_info:
        pytest.skip("this TensorFlow logs nothing at start-up: nothing to hide")
    err = _stderr(["-m", "pipelines.cli", "generate", "--output", str(tmp_path / "in"), "--examples", "2"], None)
    assert ABSL_TAG.findall(err) == [] and "absl::InitializeLog" not in err, err


def test_a_command_shows_tensorflows_lines_when_the_user_asks(tmp_path, tensorflow_lines_at_info):
    err = _stderr(["-m", "pipelines.cli", "generate", "--output", str(tmp_path / "in"), "--examples", "2"], "0")
    assert tensorflow_lines_at_info <= set(ABSL_TAG.findall(err)), err
