"""The run directory: the one place that defines where every stage reads and writes.

    from launch.rundir import RunDir
    run = RunDir("runs/demo")
    run.adapter, run.merged, run.answers_file("tuned"), run.judgments_file("smollm2", "single")

Layout (documented in the README):
    recipe.yaml      the resolved recipe (absolute paths) that made this directory
    template.jinja   the chat template training used; merged/ carries it and evaluation generates through it
    params.json      trainable / total parameter counts
    adapter/         the final adapter (safetensors + JSON config, never base weights)
    checkpoints/     resumable training checkpoints; only those holding COMPLETE are used
    logs/            TensorBoard events and stage logs
    base/            the base converted to a transformers checkpoint (GGUF bases only)
    merged/          dequantized base + ΔW, a plain transformers checkpoint
    baseline/        itself a run directory: the same dequantized base without ΔW
    answers/         <model_id>.jsonl generated answers
    judgments/       <judge_id>_single.jsonl / <judge_id>_pair.jsonl
    report.md, report.json, report.png
    comparison/      baseline vs tuned report
    slurm/           job scripts and Slurm logs (a directory holding only slurm/ counts as fresh)

Every file is written under a temporary name and renamed, so a crash never leaves a half-written file that a
later stage would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

JudgmentKind = Literal["single", "pair"]


class RunDir:
    """Paths of one run directory; creating the object touches nothing on disk."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.recipe = self.root / "recipe.yaml"
        self.template = self.root / "template.jinja"
        self.params = self.root / "params.json"
        self.adapter = self.root / "adapter"
        self.checkpoints = self.root / "checkpoints"
        self.logs = self.root / "logs"
        self.base = self.root / "base"
        self.merged = self.root / "merged"
        self.baseline = self.root / "baseline"
        self.answers = self.root / "answers"
        self.judgments = self.root / "judgments"
        self.report_md = self.root / "report.md"
        self.report_json = self.root / "report.json"
        self.report_png = self.root / "report.png"
        self.comparison = self.root / "comparison"
        self.slurm = self.root / "slurm"

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def answers_file(self, model_id: str) -> Path:
        """answers/<model_id>.jsonl"""
        _check_id("model_id", model_id)
        return self.answers / f"{model_id}.jsonl"

    def judgments_file(self, judge_id: str, kind: JudgmentKind = "single") -> Path:
        """judgments/<judge_id>_<kind>.jsonl with kind 'single' or 'pair'."""
        _check_id("judge_id", judge_id)
        if kind not in ("single", "pair"):
            raise ValueError(f"judgments kind must be 'single' or 'pair', got {kind!r}")
        return self.judgments / f"{judge_id}_{kind}.jsonl"

    def baseline_run(self) -> RunDir:
        """baseline/ as a run directory of its own."""
        return RunDir(self.baseline)

    def is_fresh(self) -> bool:
        """True when the directory does not exist, is empty, or holds only slurm/."""
        if not self.root.exists():
            return True
        return all(p.name == "slurm" and p.is_dir() for p in self.root.iterdir())

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints marked complete, oldest first (by step number)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
        return sorted(found, key=_step_of)


COMPLETE_MARKER = "COMPLETE"
"""File written last into a checkpoint directory; a checkpoint without it is ignored (transformers' save is not
atomic, so a kill during saving leaves a directory that looks whole but is not)."""


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _check_id(field: str, value: str) -> None:
    # ids become file names: refuse separators so nothing escapes the run directory
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError(f"{field} must be a plain file-name component, got {value!r}")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text to path via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write obj as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on error it is removed.

    Used for outputs that are whole directories (adapter/, merged/, baseline/): readers see either the old
    directory or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
