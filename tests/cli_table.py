"""Helpers of the bad-input tables: run a command's main(argv) in-process, and hash a tree to prove nothing changed."""

from __future__ import annotations

import hashlib
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable


def snapshot(*roots: Path) -> dict[str, str]:
    """path → sha256 of every file ('dir' for folders) under the roots."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def run_main(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr + stdout) of main(argv); argparse's SystemExit gives its code."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(out):
            rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    return rc, err.getvalue() + out.getvalue()
