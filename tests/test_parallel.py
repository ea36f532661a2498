"""Data parallelism on 8 forced CPU devices: runs ``tests/multidevice_cases.py``
in a pytest subprocess (JAX fixes its device count at start-up; the rest of
the suite runs on one device)."""

import os
import subprocess
import sys

from conftest import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multidevice_cases_pass_on_8_devices():
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rs", "tests/multidevice_cases.py"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
