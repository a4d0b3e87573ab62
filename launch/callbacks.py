"""Trainer callbacks: complete-marked checkpoints, agreed preemption stop, step timing.

transformers' checkpoint save is not atomic: a kill while saving leaves a directory that looks whole. A checkpoint
is trusted only once COMPLETE is written into it, after every rank has finished writing its part.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from launch import distributed
from launch.rundir import COMPLETE_MARKER, RunDir, atomic_write_json


class CompleteMarker(TrainerCallback):
    """Marks each checkpoint complete after all ranks have saved it."""

    def __init__(self, run: RunDir, dist: distributed.Dist) -> None:
        self.run, self.dist = run, dist

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank's shard is on disk before the marker
        if self.dist.is_main:
            ckpt = self.run.checkpoints / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                atomic_write_json(ckpt / COMPLETE_MARKER, {"step": state.global_step, "time": time.time()})
        distributed.barrier()
        return control


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
    """Wall time of each optimizer step and the logged losses, for logs/train_summary.json."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.losses: list[dict] = []
        self.positions_digests: list[str] | None = None  # filled after training, one per rank
        self.weights_digests: list[str] | None = None  # trained values, one per rank (not under ZeRO-3)
        self._start: float | None = None

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
