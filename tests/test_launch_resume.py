"""Resume after kill -9 (newest complete checkpoint, same positions, same step count) and the preemption contract
(SIGTERM/SIGUSR1 → complete checkpoint, exit 75, rerun resumes)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launch.process import PREEMPTED_EXIT_CODE
from launch.rundir import COMPLETE_MARKER, RunDir
from launch.train import SUMMARY_FILE
from launch_helpers import PYTHON, REPO, child_env, read_positions, write_recipe

pytestmark = pytest.mark.slow


def start(recipe: Path, log: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "launch.train", str(recipe), *overrides], cwd=REPO, env=child_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out after {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"did not finish within {timeout}s:\n{log.read_text()[-4000:]}")


def complete(run: RunDir) -> list[Path]:
    return run.complete_checkpoints()


def test_kill_9_then_rerun_resumes_from_last_complete_checkpoint(tmp_path, tiny_llama):
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method="ssh", quantize="nf4", dtype="bf16",
                          train={"max_steps": 12, "save_steps": 2, "save_total_limit": 3})
    log = tmp_path / "first.log"
    proc = start(recipe, log)
    wait_for(lambda: len(complete(run)) >= 1, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = complete(run)
    assert done, log.read_text()[-3000:]
    last = done[-1]
    step = int(last.name.split("-")[1])
    assert step < 12
    saved_positions = read_positions(last)
    # a checkpoint directory without its marker (killed while saving) is never trusted
    fake = run.checkpoints / "checkpoint-11"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "adapter_model.safetensors").write_bytes(b"truncated")
    log2 = tmp_path / "second.log"
    proc2 = start(recipe, log2)
    assert finish(proc2, log2) == 0, log2.read_text()[-4000:]
    text = log2.read_text()
    assert f"resuming from {run.checkpoints}" in text and "removed incomplete checkpoint" in text
    summary = json.loads((run.logs / SUMMARY_FILE).read_text())
    assert summary["global_step"] == 12
    # every attempt's steps: the killed one up to its newest complete checkpoint, then the resumed one
    resumed = max(int(p.name.split("-")[1]) for p in done)
    spans = [(a["first_step"], a["last_step"], len(a["step_times_s"])) for a in summary["attempts"]]
    assert spans == [(1, resumed, resumed), (resumed + 1, 12, 12 - resumed)]
    assert len(summary["step_times_s"]) == 12
    final_positions = read_positions(run.adapter)
    assert saved_positions.keys() == final_positions.keys() and len(final_positions) == 4
    for key, value in saved_positions.items():
        assert torch.equal(value, final_positions[key]), key
    assert not fake.exists()


def test_sigterm_checkpoints_and_exits_75(tmp_path, tiny_llama):
    """(SIGUSR1 to one rank of two is tested in test_launch_deepspeed.py.)"""
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method="lora",
                          train={"max_steps": 30, "save_steps": 1000})
    log = tmp_path / "first.log"
    proc = start(recipe, log)
    wait_for(lambda: "'loss'" in log.read_text(), proc, log)  # training is under way
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == PREEMPTED_EXIT_CODE, log.read_text()[-4000:]
    done = complete(run)
    assert len(done) == 1, log.read_text()[-3000:]
    marker = json.loads((done[0] / COMPLETE_MARKER).read_text())
    assert 1 <= marker["step"] < 30 and done[0].name == f"checkpoint-{marker['step']}"
    assert not run.adapter.exists()  # the run is not finished
    assert "exiting with 75" in log.read_text()
    log2 = tmp_path / "second.log"
    proc2 = start(recipe, log2)
    assert finish(proc2, log2) == 0, log2.read_text()[-4000:]
    assert f"resuming from {done[0]}" in log2.read_text()
    assert json.loads((run.logs / SUMMARY_FILE).read_text())["global_step"] == 30


@pytest.mark.parametrize("method", ["ssh", "lfma"])
def test_resume_builds_the_adapter_from_the_checkpoint_choosing_nothing(tmp_path, tiny_llama, monkeypatch, method):
    """A rerun resumes from the checkpoint's own positions and coefficients: with every position / initial
    coefficient choice made to raise, the resumed run still trains, keeps the positions and ends at the last step."""
    from trl import SFTTrainer

    from launch import train as train_stage
    from sspeft import methods

    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method=method,
                          train={"max_steps": 4, "save_steps": 2})
    step = SFTTrainer.training_step

    def stop_after_the_checkpoint(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise RuntimeError("stopped after the first checkpoint")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", stop_after_the_checkpoint)
    with pytest.raises(RuntimeError, match="stopped after the first checkpoint"):
        train_stage.main([str(recipe)])
    monkeypatch.setattr(SFTTrainer, "training_step", step)
    (checkpoint,) = complete(run)
    saved = read_positions(checkpoint)
    assert saved

    def refuse(*_args, **_kwargs):
        raise AssertionError("a position or initial coefficient was chosen while resuming")

    for name in ("select_positions", "init_coefficients", "ssh_energy", "lfma_init_spectrum"):
        monkeypatch.setattr(methods, name, refuse)
    assert train_stage.main([str(recipe)]) == 0
    final = read_positions(run.adapter)
    assert final.keys() == saved.keys()
    assert all(torch.equal(final[k], saved[k]) for k in saved)
    summary = json.loads((run.logs / SUMMARY_FILE).read_text())
    assert summary["global_step"] == 4 and summary["attempts"][-1]["first_step"] == 3
