"""Trainer callbacks: complete-marked checkpoints and their rotation, agreed preemption stop, step timing.

transformers' checkpoint save is not atomic: a kill while saving leaves a directory that looks whole. A checkpoint
is trusted only once COMPLETE is written into it, after every rank has finished writing its part. Old checkpoints
are removed here, only after the new one is marked (the Trainer's own rotation deletes them before the marker is
written, so a kill in between would leave no complete checkpoint): the newest complete checkpoint exists at
every instant.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from launch import distributed
from launch.rundir import COMPLETE_MARKER, RunDir, apply_umask, atomic_write_json, checkpoint_step

PROGRESS_FILE = "train_progress.json"
"""Written into each checkpoint before its marker: the step times and logs of every attempt up to that step."""


class CompleteMarker(TrainerCallback):
    """Marks each checkpoint complete after all ranks have saved it, then keeps the newest `keep` of them."""

    def __init__(self, run: RunDir, dist: distributed.Dist, keep: int | None, timer: StepTimer) -> None:
        self.run, self.dist, self.keep, self.timer = run, dist, keep, timer

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank's shard is on disk before the marker
        if self.dist.is_main:
            ckpt = self.run.checkpoints / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                apply_umask(ckpt)  # safetensors writes 0600 whatever the umask says
                atomic_write_json(ckpt / PROGRESS_FILE, {"attempts": self.timer.attempts()})
                atomic_write_json(ckpt / COMPLETE_MARKER, {"step": state.global_step, "time": time.time()})
                rotate_checkpoints(self.run, self.keep)
        distributed.barrier()
        return control


def rotate_checkpoints(run: RunDir, keep: int | None) -> list[Path]:
    """Remove complete checkpoints beyond the newest `keep` (None: keep all) and incomplete ones older than the
    newest complete one; returns what was removed. Never removes the newest complete checkpoint."""
    complete = run.complete_checkpoints()
    if not complete:
        return []
    newest = checkpoint_step(complete[-1])
    doomed = complete[:-keep] if keep and keep > 0 else []
    doomed += [p for p in run.checkpoints.glob("checkpoint-*")
               if p.is_dir() and p not in complete and checkpoint_step(p) < newest]
    for path in sorted(doomed, key=checkpoint_step):
        shutil.rmtree(path, ignore_errors=True)
    return doomed


class PreemptionStop(TrainerCallback):
    """On SIGTERM/SIGUSR1 on any rank: every rank stops after the same step and saves a checkpoint."""

    def __init__(self, flag: distributed.PreemptionFlag, dist: distributed.Dist) -> None:
        self.flag, self.dist = flag, dist
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        # one tiny all-reduce per optimizer step: all ranks see the same answer at the same step
        if distributed.any_rank(self.flag.set, self.dist.device):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step and the logged losses, for logs/train_summary.json.

    `previous` holds the attempts before a resume (from the checkpoint's train_progress.json), so the summary
    covers every step that led to the adapter, not only those of the last process.
    """

    def __init__(self, previous: list[dict] | None = None, first_step: int = 0, world_size: int = 1,
                 started: float | None = None) -> None:
        self.previous = list(previous or [])
        self.first_step, self.world_size = first_step, world_size
        self.started = time.time() if started is None else started
        self.step_times: list[float] = []
        self.losses: list[dict] = []
        self.positions_digests: list[str] | None = None  # filled after training, one per rank
        self.weights_digests: list[str] | None = None  # trained values, one per rank (not under ZeRO-3)
        self._start: float | None = None

    def attempts(self) -> list[dict]:
        """Every attempt so far, this one last."""
        current = {"first_step": self.first_step + 1, "last_step": self.first_step + len(self.step_times),
                   "world_size": self.world_size, "step_times_s": list(self.step_times), "log": list(self.losses),
                   "wall_s": time.time() - self.started}
        return self.previous + [current]

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.step_times.append(time.perf_counter() - self._start)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            entry = {"step": state.global_step}
            entry.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            self.losses.append(entry)
        return control


def drop_incomplete_checkpoints(run: RunDir) -> list[Path]:
    """Remove checkpoint directories without COMPLETE (a kill during saving); returns what was removed."""
    removed = []
    if run.checkpoints.is_dir():
        for path in run.checkpoints.glob("checkpoint-*"):
            if path.is_dir() and not (path / COMPLETE_MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def previous_attempts(checkpoint: Path | None) -> list[dict]:
    """The attempts recorded in a checkpoint (none for a fresh start or a checkpoint written before they were)."""
    if checkpoint is None:
        return []
    try:
        return json.loads((checkpoint / PROGRESS_FILE).read_text())["attempts"]
    except (OSError, ValueError, KeyError):
        return []
