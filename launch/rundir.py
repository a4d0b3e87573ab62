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
    .run.json        the marker launch.train writes when it claims the directory: what makes a directory a run (a
                     recipe.yaml alone never does), which training outputs each attempt created (the only things a
                     failed attempt removes), and the fingerprint of the data, base and DeepSpeed config trained on

Every file is written under a temporary name and renamed, so a crash never leaves a half-written file that a
later stage would trust. Files and directories get the permissions the umask allows, as a plain open() would.
A non-empty directory without our marker, a filesystem root and the home directory are never run directories.
Temporary outputs are named after their writer (`.merged.HOST-PID.XXXX.tmp`): a signal removes them, and a writer
whose process is gone leaves one that the next atomic_directory() on that path clears.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from launch.process import Terminated, pid_alive, terminate_on_signals

log = logging.getLogger("launch.rundir")
JudgmentKind = Literal["single", "pair"]
LOCK_FILE = ".lock"
RUN_MARKER = ".run.json"
"""Written by launch.train when it claims a directory (see the module docstring); never by anything else."""
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
        self.marker = self.root / RUN_MARKER

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

    def read_marker(self) -> dict[str, Any] | None:
        """The marker launch.train wrote (None when there is none); an unreadable one is a RunDirError."""
        if not self.marker.is_file():
            return None
        try:
            info = json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RunDirError(f"{self.marker} is not readable JSON ({e}); it marks {self.root} as a run directory "
                              f"made by launch.train. Use another run_dir") from e
        if not isinstance(info, dict) or not isinstance(info.get("outputs", {}), dict):
            raise RunDirError(f"{self.marker} does not hold launch.train's marker (a JSON object with 'outputs'); "
                              f"use another run_dir")
        return info

    def write_marker(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.marker, info)

    def check_usable(self) -> None:
        """Raise RunDirError unless the directory may be created or reused by launch.train: never a filesystem
        root, never the home directory, never an existing file, never a non-empty directory without launch.train's
        marker (a recipe.yaml alone, such as the user's own with `run_dir: .`, does not make a directory a run)."""
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
        if not self.is_fresh() and self.read_marker() is None:
            found = sorted(p.name for p in root.iterdir())
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise RunDirError(f"run_dir = {str(root)!r} already holds files ({shown}) but no {RUN_MARKER} marker, "
                              f"so launch.train did not make it; it is never overwritten. Expected a new or empty "
                              f"directory, or a run directory made by launch.train")

    def holds_progress(self) -> bool:
        """True when something here is worth keeping: a complete checkpoint, a finished adapter, or any file
        that the training stage does not write (merged/, answers/, ...)."""
        if not self.root.is_dir():
            return False
        if self.complete_checkpoints() or self.adapter.exists():
            return True
        return any(p.name not in TRAIN_OUTPUTS + ("slurm", LOCK_FILE, RUN_MARKER) for p in self.root.iterdir())

    def discard_recorded_outputs(self) -> list[str]:
        """Remove the training outputs the marker records as created by earlier attempts (of a recipe that never
        completed a checkpoint here); anything the marker does not list stays. Returns the names removed."""
        info = self.read_marker() or {"outputs": {}}
        removed = [name for name in info["outputs"] if _remove(self.root / name)]
        info["outputs"] = {}
        self.write_marker(info)
        return removed

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints marked complete, oldest first (by step number)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
        return sorted(found, key=checkpoint_step)

    def resumable_checkpoint(self) -> tuple[Path | None, list[str]]:
        """The newest complete checkpoint that passes `checkpoint_problem`, and a line per newer one passed over
        (naming the file and what is wrong with it)."""
        skipped = []
        for path in reversed(self.complete_checkpoints()):
            problem = checkpoint_problem(path)
            if problem is None:
                return path, skipped
            skipped.append(problem)
        return None, skipped


COMPLETE_MARKER = "COMPLETE"
"""File written last into a checkpoint directory; a checkpoint without it is ignored (transformers' save is not
atomic, so a kill during saving leaves a directory that looks whole but is not)."""


class Attempt:
    """One training attempt's claim on a run directory: it marks the directory as a run and records, before
    writing anything, the training outputs it may create (those not there yet). `undo()` removes exactly those, so a
    failed or stopped first start leaves the directory as it was found, whatever else the directory holds (a user's
    own recipe.yaml, merged/ and answers/ of earlier work). The record lives in the marker, so it survives a kill."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.id = f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
        self.created: list[str] = []
        self.found: dict[str, Any] | None = None  # the marker as this attempt found it

    def claim(self, fingerprint: dict[str, Any] | None = None) -> None:
        """Record what this attempt may create (and the fingerprint of what it trains on, if the directory has
        none), before it creates any of it."""
        run = self.run
        run.root.mkdir(parents=True, exist_ok=True)
        self.found = run.read_marker()
        info = json.loads(json.dumps(self.found)) if self.found else {
            "made_by": "launch.train", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "outputs": {}}
        self.created = [n for n in TRAIN_OUTPUTS if not (run.root / n).exists() and not (run.root / n).is_symlink()]
        info["outputs"].update(dict.fromkeys(self.created, self.id))
        if fingerprint is not None and not run.complete_checkpoints():
            info["fingerprint"] = fingerprint
        run.write_marker(info)

    def undo(self) -> list[str]:
        """Remove what this attempt created and put the marker back as it was found (none: removed)."""
        run = self.run
        removed = [name for name in self.created if _remove(run.root / name)]
        if self.found is None:
            run.marker.unlink(missing_ok=True)
        else:
            run.write_marker(self.found)
        return removed


def _remove(item: Path) -> bool:
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item)
    elif item.exists() or item.is_symlink():
        item.unlink()
    else:
        return False
    return True


CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json")
"""JSON files a resumable checkpoint must hold, parseable (the adapter weights and optimizer state are checked too)."""


def checkpoint_problem(path: Path) -> str | None:
    """What makes checkpoint `path` unusable for resuming (a missing, truncated or unparseable file, named), or None.

    Checked before a checkpoint is chosen, so a damaged newest checkpoint falls back to the previous one instead of
    failing inside the trainer."""
    for name in CHECKPOINT_FILES:
        file = path / name
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{file} is missing"
        except (OSError, ValueError) as e:
            return f"{file} is not readable JSON ({type(e).__name__}: {e})"
        if not isinstance(data, dict) or (name == "trainer_state.json" and not isinstance(data.get("global_step"),
                                                                                          int)):
            return f"{file} does not hold the expected JSON object" + (
                " with an integer global_step" if name == "trainer_state.json" else "")
    weights = path / "adapter_model.safetensors"
    problem = safetensors_problem(weights)
    if problem:
        return problem
    if not (path / "optimizer.pt").is_file() and not any(path.glob("global_step*")):
        return f"{path / 'optimizer.pt'} is missing (no optimizer state to resume)"
    return None


def safetensors_problem(file: Path) -> str | None:
    """Whether a safetensors file is present and whole: its header parses and the file holds every byte the header
    promises (a truncated copy fails here, without loading any tensor)."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or 8 + length > size:
                return f"{file} is truncated ({size} bytes, header incomplete)"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return f"{file} is missing"
    except (OSError, ValueError) as e:
        return f"{file} is not a readable safetensors file ({type(e).__name__}: {e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if 8 + length + max(ends, default=0) > size:
        return f"{file} is truncated ({size} bytes, its header promises {8 + length + max(ends)})"
    return None


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint directory (`checkpoint-<step>`) holds; -1 for a name without one."""
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
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary file beside `path` (named `.<name>.<random>.tmp`, so a writer that picks a format
    from the suffix must be told it) for a writer that takes a path (torch.save, savefig); on success it is synced
    and replaces `path`, on error it is removed. Its mode is what the umask allows, as for any new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask says
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    for stale in clear_stale_temporaries(path):
        log.warning("removed %s: a temporary output left by a process that no longer runs", stale)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{owner}.", suffix=".tmp", dir=path.parent))
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


def clear_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary directories atomic_directory(path) left behind when its process was killed outright
    (`.NAME.HOST-PID.XXXX.tmp` whose PID no longer runs on this host); those of live or other hosts' processes stay."""
    removed = []
    host = socket.gethostname()
    for candidate in path.parent.glob(f".{path.name}.{host}-*.tmp"):
        pid = candidate.name[len(f".{path.name}.{host}-"):].split(".", 1)[0]
        if candidate.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed




def check_writable(directory: Path, what: str) -> None:
    """Raise OutputError unless a file can be created in `directory` (or, while it does not exist, in its nearest
    existing parent; nothing is created): a read-only file system or a missing permission is found before any work,
    not after it."""
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what}: cannot write into {directory}: {describe_os_error(e)}") from e


def check_free_space(directory: Path, need: int, what: str) -> None:
    """Raise OutputError unless `directory`'s file system has `need` bytes free (plus 1 % and 16 MiB of margin)."""
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    want = int(need * 1.01) + 16 * 1024**2
    if free < want:
        raise OutputError(f"{what} needs about {_size(want)} in {directory}, but its file system has {_size(free)} "
                          f"free; free some space or write elsewhere")


def _size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def describe_os_error(e: OSError) -> str:
    """An OSError as one line: what failed (errno name and text) and the file, without a traceback."""
    name = errno.errorcode.get(e.errno or 0, "")
    where = f" ({e.filename})" if e.filename else ""
    advice = {errno.ENOSPC: "; the file system is full: free some space",
              errno.EROFS: "; the file system is read-only: write elsewhere",
              errno.EDQUOT: "; the disk quota is exhausted"}.get(e.errno or 0, "")
    return f"{name or 'OSError'}: {e.strerror or e}{where}{advice}"


class OutputError(RuntimeError):
    """An output cannot be written (no space, read-only file system, no permission); the message says where."""


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


def run_writing_stage(stage: str, work: Callable[[], Any],
                      errors: tuple[type[BaseException], ...]) -> tuple[int, Any]:
    """Run a stage that writes one output atomically, mapping how it ended to (exit status, result): 0 and the work's
    result; 2 for `errors` (the message is the error's) and for OS errors (ENOSPC, EROFS, … described); 128+N when
    a signal stopped it (its temporary output is removed by the atomic writer). Messages go to stderr."""
    try:
        with terminate_on_signals():
            return 0, work()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except OSError as e:
        print(f"error: {stage} could not write its output: {describe_os_error(e)}; nothing was kept", file=sys.stderr)
        return 2, None
    except Terminated as e:
        print(f"{stage} stopped by {e}; its temporary output was removed, nothing was kept", file=sys.stderr)
        return e.exit_status, None
