"""Waiting on a run started as a subprocess, for tests that kill it at a chosen point."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_path(path: Path, process: subprocess.Popen, timeout: float) -> None:
    """Block until ``path`` exists.

    Raises:
        AssertionError: the process ended first (with the end of its stderr), or ``timeout``
            seconds passed (the process is killed).
    """
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
