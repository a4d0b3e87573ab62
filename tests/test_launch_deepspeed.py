"""Two ranks on CPU through the deepspeed launcher (gloo): ZeRO-2 and ZeRO-3 + NF4 for every spectral method,
the same positions on both ranks, a non-empty adapter, finite loss; SIGUSR1 to one rank stops both at one step.
Two ranks through torchrun without DeepSpeed: DDP synchronises them (identical trained weights). accelerate launch
with launch/accelerate_zero2.yaml runs ZeRO-2 and records that config in recipe.yaml. Only rank 0 takes the run
directory's lock, so every multi-rank run here also checks that ranks do not lock each other out."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from conftest import require
from sspeft import METHODS
from launch.process import PREEMPTED_EXIT_CODE, free_port
from launch.rundir import COMPLETE_MARKER, RunDir
from launch.train import SUMMARY_FILE
from launch_helpers import REPO, child_env, write_recipe
from test_launch_train import stored_numel

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).with_name("launch_ds_driver.py")


def deepspeed_cmd(*args: str) -> list[str]:
    exe = shutil.which("deepspeed", path=str(Path(__import__("sys").executable).parent))
    require("the deepspeed launcher", exe is not None)
    return [exe, "--num_gpus", "2", "--master_port", str(free_port()), *args]


def launch(cmd: list[str], log: Path, timeout: float = 900) -> int:
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            pytest.fail(f"deepspeed run timed out after {timeout}s:\n{log.read_text()[-6000:]}")


def check_run(run: RunDir, log: Path, method: str = "ssh", model: Path | None = None) -> dict:
    summary = json.loads((run.logs / SUMMARY_FILE).read_text())
    if model is not None:  # packed 4-bit and ZeRO-3-partitioned weights count what they stand for
        params = json.loads(run.params.read_text())
        assert params["total"] == stored_numel(model) + params["trainable"], params
    assert summary["world_size"] == 2, log.read_text()[-3000:]
    digests = summary["positions_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold the same positions
    losses = [e["loss"] for e in summary["log"] if "loss" in e]
    assert losses and all(abs(v) < 1e4 for v in losses)
    tensors = load_file(str(run.adapter / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # ZeRO-3 saves are gathered, never empty
    if method != "lora":
        positions = [t for k, t in tensors.items() if "positions" in k]
        assert len(positions) == 4 and all(p.shape == (2, 32) for p in positions)
    return summary


@pytest.mark.parametrize("stage, methods, quantize, dtype", [
    ("zero2", ("ssh", "lfma"), "none", "fp32"),
    ("zero3", ("lora", *METHODS), "nf4", "bf16"),
], ids=["zero2", "zero3-nf4"])
def test_two_ranks(tmp_path, tiny_llama, stage, methods, quantize, dtype, record_property):
    model, data = tiny_llama
    recipes, runs = [], {}
    for method in methods:
        run = RunDir(tmp_path / method)
        recipes.append(str(write_recipe(tmp_path / f"{method}.yaml", model, data, run.root, method=method,
                                        quantize=quantize, dtype=dtype,
                                        train={"deepspeed": str(REPO / f"launch/ds_{stage}.json"),
                                               "max_steps": 3})))
        runs[method] = run
    log = tmp_path / "deepspeed.log"
    code = launch(deepspeed_cmd(str(DRIVER), *recipes), log)
    assert code == 0, log.read_text()[-8000:]
    for method, run in runs.items():
        summary = check_run(run, log, method, model)
        record_property(f"{stage}-{method}-mean_step_s", summary["mean_step_s"])
        print(f"{stage} {method}: mean step {summary['mean_step_s']:.3f}s over {summary['step_times_s']}")


def test_torchrun_two_ranks_train_one_adapter_with_ddp(tmp_path, tiny_llama):
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method="lfma")
    exe = shutil.which("torchrun", path=str(Path(__import__("sys").executable).parent))
    require("the torchrun launcher", exe is not None)
    log = tmp_path / "torchrun.log"
    code = launch([exe, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "launch.train",
                   str(recipe)], log)
    text = log.read_text()
    assert code == 0, text[-8000:]
    summary = check_run(run, log, "lfma")
    # without DDP each rank would train on its own shard and end with different coefficients
    weights = summary["weights_digests"]
    assert len(weights) == 2 and weights[0] == weights[1], weights
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in text, text[-4000:]


def test_sigusr1_to_one_rank_stops_both_at_one_step(tmp_path, tiny_llama):
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method="ssh",
                          train={"deepspeed": str(REPO / "launch/ds_zero2.json"), "max_steps": 30,
                                 "save_steps": 1000})
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(deepspeed_cmd("--module", "launch.train", str(recipe)), cwd=REPO, env=child_env(),
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while "'loss'" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-6000:]
        assert time.monotonic() < deadline, log.read_text()[-6000:]
        time.sleep(0.1)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "launch.train" in " ".join(p.cmdline())]
    rank1 = [p for p in ranks if "--local_rank=1" in p.cmdline()]
    assert len(rank1) == 1, [p.cmdline() for p in ranks]
    rank1[0].send_signal(signal.SIGUSR1)  # only one rank is told; both must stop at the same step
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(log.read_text()[-6000:])
    text = log.read_text()
    assert code == PREEMPTED_EXIT_CODE, text[-6000:]
    done = run.complete_checkpoints()
    assert len(done) == 1, text[-4000:]
    step = json.loads((done[0] / COMPLETE_MARKER).read_text())["step"]
    assert 1 <= step < 30
    # both ranks wrote their ZeRO state for that same step
    states = list(done[0].glob("global_step*/*optim_states.pt"))
    assert len(states) == 2, sorted(p.name for p in done[0].rglob("*"))
    log2 = tmp_path / "second.log"
    assert launch(deepspeed_cmd("--module", "launch.train", str(recipe)), log2) == 0, log2.read_text()[-6000:]
    assert f"resuming from {done[0]}" in log2.read_text()
    summary = check_run(run, log2)
    assert summary["global_step"] == 30


def test_accelerate_launch_records_its_deepspeed_config(tmp_path, tiny_llama):
    model, data = tiny_llama
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, run.root, method="ssh", train={"max_steps": 2})
    exe = shutil.which("accelerate", path=str(Path(__import__("sys").executable).parent))
    require("the accelerate launcher", exe is not None)
    log = tmp_path / "accelerate.log"
    # the recipe says train.deepspeed: null; accelerate's config names launch/ds_zero2.json (relative to the cwd)
    code = launch([exe, "launch", "--config_file", "launch/accelerate_zero2.yaml", "--main_process_port",
                   str(free_port()), "-m", "launch.train", str(recipe)], log)
    assert code == 0, log.read_text()[-8000:]
    summary = check_run(run, log, "ssh", model)
    assert summary["zero_stage"] == 2
    assert yaml.safe_load(run.recipe.read_text())["train"]["deepspeed"] == str(REPO / "launch" / "ds_zero2.json")
