"""A lock shared by every process that writes one results file (judgments), so no writer drops another's rows.

    with file_lock(path):          # blocks until no other process holds it
        rows = read(path) | mine   # re-read what others wrote, then rewrite or append
        write(path, rows)

The lock is fcntl.flock on `<path>.lock` beside the file (not the file itself, which an atomic rewrite replaces by
rename: a lock on the old inode would not exclude a writer of the new one). flock is released by the kernel when
its holder dies, so a killed writer never leaves the file locked. The empty lock file stays: removing it while
another process waits on it would let two writers in at once.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


def lock_path(path: Path) -> Path:
    """The lock file of `path`: `<path>.lock` in the same folder."""
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive cross-process lock of `path` for the block (the folder is created if needed)."""
    lock = lock_path(Path(path))
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
