"""launch.export: RUN_DIR/lora/ is an exact PEFT LoRA of the run's adapter, 4-bit runs of one base share one
dequantized base written once, the report's figures hold, and --max-error failures leave nothing behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

from launch import export as export_stage
from launch import train as train_stage
from launch.rundir import RunDir
from launch_helpers import build_tiny_llama, write_recipe, write_records


def train_runs(root, session_tmp, specs, model=None):
    """{name: RunDir} of tiny runs trained hard enough that ΔW moves the logits; specs: (name, method, quantize)."""
    model = model or session_tmp / "tiny-llama"
    if not (model / "config.json").is_file():
        build_tiny_llama(model)
    data = write_records(session_tmp / "tiny-data" / "alpaca.json")
    runs = {}
    for name, method, quantize in specs:
        run = RunDir(root / name)
        recipe = write_recipe(root / f"{name}.yaml", model, data, run.root, method=method, quantize=quantize,
                              dtype="fp32", train={"learning_rate": 0.3, "max_steps": 3})
        assert train_stage.main([str(recipe)]) == 0
        runs[name] = run
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, session_tmp):
    root = tmp_path_factory.mktemp("export")
    return train_runs(root, session_tmp, [("ssh-nf4", "ssh", "nf4"), ("waveft-nf4", "waveft", "nf4"),
                                          ("fourierft", "fourierft", "none")])


def _runtime_and_lora_logits(run: RunDir, x: torch.Tensor):
    """Independently of launch.export: the runtime adapter on the training base, and PEFT's LoRA on its base."""
    from peft import PeftModel

    from launch.merge import load_trained
    from launch.models import load_causal_lm
    from launch.recipe import load_resolved

    _, _, model = load_trained(run, with_adapter=True)
    with torch.no_grad():
        runtime = model(x).logits
        with model.disable_adapter():
            plain = model(x).logits
    config = json.loads((run.root / "lora" / "adapter_config.json").read_text())
    recipe = load_resolved(run.root)
    base = load_causal_lm(config["base_model_name_or_path"], recipe.model.__class__(
        path=config["base_model_name_or_path"], quantize="none", dtype="fp32"), zero3=False, device_map={"": "cpu"})
    lora = PeftModel.from_pretrained(base, str(run.root / "lora")).eval()
    with torch.no_grad():
        return runtime, plain, lora(x).logits


def test_nf4_runs_share_one_base_and_export_exactly(runs, capsys):
    cache = runs["ssh-nf4"].root.parent / "lora_bases"
    for name in ("ssh-nf4", "waveft-nf4"):
        assert export_stage.main([str(runs[name].root), "--to", "lora", "--max-error", "1e-5"]) == 0
        assert "wrote a rank-" in capsys.readouterr().out
    bases = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(bases) == 1 and bases[0].name.startswith("nf4-fp32-")
    written_at = (bases[0] / "config.json").stat().st_mtime_ns
    for name in ("ssh-nf4", "waveft-nf4"):
        run = runs[name]
        link = run.baseline / "merged"
        assert link.is_symlink() and link.resolve() == bases[0].resolve()
        config = json.loads((run.root / "lora" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(bases[0])
        report = json.loads((run.root / "lora" / export_stage.REPORT_FILE).read_text())
        assert report["r"] == config["r"] and report["truncated_layers"] == 0
        assert all(layer["measured_error"] < 1e-5 for layer in report["layers"].values())
        assert report["probe"]["shift_cosine"] > 0.9999 and report["probe"]["shift_relative_residual"] < 1e-3
        x = torch.tensor([[1, 5, 9, 13, 40, 77, 120, 200]])
        runtime, plain, served = _runtime_and_lora_logits(run, x)
        shift = (runtime - plain).abs().max()
        assert shift > 1e-2, "training did not move the logits; the parity check would prove nothing"
        assert (served - runtime).abs().max() < 1e-3 * max(1.0, float(shift))
    # a second export of a run reuses the shared base: nothing is merged again
    assert export_stage.main([str(runs["ssh-nf4"].root), "--to", "lora"]) == 0
    assert (bases[0] / "config.json").stat().st_mtime_ns == written_at
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


def test_plain_run_points_at_its_recipe_base(runs, session_tmp):
    run = runs["fourierft"]
    assert export_stage.main([str(run.root), "--to", "lora"]) == 0
    config = json.loads((run.root / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((session_tmp / "tiny-llama").resolve())
    assert not (run.baseline / "merged").exists()
    report = json.loads((run.root / "lora" / export_stage.REPORT_FILE).read_text())
    assert report["shared_base"] is False and report["probe"]["max_abs_logit_difference"] < 1e-3


def test_max_error_failure_leaves_nothing(runs, tmp_path, capsys):
    run = runs["waveft-nf4"]
    cache = tmp_path / "cache"
    before = sorted(os.listdir(run.root))
    rc = export_stage.main([str(run.root), "--to", "lora", "--max-rank", "1", "--max-error", "1e-3",
                            "--base-cache", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-error" in err and "exact rank" in err
    assert sorted(os.listdir(run.root)) == before and not cache.exists()


@pytest.mark.parametrize("args,message", [
    (["--to", "gguf"], "--to is 'gguf'"),
    (["--max-rank", "0"], "--max-rank is 0"),
    (["--max-rank", "1000"], "--max-rank is 1000"),
    (["--max-error", "-1"], "--max-error is -1"),
])
def test_bad_flags_are_refused_before_loading(runs, args, message, capsys):
    assert export_stage.main([str(runs["fourierft"].root), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_adapter_is_refused(tmp_path, capsys):
    assert export_stage.main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
