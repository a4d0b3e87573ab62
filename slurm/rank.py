"""Run one training rank and record how it ended, for the batch script that decides whether to requeue.

    torchrun ... -m slurm.rank STATUS_DIR -- python -m launch.train RECIPE.yaml

torchrun reports any failed worker as exit status 1, so the training stage's preemption code (75: "checkpointed,
run me again") would not reach the batch script through it. This wrapper starts the command, forwards every
signal torchrun forwards to it, and writes STATUS_DIR/rank-<RANK>.exit holding the command's exit status (128+N
when a signal N ended it) before exiting with that same status. STATUS_DIR/rank-<RANK>.node, written at start,
names the host the rank runs on (its hostname), so a multi-node attempt shows which node each rank had.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from launch.rundir import atomic_write_text

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def exit_status(returncode: int) -> int:
    """Shell convention: a child killed by signal N ends with 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def write_status(status_dir: Path, rank: str, status: int) -> Path:
    return atomic_write_text(status_dir / f"rank-{rank}.exit", f"{status}\n")


def write_node(status_dir: Path, rank: str) -> Path:
    return atomic_write_text(status_dir / f"rank-{rank}.node", f"{socket.gethostname()}\n")


def run(status_dir: Path, command: list[str]) -> int:
    write_node(status_dir, os.environ.get("RANK", "0"))
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        # The child decides what a signal means (the training stage checkpoints and exits 75).
        if child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    status = exit_status(child.wait())
    write_status(status_dir, os.environ.get("RANK", "0"), status)
    return status


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m slurm.rank STATUS_DIR -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    return run(Path(args[0]), args[2:])


if __name__ == "__main__":
    sys.exit(main())
