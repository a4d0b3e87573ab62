"""What a stage process shares with whatever starts it (launchers, job scripts, servers, tests); standard library only,
so the Slurm renderer and eval import it without torch."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading

PREEMPTED_EXIT_CODE = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL): rerunning the same command resumes. The Slurm job
script is rendered with this value (slurm.render)."""


def free_port() -> int:
    """A TCP port nothing listens on right now on the loopback interface (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Terminated(KeyboardInterrupt):
    """SIGTERM, SIGHUP or SIGINT (timeout, kill, scancel, a closed terminal) raised in the main thread, so every
    `finally` and context manager runs: temporary outputs are removed, servers we started stop, stored results stay.
    A KeyboardInterrupt, so nothing that catches Exception swallows it and the paths that handle Ctrl-C handle it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
"""The signals `terminate_on_signals` turns into `Terminated` unless told otherwise."""


@contextlib.contextmanager
def terminate_on_signals(signals: tuple[signal.Signals, ...] = TERMINATING_SIGNALS):
    """Turn `signals` into `Terminated` for the length of the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def pid_alive(pid: int) -> bool:
    """A process `pid` exists on this host (signal 0 reaches it, or it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
