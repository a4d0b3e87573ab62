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
    .lock            held (flock) by the training process that owns the directory; it names pid, host and start

Every file is written under a temporary name and renamed, so a crash never leaves a half-written file that a
later stage would trust. Files and directories get the permissions the umask allows, as a plain open() would.
A non-empty directory without our recipe.yaml, a filesystem root and the home directory are never run directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

JudgmentKind = Literal["single", "pair"]
LOCK_FILE = ".lock"
MERGE_REPORT = "merge_report.json"
"""What launch.merge writes beside a merged checkpoint (its dtype choice, ΔW loss, logits probe, held-out loss)."""
TRAIN_OUTPUTS = ("recipe.yaml", "template.jinja", "params.json", "adapter", "checkpoints", "logs", "base",
                 ".adapter.saving")
"""What the training stage writes; a directory holding only these (plus slurm/), without a complete checkpoint
or a finished adapter, holds nothing worth keeping."""


class RunDirError(ValueError):
    """A path cannot serve as a run directory (not ours, a root, in use); the message says which and why."""


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
        self.lock = self.root / LOCK_FILE

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
        """True when the directory does not exist, is empty, or holds only slurm/ (and a lock file)."""
        if not self.root.exists():
            return True
        return all((p.name == "slurm" and p.is_dir()) or p.name == LOCK_FILE for p in self.root.iterdir())

    def check_usable(self) -> None:
        """Raise RunDirError unless the directory may be created or reused by launch.train: never a filesystem
        root, never the home directory, never an existing file, never a non-empty directory without recipe.yaml."""
        root = self.root
        if root.parent == root:
            raise RunDirError(f"run_dir = {str(root)!r} is a filesystem root; expected a directory of its own "
                              f"(e.g. runs/NAME)")
        if root == Path.home().resolve():
            raise RunDirError(f"run_dir = {str(root)!r} is the home directory; expected a directory of its own "
                              f"(e.g. ~/runs/NAME)")
        if root.exists() and not root.is_dir():
            raise RunDirError(f"run_dir = {str(root)!r} is a file, not a directory; expected a new or empty "
                              f"directory, or one made by launch.train")
        if not self.is_fresh() and not self.recipe.is_file():
            found = sorted(p.name for p in root.iterdir())
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise RunDirError(f"run_dir = {str(root)!r} already holds files ({shown}) but no recipe.yaml, so "
                              f"launch.train did not make it; it is never overwritten. Expected a new or empty "
                              f"directory, or a run directory made by launch.train")

    def holds_progress(self) -> bool:
        """True when something here is worth keeping: a complete checkpoint, a finished adapter, or any file
        that the training stage does not write (merged/, answers/, ...)."""
        if not self.root.is_dir():
            return False
        if self.complete_checkpoints() or self.adapter.exists():
            return True
        return any(p.name not in TRAIN_OUTPUTS + ("slurm", LOCK_FILE) for p in self.root.iterdir())

    def discard_train_outputs(self) -> None:
        """Remove what an attempt without a complete checkpoint wrote (slurm/ and the lock stay)."""
        for name in TRAIN_OUTPUTS:
            item = self.root / name
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            elif item.exists() or item.is_symlink():
                item.unlink()

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


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask can only set it, and setting
    it back and forth races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike[str]) -> None:
    """Give `root` and everything under it the permissions the umask allows (executables keep their x bits).

    Some writers ignore the umask (safetensors writes 0600, mkdtemp makes 0700); outputs that another account
    serves or reads (merged/, answers) must not stay private by accident."""
    mask = current_umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.lstat().st_mode
        full = 0o777 if path.is_dir() or mode & 0o111 else 0o666
        if mode & 0o777 != full & ~mask:
            path.chmod(full & ~mask)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text (UTF-8) to path via a temporary file in the same directory and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write data to path via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
    directory or the complete new one, with the permissions the umask allows whatever wrote the files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp made it 0700, safetensors writes 0600: whatever the umask says
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


class RunDirLock:
    """An exclusive lock on a run directory: an flock on `<run_dir>/.lock`, which holds who took it.

    The kernel drops an flock when its holder exits in any way (kill -9 included), so a stale file never blocks
    a rerun. The file is removed on release; a waiter that locked the removed file notices (its inode is no longer
    the one at the path) and locks the new file instead. flock works across hosts on NFSv4 and Lustre with
    `flock` mounts; on other network file systems it may lock only within one host.

        with RunDirLock(run.root):
            ...   # RunDirError naming the holder if another process has it
    """

    def __init__(self, root: str | os.PathLike[str], stage: str = "launch.train") -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.stage = stage
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirError(f"run_dir = {str(self.root)!r} is in use: {self.holder()} holds {self.path}. "
                                  f"Wait for it to finish or stop it; two training processes must not share "
                                  f"one run directory") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file after we opened it: lock the current one
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock, as the holder recorded it."""
        try:
            info = json.loads(self.path.read_text())
            return (f"{info.get('stage', 'a process')} (pid {info['pid']} on host {info['host']}, started "
                    f"{info['started']})")
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (it has not recorded its pid yet)"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
