"""launch.merge: merged logits match the adapter model, baseline matches the base, the output dtype keeps ΔW (a
table of methods × bases × dtype choices, figures recomputed from the saved safetensors), lossy merges refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from launch import merge as merge_stage
from launch import train as train_stage
from launch.models import load_causal_lm, torch_dtype
from launch.recipe import load_resolved
from launch.rundir import RunDir
from launch_helpers import build_tiny_llama, write_recipe, write_records

# (method, base quantization, strength): "strong" runs move W0 by far more than a bf16 ulp, the "weak" one by less
RUNS = {("ssh", "nf4", "strong"): 0.3, ("lora", "nf4", "strong"): 0.3, ("ssh", "none", "strong"): 0.3,
        ("lora", "none", "strong"): 0.3, ("ssh", "nf4", "weak"): 0.002}


def _train(root: Path, model: Path, data: Path, method: str, quantize: str, lr: float) -> RunDir:
    run = RunDir(root / f"{method}-{quantize}-{lr}")
    recipe = write_recipe(root / f"{run.root.name}.yaml", model, data, run.root, method=method, quantize=quantize,
                          dtype="fp32", train={"learning_rate": lr, "max_steps": 4 if lr > 0.01 else 2})
    values = yaml.safe_load(recipe.read_text())
    values["data"]["eval_fraction"] = 0.25  # a held-out split for the held-out response loss
    recipe.write_text(yaml.safe_dump(values, sort_keys=False))
    assert train_stage.main([str(recipe)]) == 0
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, session_tmp):
    """Tiny runs, each with its fp32 merge's adapted weights kept as the reference W0 + ΔW."""
    model = session_tmp / "tiny-llama"
    if not (model / "config.json").is_file():
        build_tiny_llama(model)
    data = write_records(session_tmp / "tiny-data" / "alpaca.json")
    root = tmp_path_factory.mktemp("merge")
    runs = {}
    for (method, quantize, strength), lr in RUNS.items():
        run = _train(root, model, data, method, quantize, lr)
        merge_stage.merge(run.root, "fp32")
        runs[method, quantize, strength] = (run, _adapted_weights(run.merged), _independent_w0(run))
    return runs


def _adapted_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    return {k.removesuffix(".weight"): v for k, v in tensors.items() if k.endswith(("q_proj.weight", "v_proj.weight"))}


def _independent_w0(run: RunDir) -> dict[str, torch.Tensor]:
    """W0 straight from the base files (fp32) or bitsandbytes' own dequantization of the NF4 base."""
    import bitsandbytes as bnb

    recipe = load_resolved(run.root)
    if recipe.model.quantize == "none":
        return _adapted_weights(Path(recipe.model.path))
    model = load_causal_lm(Path(recipe.model.path), recipe.model, zero3=False, device_map={"": "cpu"})
    out = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            w = module.weight
            out[name] = bnb.functional.dequantize_4bit(w.data, w.quant_state).float().reshape(module.out_features, -1)
    return out


def _loss_from_files(written: dict, w0: dict, reference: dict, dtype: torch.dtype) -> dict[str, float]:
    """||(round(W0 + ΔW) − round(W0)) − ΔW|| / ||ΔW|| per layer, with ΔW = fp32 merge − W0, from the files."""
    out = {}
    for name, w in written.items():
        delta = reference[name] - w0[name]
        lost = w.float() - w0[name].to(dtype).float() - delta
        out[name] = float(lost.norm() / delta.norm())
    return out


CASES = [(m, q, d) for m in ("ssh", "lora") for q in ("none", "nf4") for d in ("auto", "bf16", "fp32")]


@pytest.mark.parametrize("method,quantize,requested", CASES)
def test_dtype_table(trained, method, quantize, requested):
    run, reference, w0 = trained[method, quantize, "strong"]
    merge_stage.merge(run.root, requested)
    report = json.loads((run.merged / merge_stage.REPORT_FILE).read_text())
    expected = "bf16" if requested == "auto" else requested  # strong runs survive bf16 rounding
    assert report["dtype"] == expected and report["lossy"] is False
    written = _adapted_weights(run.merged)
    assert {t.dtype for t in written.values()} == {torch_dtype(expected)}
    config = json.loads((run.merged / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(torch_dtype(expected)).removeprefix("torch.")
    # the loss figure, recomputed from the safetensors on disk against an independently dequantized W0
    from_files = _loss_from_files(written, w0, reference, torch_dtype(expected))
    assert set(from_files) == set(report["delta_loss_per_layer"])
    for name, value in from_files.items():
        assert report["delta_loss_per_layer"][name][expected] == pytest.approx(value, rel=0.02, abs=1e-5)
    assert report["delta_lost_worst_layer"] == pytest.approx(max(from_files.values()), rel=0.02, abs=1e-5)
    assert 0 < report["delta_loss"]["bf16"]["worst"] <= merge_stage.DEFAULT_MAX_DELTA_LOSS
    probe = report["probe"]
    assert probe["passed"] and probe["adapter_effect_max_abs"] > 0.1  # the adapter visibly moves the logits
    assert probe["cosine"] >= (0.9999 if expected == "fp32" else 0.999)
    assert probe["residual"] <= (1e-4 if expected == "fp32" else 0.05)
    assert probe["max_abs_logit_diff"] < (1e-4 if expected == "fp32" else 0.05)
    assert len(probe["records"]) == merge_stage.PROBE_RECORDS


def test_small_delta_erased_by_bf16_makes_auto_pick_fp32(trained):
    run, reference, w0 = trained["ssh", "nf4", "weak"]
    out = merge_stage.merge(run.root)  # auto
    report = json.loads((out / merge_stage.REPORT_FILE).read_text())
    assert report["dtype"] == "fp32" and report["dtype_requested"] == "auto" and not report["lossy"]
    bf16_lost = _loss_from_files({k: v.to(torch.bfloat16) for k, v in reference.items()}, w0, reference,
                                 torch.bfloat16)
    assert max(bf16_lost.values()) > 0.05  # bf16 would erase a visible share of ΔW ...
    assert report["delta_loss"]["bf16"]["worst"] == pytest.approx(max(bf16_lost.values()), rel=0.02)
    assert report["delta_lost_worst_layer"] < 1e-4  # ... fp32 keeps it
    assert report["probe"]["passed"] and report["probe"]["residual"] < 1e-3
    # the baseline follows the merged dtype, so before/after are rounded alike
    base_out = merge_stage.merge(run.root, with_adapter=False)
    base_report = json.loads((base_out / merge_stage.REPORT_FILE).read_text())
    assert base_report["dtype"] == "fp32" and "merged" in base_report["dtype_reason"]
    assert base_report["probe"]["max_abs_logit_diff"] < 1e-4


def test_explicit_lossy_dtype_fails_and_leaves_nothing(trained, capsys):
    run, _, _ = trained["ssh", "nf4", "weak"]
    shutil.rmtree(run.merged, ignore_errors=True)
    assert merge_stage.main([str(run.root), "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "--dtype bf16 loses" in err and "use --dtype fp32" in err and "--allow-lossy" in err
    assert not run.merged.exists() and not list(run.root.glob(".merged*"))
    # within the ΔW budget but not within the probe's: the logits catch it, nothing is left either
    assert merge_stage.main([str(run.root), "--dtype", "bf16", "--max-delta-loss", "0.9"]) == 2
    assert "does not behave like the trained model" in capsys.readouterr().err
    assert not run.merged.exists() and not list(run.root.glob(".merged*"))
    # --allow-lossy writes it, marked lossy, with the failed probe recorded
    assert merge_stage.main([str(run.root), "--dtype", "bf16", "--allow-lossy"]) == 0
    report = json.loads((run.merged / merge_stage.REPORT_FILE).read_text())
    assert report["lossy"] is True and report["probe"]["passed"] is False and "LOSSY" in capsys.readouterr().out
    assert report["probe"]["residual"] > merge_stage.PROBE_MAX_RESIDUAL


def test_heldout_loss_matches_training_eval_loss(trained):
    run, _, _ = trained["lora", "nf4", "strong"]
    merge_stage.merge(run.root, "fp32")
    merge_stage.merge(run.root, with_adapter=False)
    tuned = json.loads((run.merged / merge_stage.REPORT_FILE).read_text())["heldout"]
    base = json.loads((run.baseline_run().merged / merge_stage.REPORT_FILE).read_text())["heldout"]
    summary = json.loads((run.logs / train_stage.SUMMARY_FILE).read_text())
    eval_loss = [e["eval_loss"] for e in summary["log"] if "eval_loss" in e][-1]
    # the trainer averages per batch, the merge per token: equal up to that weighting
    assert tuned["loss"] == pytest.approx(eval_loss, abs=0.01)
    assert tuned["records"] == base["records"] == 8 and tuned["tokens"] == base["tokens"] > 0
    assert base["loss"] - tuned["loss"] > 0.03  # training lowered it, by more than the tolerance above


def test_non_finite_adapter_is_refused(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run, _, _ = trained["ssh", "none", "strong"]
    broken = RunDir(tmp_path / "broken")
    shutil.copytree(run.root, broken.root, ignore=shutil.ignore_patterns("merged", "baseline", "checkpoints"))
    recipe = yaml.safe_load(broken.recipe.read_text())
    recipe["run_dir"] = str(broken.root)
    broken.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
    tensors = load_file(str(broken.adapter / "adapter_model.safetensors"))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and "positions" not in k)
    tensors[name][0] = float("nan")
    save_file(tensors, str(broken.adapter / "adapter_model.safetensors"))
    assert merge_stage.main([str(broken.root)]) == 2
    assert "non-finite" in capsys.readouterr().err.lower()
    assert not broken.merged.exists()


def test_bad_options_fail_before_loading(trained, capsys):
    run, _, _ = trained["ssh", "none", "strong"]
    assert merge_stage.main([str(run.root), "--max-delta-loss", "0"]) == 2
    assert "max_delta_loss = 0.0" in capsys.readouterr().err


def _batch(run: RunDir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run.merged))
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

    run, _, _ = trained[method, "nf4", "strong"]
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

    run, _, _ = trained["ssh", "nf4", "strong"]
    assert merge_stage.main([str(run.root), "--dtype", "fp32"]) == 0
    assert merge_stage.main([str(run.root), "--no-adapter"]) == 0  # follows the merged model's fp32
    baseline = RunDir(run.baseline)
    assert (baseline.merged / "config.json").is_file() and baseline.template.is_file()
    batch = _batch(run)
    _, plain = _adapter_and_base_logits(run, batch)
    model = AutoModelForCausalLM.from_pretrained(str(baseline.merged), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(**batch).logits.float()
    assert (out - plain).abs().max().item() < 1e-3
    report = json.loads((baseline.merged / merge_stage.REPORT_FILE).read_text())
    assert report["adapter"] is None and report["adapted_layers"] == 0 and report["dtype"] == "fp32"


def test_merge_without_trained_adapter_names_the_command(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert merge_stage.main([str(run.root)]) == 2
    assert "not a run directory made by launch.train" in capsys.readouterr().err
    run.root.mkdir()
    (run.recipe).write_text("name: x\n")
    assert merge_stage.main([str(run.root)]) == 2
    assert "python -m launch.train" in capsys.readouterr().err
    assert not run.merged.exists()
