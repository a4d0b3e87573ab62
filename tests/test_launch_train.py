"""launch.train in one process on a tiny random LLaMA: every method × {fp32, bf16, nf4}, bad input, resume rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import train as train_stage
from launch.recipe import methods
from launch.rundir import RunDir
from launch_helpers import build_tiny_llama, write_recipe, write_records

METHODS = methods()
VARIANTS = {"fp32": ("none", "fp32"), "bf16": ("none", "bf16"), "nf4": ("nf4", "bf16")}
FAST = {("ssh", "nf4"), ("lora", "fp32")}


@pytest.fixture(scope="session")
def tiny_model(session_tmp) -> Path:
    path = session_tmp / "tiny-llama"
    if not (path / "config.json").is_file():
        build_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def tiny_data(session_tmp) -> Path:
    return write_records(session_tmp / "tiny-data" / "alpaca.json")


def run_train(recipe: Path, *overrides: str) -> int:
    return train_stage.main([str(recipe), *overrides])


def stored_numel(model_dir: Path) -> int:
    """Parameters of a checkpoint, read from its safetensors headers (no model built, no 4-bit packing)."""
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                total += torch.Size(f.get_slice(key).get_shape()).numel()
    return total


def adapter_tensors(run: RunDir) -> dict[str, torch.Tensor]:
    return load_file(str(run.adapter / "adapter_model.safetensors"))


def _matrix():
    for method in METHODS:
        for variant in VARIANTS:
            marks = () if (method, variant) in FAST else (pytest.mark.slow,)
            yield pytest.param(method, variant, marks=marks, id=f"{method}-{variant}")


@pytest.mark.parametrize("method, variant", list(_matrix()))
def test_method_trains(tmp_path, tiny_model, tiny_data, method, variant):
    quantize, dtype = VARIANTS[variant]
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data, run.root, method=method, quantize=quantize,
                          dtype=dtype)
    assert run_train(recipe, "train.max_steps=2") == 0
    tensors = adapter_tensors(run)
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    coeffs = {k: v for k, v in tensors.items() if "positions" not in k}
    assert all(v.dtype == torch.float32 for v in coeffs.values())  # adapters stay fp32 even on bf16/4-bit bases
    params = json.loads(run.params.read_text())
    # packed 4-bit weights count the values they stand for: the same total as the fp32 checkpoint on disk
    assert params["total"] == stored_numel(tiny_model) + params["trainable"]
    if method == "lora":
        assert params["trainable"] == sum(v.numel() for v in coeffs.values())
    else:
        per_position = 2 if method == "lfma" else 1
        assert params["trainable"] == 32 * per_position * 2 * 2  # n × reals × (q, v) × layers
        positions = {k: v for k, v in tensors.items() if "positions" in k}
        assert len(positions) == 4 and all(v.dtype == torch.int64 and v.shape == (2, 32) for v in positions.values())
    summary = json.loads((run.logs / train_stage.SUMMARY_FILE).read_text())
    losses = [e["loss"] for e in summary["log"] if "loss" in e]
    assert summary["global_step"] == 2 and losses and all(torch.isfinite(torch.tensor(losses)))
    if method in ("ssh", "waveft", "shira", "lora"):  # zero-initialised ΔW must have moved
        lora_b = [v for k, v in coeffs.items() if "lora_B" in k] if method == "lora" else list(coeffs.values())
        assert any(v.abs().max() > 0 for v in lora_b)
    assert (run.template).is_file() and (run.recipe).is_file()
    assert not (run.adapter / "training_args.bin").exists()  # adapter/ never needs unpickling


def test_rerun_of_finished_run_is_a_noop(tmp_path, tiny_model, tiny_data, capsys):
    run = RunDir(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data, run.root, method="shira")
    assert run_train(recipe, "train.max_steps=1") == 0
    before = (run.adapter / "adapter_model.safetensors").stat().st_mtime_ns
    assert run_train(recipe, "train.max_steps=1") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (run.adapter / "adapter_model.safetensors").stat().st_mtime_ns == before
    # a different recipe on the same run directory names the keys that differ
    assert run_train(recipe, "train.max_steps=1", "adapter.n=16", "train.learning_rate=0.5") == 2
    err = capsys.readouterr().err
    assert "adapter.n: 32 -> 16" in err and "train.learning_rate" in err


@pytest.mark.parametrize("case", ["missing-data", "empty-data", "missing-field", "bad-json", "unknown-method",
                                  "missing-base", "zero3-device-map", "missing-deepspeed", "prompt-too-long"])
def test_bad_input_fails_before_writing(tmp_path, tiny_model, tiny_data, capsys, case):
    run = RunDir(tmp_path / "run")
    data, overrides, needle = tiny_data, [], ""
    if case == "missing-data":
        data, needle = tmp_path / "nope.json", "does not exist"
    elif case == "empty-data":
        data, needle = tmp_path / "empty.json", "holds no records"
        data.write_text("[]")
    elif case == "missing-field":
        data, needle = tmp_path / "bad.jsonl", "record 1: field 'output' is missing or empty"
        data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n')
    elif case == "bad-json":
        data, needle = tmp_path / "bad.jsonl", "line 2 is not valid JSON"
        data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    elif case == "unknown-method":
        overrides, needle = ["adapter.method=dora"], "adapter.method = 'dora'"
    elif case == "missing-base":
        overrides, needle = [f"model.path={tmp_path / 'no-model'}"], "does not exist"
    elif case == "zero3-device-map":
        overrides, needle = ["train.deepspeed=launch/ds_zero3.json", "model.device_map=auto"], "device_map"
    elif case == "missing-deepspeed":
        overrides, needle = [f"train.deepspeed={tmp_path / 'ds.json'}"], "ds.json' does not exist"
    elif case == "prompt-too-long":
        overrides, needle = ["data.max_length=8"], "raise data.max_length"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, data, run.root)
    assert run_train(recipe, *overrides) == 2
    assert needle in capsys.readouterr().err
    assert run.is_fresh(), sorted(p.name for p in run.root.iterdir())


def test_trainable_parameters_are_upcast_to_fp32_unless_deepspeed_owns_them():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).bfloat16()
    model[1].weight.ds_id = 0  # a ZeRO-3 parameter: its dtype is the engine's
    model[2].requires_grad_(False)
    train_stage._keep_adapters_fp32(model)
    assert model[0].weight.dtype == model[0].bias.dtype == torch.float32
    assert model[1].weight.dtype == torch.bfloat16 and model[1].bias.dtype == torch.float32
    assert model[2].weight.dtype == torch.bfloat16
