"""Export a trained run as a plain transformers checkpoint: dequantized base + ΔW, for vLLM and any HF tool.

    python -m launch.merge RUN_DIR                      # → RUN_DIR/merged/, dtype chosen so ΔW survives (auto)
    python -m launch.merge RUN_DIR --no-adapter         # → RUN_DIR/baseline/merged/ in the merged one's dtype
    python -m launch.merge RUN_DIR --dtype bf16 [--allow-lossy]

The base is loaded exactly as training saw it (4-bit NF4 if the recipe says so) and the output is written module
by module into safetensors shards, so peak memory is the 4-bit model plus one shard. Each adapted weight is
W0 (dequantized, fp32) + ΔW, rounded once to the output dtype.

A spectral ΔW spreads a few hundred coefficients over millions of entries, so its entries often sit below one
bf16 ulp of W0 and rounding erases them. Before writing, every adapted layer is measured against the rounding
the baseline receives too: loss = ||(round(W0 + ΔW) − round(W0)) − ΔW|| / ||ΔW||, for bf16, fp16 and fp32, one
layer at a time (no second copy of the model). `--dtype auto` (the default) picks bf16 when its worst layer
loses at most --max-delta-loss (1 %), else fp32; an explicit dtype that loses more is an error unless
--allow-lossy. The baseline (`--no-adapter`) takes the dtype recorded by the merge, so before/after comparisons
round both models alike.

Then a probe loads the written checkpoint from disk as evaluation does and compares its logits with the trained
model (adapter applied at runtime) on a few seeded records of the run's data: cosine and relative residual of the
logit shift (merged − baseline against adapter − base) must pass PROBE_MIN_COSINE / PROBE_MAX_RESIDUAL, else the
merge fails and leaves nothing behind (unless --allow-lossy, which marks the report lossy; eval.generate refuses a
lossy checkpoint unless given --allow-lossy too). The same loaded checkpoint gives the response loss on the run's
held-out records (data.eval_fraction), reported by eval.report next to the judge scores.
Everything lands in merge_report.json; both outputs carry the tokenizer and template.jinja as chat template.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sspeft
from sspeft.model import is_adapter_layer
from launch.models import ModelSpecError, load_causal_lm, logical_numel, resolve_model_path, torch_dtype
from launch.recipe import RecipeError, load_resolved
from launch.rundir import (MERGE_REPORT, OutputError, RunDir, atomic_directory, atomic_write_json, check_free_space,
                           check_writable, run_writing_stage)
from launch.threads import ThreadSettingError, configure_threads

log = logging.getLogger("launch.merge")
SHARD_BYTES = 2 * 1024**3
REPORT_FILE = MERGE_REPORT
DTYPES = ("bf16", "fp16", "fp32")
AUTO_CANDIDATES = ("bf16", "fp32")
"""What `auto` picks from, narrowest first. fp16 is measured and selectable but never picked: its ±65504 range
overflows some models' activations, and CPUs have no fp16 kernels (evaluation would run it in another dtype)."""
DEFAULT_MAX_DELTA_LOSS = 0.01
PROBE_RECORDS = 4
PROBE_SEED = 0
PROBE_MIN_COSINE = 0.995
PROBE_MAX_RESIDUAL = 0.10
"""Probe thresholds, calibrated on measured merges (README, "Merging"). Merges that keep ΔW gave cosine ≥ 0.99998
and residual ≤ 0.007 (fp32: ≤ 2e-5; bf16 losing ≤ 0.2 % of ΔW: 0.005-0.007) on tiny LLaMAs, SSH and LoRA, fp32
and NF4 bases. Merges that lost ΔW to bf16 gave residual ≥ 0.11 (LoRA losing 7 % of ΔW: cosine 0.993, residual
0.11-0.12; SSH losing 22 %: cosine 0.88, residual 0.51-0.54; SmolLM2 after 3 demo steps: see the README). The
bounds sit between the two groups; the per-layer ΔW check (1 %) is the tighter gate, the probe catches whatever
changes the written model's behaviour beyond it."""
HELDOUT_LIMIT = 64
"""Held-out records the merged checkpoint's response loss is computed on (the first N of the held-out split)."""


class MergeError(RuntimeError):
    """The merge cannot run; the message names the missing piece and the command that makes it."""


@dataclass
class DeltaSurvival:
    """Per adapted layer and output dtype, the part of ΔW that rounding loses, measured against the rounding the
    baseline receives: ||(round(W0 + ΔW) − round(W0)) − ΔW|| / ||ΔW||."""

    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    delta_sq: float = 0.0
    lost_sq: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DTYPES, 0.0))

    def add(self, name: str, w0: torch.Tensor, delta: torch.Tensor) -> None:
        if not bool(torch.isfinite(delta).all()):
            bad = int((~torch.isfinite(delta)).sum())
            raise MergeError(f"layer {name}: ΔW has {bad} non-finite entries (NaN/inf); the adapter is broken "
                             f"(training diverged?) and cannot be merged")
        d2 = float(delta.pow(2).sum())
        self.delta_sq += d2
        losses = {}
        for name_dt in DTYPES:
            dt = torch_dtype(name_dt)
            lost = (w0 + delta).to(dt).float() - w0.to(dt).float() - delta
            l2 = float(lost.pow(2).sum())  # inf when the dtype overflows
            self.lost_sq[name_dt] += l2
            losses[name_dt] = math.sqrt(l2 / d2) if d2 > 0 else (0.0 if l2 == 0 else math.inf)
        self.per_layer[name] = losses

    @property
    def layers(self) -> int:
        return len(self.per_layer)

    def worst(self, dtype: str) -> float:
        return max((v[dtype] for v in self.per_layer.values()), default=0.0)

    def summary(self, dtype: str) -> dict[str, Any]:
        values = [v[dtype] for v in self.per_layer.values()]
        overall = math.sqrt(self.lost_sq[dtype] / self.delta_sq) if self.delta_sq > 0 else 0.0
        worst_layer = max(self.per_layer, key=lambda k: self.per_layer[k][dtype]) if values else None
        return {"overall": _finite(overall), "worst": _finite(max(values, default=0.0)), "worst_layer": worst_layer,
                "median": _finite(statistics.median(values)) if values else 0.0}


def _finite(x: float) -> float | None:
    """JSON has no inf: an overflowing dtype is recorded as null."""
    return x if math.isfinite(x) else None


def check_finite_adapter(name: str, module: nn.Module) -> None:
    """Refuse non-finite trained values (coefficients, LoRA factors) before anything is computed from them."""
    base = {id(p) for p in module.get_base_layer().parameters()}
    for pname, param in module.named_parameters():
        if id(param) in base or not param.is_floating_point():
            continue
        if not bool(torch.isfinite(param.detach()).all()):
            raise MergeError(f"adapter parameter {name}.{pname} holds non-finite values (NaN/inf); the adapter is "
                             f"broken (training diverged?) and cannot be merged")


def adapted_delta(name: str, module: nn.Module) -> torch.Tensor:
    """ΔW fp32 of the adapted layer `module` (an sspeft or PEFT LoRA layer, see `sspeft.model.is_adapter_layer`);
    raises MergeError naming the layer for any other adapter type."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, sspeft.SpectralLinear):
        return module.delta_weight().detach().float()
    if isinstance(module, LoraLayer):
        return sum(module.get_delta_weight(a).detach().float() for a in module.active_adapters if a in module.lora_A)
    raise MergeError(f"layer {name!r} carries a {type(module).__name__} adapter; launch.merge merges sspeft and "
                     f"LoRA adapters only")


def adapted_layers(model: nn.Module):
    """(name, base layer, W0 fp32, ΔW fp32) per adapted layer, computed one layer at a time."""
    for name, module in model.named_modules():
        if is_adapter_layer(module):
            check_finite_adapter(name, module)
            base = module.get_base_layer()
            yield name, base, dense(base), adapted_delta(name, module)


def measure(model: nn.Module) -> DeltaSurvival:
    """Pass 1: ΔW survival of every adapted layer in every dtype; nothing is kept but the figures."""
    survival = DeltaSurvival()
    for name, _, w0, delta in adapted_layers(model):
        survival.add(name, w0, delta)
    return survival


def dense(module: nn.Module) -> torch.Tensor:
    from sspeft.weights import dense_weight

    return dense_weight(module)


class ShardWriter:
    """Collects tensors and writes safetensors shards of about SHARD_BYTES, plus the index when there are several."""

    def __init__(self, out: Path) -> None:
        self.out, self.current, self.size, self.shards = out, {}, 0, []
        self.weight_map: dict[str, int] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.current[name] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        if not self.current:
            return
        index = len(self.shards)
        path = self.out / f"shard-{index:05d}.safetensors"
        try:
            save_file(self.current, str(path), metadata={"format": "pt"})
        except SafetensorError as e:  # safetensors reports OS errors (ENOSPC, EROFS) as its own type
            raise OutputError(f"cannot write {path}: {e}") from e
        self.shards.append(path)
        self.weight_map.update({k: index for k in self.current})
        self.current, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        total = len(self.shards)
        if total == 1:
            self.shards[0].rename(self.out / "model.safetensors")
            return
        names = []
        for i, path in enumerate(self.shards):
            final = self.out / f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            path.rename(final)
            names.append(final.name)
        index = {"metadata": {}, "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def stream_weights(model: nn.Module, writer: ShardWriter, dtype: torch.dtype, apply_delta: bool) -> int:
    """Pass 2: write every weight of `model` (a plain or PEFT-wrapped causal LM) module by module; adapted layers
    as round(W0 + ΔW), or round(W0) without `apply_delta`. Returns the number of modules written."""
    from sspeft.weights import is_linear4bit

    seen: set[int] = set()
    covered: set[int] = set()  # submodules of a layer already written whole (its base, its adapters)
    written = 0
    for name, module in model.named_modules():
        if id(module) in covered:
            continue
        prefix = f"{name}." if name else ""
        adapted = is_adapter_layer(module)
        if adapted or is_linear4bit(module):
            base = module.get_base_layer() if adapted else module
            w = dense(base)
            if apply_delta and adapted:
                w = w + adapted_delta(name, module)
            writer.add(prefix + "weight", w.to(dtype))
            if getattr(base, "bias", None) is not None:
                writer.add(prefix + "bias", base.bias.detach().to(dtype).clone())
            covered.update(id(sub) for sub in module.modules())
            written += 1
            continue
        for pname, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if pname in getattr(module, "_non_persistent_buffers_set", set()) or id(tensor) in seen:
                continue  # tied weights are stored once (the config says they are tied)
            seen.add(id(tensor))
            value = tensor.detach()
            writer.add(prefix + pname, value.to(dtype).clone() if value.is_floating_point() else value.clone())
        written += 1
    writer.close()
    return written


def load_trained(run: RunDir, with_adapter: bool):
    """The base as training saw it, with the run's adapter (PEFT or sspeft format) when asked."""
    recipe = load_resolved(run.root)
    try:
        base_dir = resolve_model_path(recipe.model.path, run.base, recipe.model.revision)
    except ModelSpecError as e:
        raise MergeError(str(e)) from e
    model = load_causal_lm(base_dir, recipe.model, zero3=False, device_map={"": "cpu"})
    model.eval()
    if with_adapter:
        from peft import PeftModel  # the SSPEFT tuner is registered by `import sspeft` above

        model = PeftModel.from_pretrained(model, str(run.adapter), is_trainable=False)
        model.eval()
    return recipe, base_dir, model


def check_options(dtype_name: str, max_delta_loss: float) -> None:
    if dtype_name != "auto" and dtype_name not in DTYPES:
        raise MergeError(f"dtype = {dtype_name!r}; expected auto, {', '.join(DTYPES)}")
    if not (isinstance(max_delta_loss, (int, float)) and 0 < max_delta_loss < 1):
        raise MergeError(f"max_delta_loss = {max_delta_loss!r}; expected a fraction between 0 and 1 (0.01 = 1 %)")


def choose_dtype(requested: str, survival: DeltaSurvival, max_delta_loss: float) -> tuple[str, str]:
    """(dtype, why): auto's narrowest candidate whose worst layer loses at most max_delta_loss, else fp32."""
    if requested != "auto":
        return requested, "requested"
    for name in AUTO_CANDIDATES:
        if survival.worst(name) <= max_delta_loss:
            return name, (f"narrowest dtype whose worst layer loses ≤ {max_delta_loss:.2%} of ΔW"
                          if survival.layers else "no adapted layer")
    return "fp32", f"no dtype keeps every layer's ΔW loss ≤ {max_delta_loss:.2%}; fp32 loses least"


def lossless_dtype(survival: DeltaSurvival, max_delta_loss: float) -> str | None:
    return next((d for d in DTYPES if survival.worst(d) <= max_delta_loss), None)


def check_loss(dtype_name: str, survival: DeltaSurvival, max_delta_loss: float, allow_lossy: bool) -> bool:
    """True when the chosen dtype loses more than allowed (only with allow_lossy; otherwise an error)."""
    worst = survival.worst(dtype_name)
    if worst <= max_delta_loss:
        return False
    if allow_lossy:
        log.warning("%s loses %.2f%% of ΔW in its worst layer (> %.2f%%); writing it anyway (--allow-lossy)",
                    dtype_name, 100 * worst, 100 * max_delta_loss)
        return True
    fine = lossless_dtype(survival, max_delta_loss)
    layer = survival.summary(dtype_name)["worst_layer"]
    advice = (f"use --dtype {fine} (or auto)" if fine else "no dtype keeps it (ΔW is below fp32 resolution of W0)")
    raise MergeError(f"--dtype {dtype_name} loses {100 * worst:.2f}% of ΔW in layer {layer} (allowed: "
                     f"{100 * max_delta_loss:.2f}%): the merged model would not be the trained one; {advice}, "
                     f"or pass --allow-lossy to write it anyway")


def recorded_dtype(run: RunDir) -> str | None:
    """The dtype the run's merge chose (merged/merge_report.json), for a baseline rounded alike."""
    path = run.merged / REPORT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["dtype"]
    except (ValueError, KeyError) as e:
        raise MergeError(f"{path} is unreadable ({e}); merge again: python -m launch.merge {run.root}") from e


def baseline_dtype(run: RunDir, requested: str, has_adapter: bool) -> tuple[str, str | None]:
    """The baseline's dtype: the merged model's when recorded, else auto's own choice ("auto": measured from the
    adapter), else fp32; an explicit dtype that differs from the merged one is written, with a warning."""
    recorded = recorded_dtype(run)
    if requested != "auto":
        if recorded not in (None, requested):
            log.warning("the baseline is written in %s but %s is %s: before/after differ in rounding too",
                        requested, run.merged, recorded)
        return requested, None
    if recorded is not None:
        return recorded, f"the dtype of {run.merged} (before/after rounded alike)"
    if not has_adapter:
        return "fp32", "no adapter to measure and no merged model: fp32 keeps the base exact"
    return "auto", None


def _peft_type(adapter: Path) -> str | None:
    """The saved adapter's peft_type (LORA for PEFT's own LoRA runs), or None when the file does not say."""
    try:
        return json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def merge(run_dir: str | Path, dtype_name: str = "auto", with_adapter: bool = True,
          max_delta_loss: float = DEFAULT_MAX_DELTA_LOSS, allow_lossy: bool = False) -> Path:
    """Write RUN_DIR/merged/ (or RUN_DIR/baseline/merged/ without the adapter); returns the directory."""
    check_options(dtype_name, max_delta_loss)
    run = RunDir(run_dir)
    if not run.recipe.is_file():
        raise MergeError(f"{run.recipe} is missing: {run.root} is not a run directory made by launch.train")
    has_adapter = (run.adapter / "adapter_config.json").is_file()
    if with_adapter and not has_adapter:
        raise MergeError(f"{run.adapter} holds no finished adapter; train first: python -m launch.train "
                         f"{run.recipe}")
    if with_adapter and _peft_type(run.adapter) != "LORA":
        sspeft.read_adapter(run.adapter)  # the loaders' one validation, before the base model is loaded
    if not run.template.is_file():
        raise MergeError(f"{run.template} is missing; rerun python -m launch.train {run.recipe}")
    target = run.merged if with_adapter else run.baseline_run().merged
    check_writable(target.parent, "launch.merge")
    requested, reason = dtype_name, None
    if not with_adapter:
        dtype_name, reason = baseline_dtype(run, dtype_name, has_adapter)
    recipe, base_dir, model = load_trained(run, with_adapter or dtype_name == "auto")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        survival = measure(inner)
    if dtype_name == "auto":
        dtype_name, reason = choose_dtype("auto", survival, max_delta_loss)
    lossy = check_loss(dtype_name, survival, max_delta_loss, allow_lossy) if with_adapter else False
    check_free_space(target.parent, checkpoint_bytes(inner, dtype_name), f"the {dtype_name} checkpoint {target}")
    report = {"run": str(run.root), "adapter": str(run.adapter) if with_adapter else None, "dtype": dtype_name,
              "dtype_requested": requested, "dtype_reason": reason or "requested", "base": str(base_dir),
              "quantize": recipe.model.quantize, "max_delta_loss": max_delta_loss,
              "adapted_layers": survival.layers if with_adapter else 0}
    if with_adapter:
        chosen = survival.summary(dtype_name)
        report |= {"delta_lost_to_rounding": chosen["overall"], "delta_lost_worst_layer": chosen["worst"],
                   "delta_loss": {d: survival.summary(d) for d in DTYPES},
                   "delta_loss_per_layer": {k: {d: _finite(x) for d, x in v.items()}
                                            for k, v in survival.per_layer.items()}}
    with torch.no_grad(), atomic_directory(target) as out:
        write_checkpoint(run, recipe, base_dir, inner, out, dtype_name, with_adapter)
        report["probe"], report["heldout"] = probe(run, recipe, base_dir, model, out, dtype_name, with_adapter)
        lossy = check_probe(report["probe"], allow_lossy) or lossy
        report |= {"lossy": lossy, "allow_lossy": allow_lossy}
        atomic_write_json(out / REPORT_FILE, report)
    if not with_adapter:
        shutil.copyfile(run.template, run.baseline_run().template)
    return target


def checkpoint_bytes(model: nn.Module, dtype_name: str) -> int:
    """About what the written checkpoint takes: every parameter (packed 4-bit ones as what they stand for) in the
    output dtype."""
    return sum(logical_numel(p) for p in model.parameters()) * torch_dtype(dtype_name).itemsize


def write_checkpoint(run: RunDir, recipe, base_dir: Path, inner: nn.Module, out: Path, dtype_name: str,
                     with_adapter: bool) -> None:
    from transformers import AutoTokenizer

    dtype = torch_dtype(dtype_name)
    stream_weights(inner, ShardWriter(out), dtype, apply_delta=with_adapter)
    config = inner.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(out)
    if getattr(inner, "generation_config", None) is not None:
        inner.generation_config.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=recipe.model.trust_remote_code)
    tokenizer.chat_template = run.template.read_text()
    tokenizer.save_pretrained(out)


def run_records(recipe, base_dir: Path):
    """The run's own training records and the base tokenizer, as training read them."""
    from transformers import AutoTokenizer

    from launch.data import DataError, load_records

    try:
        records = load_records(recipe.data.path, recipe.data.split, recipe.data.limit)
    except DataError as e:
        raise MergeError(f"the merge probe runs on the run's own records: {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return records, tokenizer


def probe_inputs(run: RunDir, recipe, records, tokenizer) -> tuple[list[int], list[torch.Tensor]]:
    """A fixed, seeded handful of the run's records, rendered through template.jinja (prompt and answer)."""
    from launch.data import split_prompt_completion

    template = run.template.read_text()
    picks = sorted(random.Random(PROBE_SEED).sample(range(len(records)), min(PROBE_RECORDS, len(records))))
    batches = []
    for i in picks:
        prompt, completion = split_prompt_completion(tokenizer, template, records[i], recipe.data.template)
        ids = tokenizer(prompt + completion, add_special_tokens=False).input_ids[:min(recipe.data.max_length, 128)]
        batches.append(torch.tensor([ids]))
    return picks, batches


def _logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(input_ids=b).logits[0].float() for b in batches])


def probe(run: RunDir, recipe, base_dir: Path, model: nn.Module, out: Path, dtype_name: str,
          with_adapter: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Logits of the checkpoint in `out`, loaded from disk as evaluation loads it, against the trained model at
    runtime; and its response loss on the run's held-out records."""
    from transformers import AutoModelForCausalLM

    records, tokenizer = run_records(recipe, base_dir)
    picks, batches = probe_inputs(run, recipe, records, tokenizer)
    compute_in_fp32(model)
    tuned = _logits(model, batches) if with_adapter else None
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = _logits(model, batches)
    else:
        base = _logits(model, batches)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch_dtype(dtype_name)).eval()
    written = _logits(loaded, batches)
    heldout = heldout_loss(loaded, run, recipe, records, tokenizer)
    result: dict[str, Any] = {"records": picks, "tokens": int(written.shape[0]), "dtype": dtype_name}
    if not with_adapter:
        result |= {"max_abs_logit_diff": float((written - base).abs().max()), "passed": True}
        return result, heldout
    inner = model.get_base_model()
    dtype = torch_dtype(dtype_name)
    for name, module in inner.named_modules():  # the loaded model becomes the baseline checkpoint, layer by layer
        if is_adapter_layer(module):
            loaded.get_submodule(name).weight.data.copy_(dense(module.get_base_layer()).to(dtype))
    baseline = _logits(loaded, batches)
    del loaded
    return result | shift_agreement(written, baseline, tuned, base), heldout


def compute_in_fp32(model: nn.Module) -> None:
    """The runtime reference computes in fp32 whatever the recipe's dtype: upcasting bf16 weights is exact and a
    4-bit layer keeps its packed weights (only its compute dtype changes), so W0 and ΔW stay what training had,
    while bf16 arithmetic noise stays out of the adapter's measured effect. Called after the weights are written."""
    from sspeft.weights import is_linear4bit

    for module in model.modules():
        if is_linear4bit(module):
            module.compute_dtype = torch.float32
            continue  # packed 4-bit weights stay packed
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.float()


def shift_agreement(merged: torch.Tensor, baseline: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor,
                    ) -> dict[str, Any]:
    """Cosine and relative residual of the logit shift the checkpoints show (merged − baseline) against the one
    the trained adapter makes at runtime (tuned − base), and the largest |merged − tuned|."""
    got, true = (merged - baseline).flatten().double(), (tuned - base).flatten().double()
    effect = float(true.norm())
    out: dict[str, Any] = {"max_abs_logit_diff": float((merged - tuned).abs().max()),
                           "adapter_effect_max_abs": float((tuned - base).abs().max()),
                           "baseline_max_abs_logit_diff": float((baseline - base).abs().max()),
                           "min_cosine": PROBE_MIN_COSINE, "max_residual": PROBE_MAX_RESIDUAL}
    if effect == 0.0:  # nothing was trained: the checkpoints must not differ either
        return out | {"cosine": None, "residual": None, "passed": float(got.norm()) == 0.0}
    cosine = float(got @ true) / (float(got.norm()) * effect) if float(got.norm()) > 0 else 0.0
    residual = float((got - true).norm()) / effect
    return out | {"cosine": cosine, "residual": residual,
                  "passed": cosine >= PROBE_MIN_COSINE and residual <= PROBE_MAX_RESIDUAL}


def check_probe(result: dict[str, Any], allow_lossy: bool) -> bool:
    """True when the probe failed and --allow-lossy keeps the checkpoint anyway; otherwise a failure raises."""
    if result["passed"]:
        return False
    message = (f"the written checkpoint does not behave like the trained model: its logit shift has cosine "
               f"{result['cosine']} (at least {PROBE_MIN_COSINE} expected) and residual {result['residual']} (at "
               f"most {PROBE_MAX_RESIDUAL}) against the adapter applied at runtime")
    if allow_lossy:
        log.warning("%s; kept because of --allow-lossy", message)
        return True
    raise MergeError(f"{message}; merge with --dtype fp32, or pass --allow-lossy to keep it")


def heldout_loss(model: nn.Module, run: RunDir, recipe, records, tokenizer) -> dict[str, Any]:
    """Mean response-token loss on the held-out split training made (data.eval_fraction, train.seed)."""
    from datasets import Dataset

    from launch.data import build_template, sft_rows, tokenize_records

    fraction = recipe.data.eval_fraction
    if fraction <= 0:
        return {"loss": None, "records": 0, "why": "data.eval_fraction is 0: the run holds no records out"}
    data = recipe.data
    template = build_template(data.template, tokenizer)
    rows, _ = sft_rows(records, tokenizer, template, data.template, data.max_length)
    # the held-out rows of launch.train.prepare_data: its train_test_split permutes by length and seed alone
    held = Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(
        test_size=fraction, seed=recipe.train.seed)["test"]["i"]
    held_out, held = len(held), held[:HELDOUT_LIMIT]
    if rows and "input_ids" not in rows[0]:
        # single-turn rows go to TRL as prompt/completion (one row per record); tokenize_records gives the ids
        # and labels TRL's completion-only loss uses (tests/test_trl_formats.py)
        rows, _ = tokenize_records([records[i] for i in held], tokenizer, template, data.template, data.max_length)
    else:
        rows = [rows[i] for i in held]
    total, tokens = 0.0, 0
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].float()
        labels = torch.tensor(row["labels"][1:])
        keep = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        tokens += int(keep.sum())
    return {"loss": total / tokens if tokens else None, "records": len(rows), "held_out": held_out,
            "tokens": tokens, "eval_fraction": fraction, "seed": recipe.train.seed}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m launch.merge", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="output weight dtype (auto: bf16 when it keeps ΔW, else fp32)")
    parser.add_argument("--max-delta-loss", type=float, default=DEFAULT_MAX_DELTA_LOSS,
                        help="largest fraction of any layer's ΔW rounding may lose (default 0.01)")
    parser.add_argument("--allow-lossy", action="store_true",
                        help="write a checkpoint that loses ΔW or fails the logits probe, marked lossy")
    parser.add_argument("--no-adapter", action="store_true", help="write baseline/merged/: the base without ΔW")
    args = parser.parse_args(argv)
    def work() -> Path:
        log.info("CPU threads: %s", configure_threads())
        return merge(args.run_dir, args.dtype, with_adapter=not args.no_adapter, max_delta_loss=args.max_delta_loss,
                     allow_lossy=args.allow_lossy)

    status, out = run_writing_stage(
        "launch.merge", work, (MergeError, RecipeError, OutputError, sspeft.AdapterFileError, ThreadSettingError))
    if status:
        return status
    print(summary_line(json.loads((out / REPORT_FILE).read_text()), out))
    return 0


def _pct(x: float | None) -> str:
    return "all (overflow)" if x is None else f"{100 * x:.2f}%"


def summary_line(report: dict[str, Any], out: Path) -> str:
    dtype, probe_ = report["dtype"], report["probe"]
    held = report["heldout"]
    held_text = f"; held-out response loss {held['loss']:.4f}" if held.get("loss") is not None else ""
    if report["adapter"] is None:
        return (f"wrote the base without adapter into {out} ({dtype}: {report['dtype_reason']}); max |Δlogit| "
                f"against the base at runtime {probe_['max_abs_logit_diff']:.3g}{held_text}")
    lossy = " LOSSY (--allow-lossy)" if report["lossy"] else ""
    lost, worst = report["delta_lost_to_rounding"], report["delta_lost_worst_layer"]
    cosine = "n/a" if probe_["cosine"] is None else f"{probe_['cosine']:.4f}"
    residual = "n/a" if probe_["residual"] is None else f"{probe_['residual']:.4f}"
    return (f"merged {report['adapted_layers']} adapted layers into {out} ({dtype}: {report['dtype_reason']}); "
            f"rounding lost {_pct(lost)} of ΔW (worst layer {_pct(worst)}); logits probe: shift cosine {cosine}, "
            f"residual {residual}, max |Δlogit| {probe_['max_abs_logit_diff']:.3g}{held_text}{lossy}")


if __name__ == "__main__":
    sys.exit(main())
