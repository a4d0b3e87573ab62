"""Console scripts: `sspeft-train`, `sspeft-merge`, `sspeft-generate`, `sspeft-judge`, `sspeft-audit`,
`sspeft-report`, `sspeft-submit` run the stages' `main()` (the same as `python -m launch.train` and the others).

The stages live in the top-level packages `launch`, `eval` and `slurm`, which import each other by those names
(and Slurm job scripts run `python -m launch.train` on the nodes). Another distribution that installs a package
of the same name into the environment would shadow one of them; each command checks first that the three come
from this installation and stops with a message naming the other file otherwise.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

APPS = ("launch", "eval", "slurm")
COMMANDS = {"train": "launch.train", "merge": "launch.merge", "generate": "eval.generate", "judge": "eval.judge",
            "audit": "eval.audit", "report": "eval.report", "submit": "slurm.submit"}


def check_apps() -> None:
    """Exit with status 2 when `launch`, `eval` or `slurm` is imported from outside this installation."""
    root = Path(__file__).resolve().parent
    for name in APPS:
        module = importlib.import_module(name)
        where = Path(getattr(module, "__file__", None) or "").resolve()
        if where.parent.parent != root:
            print(f"error: the package {name!r} is imported from {where}, not from sspeft's installation in {root}: "
                  f"another installed distribution provides a top-level {name!r}. Install sspeft into its own "
                  f"virtual environment", file=sys.stderr)
            raise SystemExit(2)


def _run(command: str) -> int:
    check_apps()
    module = importlib.import_module(COMMANDS[command])
    return module.main()


def train() -> int:
    return _run("train")


def merge() -> int:
    return _run("merge")


def generate() -> int:
    return _run("generate")


def judge() -> int:
    return _run("judge")


def audit() -> int:
    return _run("audit")


def report() -> int:
    return _run("report")


def submit() -> int:
    return _run("submit")
