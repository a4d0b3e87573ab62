"""launch.merge: merged logits match the adapter model, baseline matches the base, bf16 rounding is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch import merge as merge_stage
from launch import train as train_stage
from launch.models import load_causal_lm
from launch.recipe import load_resolved
from launch.rundir import RunDir
from launch_helpers import build_tiny_llama, write_recipe, write_records


@pytest.fixture(scope="module")
def trained(tmp_path_factory, session_tmp):
    """Tiny NF4 runs (SSH and LoRA) trained hard enough that ΔW moves the logits."""
    model = session_tmp / "tiny-llama"
    if not (model / "config.json").is_file():
        build_tiny_llama(model)
    data = write_records(session_tmp / "tiny-data" / "alpaca.json")
    root = tmp_path_factory.mktemp("merge")
    runs = {}
    for method, lr in (("ssh", 0.3), ("lora", 0.05)):
        run = RunDir(root / method)
        recipe = write_recipe(root / f"{method}.yaml", model, data, run.root, method=method, quantize="nf4",
                              dtype="fp32", train={"learning_rate": lr, "max_steps": 4})
        assert train_stage.main([str(recipe)]) == 0
        runs[method] = run
    return runs


def _batch(run: RunDir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run.merged) if run.merged.is_dir() else str(load_resolved(run.root).model.path))
    return tok(["Name the colour of the sky.", "Add the numbers 2 and 3."], return_tensors="pt", padding=True)


def _adapter_and_base_logits(run: RunDir, batch):
    from peft import PeftModel

    import sspeft  # noqa: F401

    recipe = load_resolved(run.root)
    base = load_causal_lm(Path(recipe.model.path), recipe.model, zero3=False, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(run.adapter)).eval()
    with torch.no_grad():
        tuned = model(**batch).logits.float()
        with model.disable_adapter():
            plain = model(**batch).logits.float()
    return tuned, plain


@pytest.mark.parametrize("method", ["ssh", "lora"])
def test_merged_logits_match_the_adapter_model(trained, method, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained[method]
    assert merge_stage.main([str(run.root), "--dtype", "fp32"]) == 0
    assert "lost 0.00% of ΔW" in capsys.readouterr().out
    batch = _batch(run)
    tuned, plain = _adapter_and_base_logits(run, batch)
    merged = AutoModelForCausalLM.from_pretrained(str(run.merged), dtype=torch.float32).eval()
    with torch.no_grad():
        out = merged(**batch).logits.float()
    adapter_effect = (tuned - plain).abs().max().item()
    merge_error = (out - tuned).abs().max().item()
    assert adapter_effect > 1e-2, "training did not move the logits; the parity check would prove nothing"
    assert merge_error < 1e-3 and merge_error < adapter_effect / 100
    # a plain checkpoint: safetensors only, no quantization config, the run's template as chat template
    names = {p.name for p in run.merged.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    config = json.loads((run.merged / "config.json").read_text())
    assert "quantization_config" not in config
    assert AutoTokenizer.from_pretrained(str(run.merged)).chat_template == run.template.read_text()


def test_baseline_is_the_dequantized_base_without_delta(trained):
    from transformers import AutoModelForCausalLM

    run = trained["ssh"]
    assert merge_stage.main([str(run.root), "--no-adapter", "--dtype", "fp32"]) == 0
    baseline = RunDir(run.baseline)
    assert (baseline.merged / "config.json").is_file() and baseline.template.is_file()
    batch = _batch(run)
    _, plain = _adapter_and_base_logits(run, batch)
    model = AutoModelForCausalLM.from_pretrained(str(baseline.merged), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(**batch).logits.float()
    assert (out - plain).abs().max().item() < 1e-3
    report = json.loads((baseline.merged / merge_stage.REPORT_FILE).read_text())
    assert report["adapter"] is None and report["adapted_layers"] == 0


def test_bf16_merge_reports_rounding_loss(trained, capsys):
    run = trained["ssh"]
    assert merge_stage.main([str(run.root)]) == 0
    out = capsys.readouterr().out
    report = json.loads((run.merged / merge_stage.REPORT_FILE).read_text())
    assert report["dtype"] == "bf16" and 0 < report["delta_lost_to_rounding"] < 1
    assert f"{100 * report['delta_lost_to_rounding']:.2f}%" in out
    config = json.loads((run.merged / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_merge_without_trained_adapter_names_the_command(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert merge_stage.main([str(run.root)]) == 2
    assert "not a run directory made by launch.train" in capsys.readouterr().err
    run.root.mkdir()
    (run.recipe).write_text("name: x\n")
    assert merge_stage.main([str(run.root)]) == 2
    assert "python -m launch.train" in capsys.readouterr().err
    assert not run.merged.exists()
