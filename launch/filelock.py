"""An exclusive lock shared by processes, on a lock file of its own (fcntl.flock).

    with exclusive(folder / ".name.lock"):     # blocks until no other process holds it
        ...                                    # read what others wrote, then write

Lock a separate file, not the data itself when the data is replaced by an atomic rename: a lock on the old inode
would not exclude a writer of the new one. The kernel releases an flock when its holder dies in any way, so a killed
writer never leaves the lock held. The (empty) lock file stays: removing it while another process waits on it would
let two holders in at once. Users: the judgments file (eval.judging.engine), the shared dequantized base
(launch.export).
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold the exclusive cross-process lock on `lock_file` for the block (it and its folder are created)."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
