"""Live progress of a long eval loop (judge calls, answer batches): counts of done, failed by reason and retried.

    with Progress(total=len(requests), what="judge calls") as progress:
        ...
        progress.update(failed=result.reason, retries=result.attempts - 1)   # once per finished item

On a terminal it is a tqdm bar with the counts beside it; otherwise (a log file, a Slurm job's output) one plain
line every `interval` seconds and a final one, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Optional, TextIO


class Progress:
    """Counts finished items and shows them; `failed` names the failure reason of an item (None: it succeeded)."""

    def __init__(self, total: int, what: str, stream: Optional[TextIO] = None, interval: float = 30.0,
                 terminal: Optional[bool] = None) -> None:
        self.total, self.what, self.interval = total, what, interval
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.retried = 0
        self.failed: Counter[str] = Counter()
        self.started = self._last = time.monotonic()
        if terminal is None:
            terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=what, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, failed: Optional[str] = None, retries: int = 0) -> None:
        self.done += n
        self.retried += max(retries, 0)
        if failed:
            self.failed[failed] += n
        if self._bar is not None:
            self._bar.set_postfix_str(self.counts(), refresh=False)
            self._bar.update(n)
        elif time.monotonic() - self._last >= self.interval:
            self._line()

    def counts(self) -> str:
        """'failed 3 (timeout 2, http_500 1), retried 4' (the part beside the done/total count)."""
        total = sum(self.failed.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.failed.most_common())
        return f"failed {total}" + (f" ({reasons})" if reasons else "") + f", retried {self.retried}"

    def _line(self) -> None:
        self._last = time.monotonic()
        elapsed = self._last - self.started
        print(f"{self.what}: {self.done}/{self.total} done, {self.counts()}, {elapsed:.0f} s", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
