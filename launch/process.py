"""What a stage process shares with whatever starts it (launchers, job scripts, servers, tests); standard library only,
so the Slurm renderer and eval import it without torch."""

from __future__ import annotations

import socket

PREEMPTED_EXIT_CODE = 75
"""Exit status after a preemption checkpoint (EX_TEMPFAIL): rerunning the same command resumes. The Slurm job
script is rendered with this value (slurm.render)."""


def free_port() -> int:
    """A TCP port nothing listens on right now on the loopback interface (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
