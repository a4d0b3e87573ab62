"""Daemons of the test clusters, handled by pid only (read from their pid files), never by name."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from launch.process import pid_alive as alive


def read_pid(path: Path) -> int | None:
    """The pid in a daemon's pid file, or None when the file is missing or unreadable."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM, and SIGKILL when `pid` is still alive after `timeout_s`."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


    # A zombie child of ours still answers kill(0); the daemons are not our children (they double-fork).
    return True
