"""Export a trained run as a plain transformers checkpoint: dequantized base + ΔW, for vLLM and any HF tool.

    python -m launch.merge RUN_DIR [--dtype bf16|fp32]           # → RUN_DIR/merged/
    python -m launch.merge RUN_DIR --no-adapter [--dtype ...]    # → RUN_DIR/baseline/merged/ (same base, no ΔW)

The base is loaded exactly as training saw it (4-bit NF4 if the recipe says so), and the output is written module
by module into safetensors shards, so peak memory is the 4-bit model plus one shard (an 8B model merges in
24 GiB). Each adapted weight is W0 (dequantized, fp32) + ΔW, rounded once to --dtype; the command reports how much
of ΔW that rounding lost (merge_report.json). `--no-adapter` writes the fair baseline for before/after comparisons:
the same dequantized base without ΔW. Both carry the tokenizer and the run's template.jinja as chat template.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from launch.models import ModelSpecError, load_causal_lm, resolve_model_path, torch_dtype
from launch.recipe import RecipeError, load_resolved
from launch.rundir import RunDir, atomic_directory, atomic_write_json

log = logging.getLogger("launch.merge")
SHARD_BYTES = 2 * 1024**3
REPORT_FILE = "merge_report.json"


class MergeError(RuntimeError):
    """The merge cannot run; the message names the missing piece and the command that makes it."""


@dataclass
class RoundingLoss:
    """How much of ΔW survives rounding W0 + ΔW to the output dtype, accumulated over adapted layers."""

    delta_sq: float = 0.0
    """Σ ||ΔW||² over adapted layers."""
    lost_sq: float = 0.0
    """Σ ||round(W0 + ΔW) − W0 − ΔW||² over adapted layers."""
    worst: float = 0.0
    """Largest per-layer lost fraction ||lost|| / ||ΔW||."""
    layers: int = 0
    per_layer: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, w0: torch.Tensor, delta: torch.Tensor, rounded: torch.Tensor) -> None:
        lost = rounded.float() - w0 - delta
        d2, l2 = float(delta.pow(2).sum()), float(lost.pow(2).sum())
        self.delta_sq += d2
        self.lost_sq += l2
        frac = (l2 / d2) ** 0.5 if d2 > 0 else 0.0
        self.per_layer[name] = frac
        self.worst = max(self.worst, frac)
        self.layers += 1

    @property
    def fraction(self) -> float:
        return (self.lost_sq / self.delta_sq) ** 0.5 if self.delta_sq > 0 else 0.0


def adapted_delta(module: nn.Module) -> tuple[nn.Module, torch.Tensor] | None:
    """(base layer, ΔW fp32) for an sspeft or PEFT LoRA layer; None for any other module."""
    from peft.tuners.lora import LoraLayer

    import sspeft

    if isinstance(module, sspeft.SpectralLinear):
        return module.base_layer, module.delta_weight().detach().float()
    if isinstance(module, LoraLayer):
        deltas = [module.get_delta_weight(a).detach().float() for a in module.active_adapters if a in module.lora_A]
        return module.get_base_layer(), sum(deltas)
    return None


def dense(module: nn.Module) -> torch.Tensor:
    from sspeft.quant import dense_weight

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
        from safetensors.torch import save_file

        if not self.current:
            return
        index = len(self.shards)
        path = self.out / f"shard-{index:05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
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


def stream_weights(model: nn.Module, writer: ShardWriter, dtype: torch.dtype, loss: RoundingLoss) -> int:
    """Write every weight of `model` (a plain or PEFT-wrapped causal LM) module by module; returns the count."""
    from sspeft.quant import is_linear4bit

    seen: set[int] = set()
    skip_prefixes: list[str] = []
    written = 0
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{name}." if name else ""
        adapted = adapted_delta(module)
        if adapted is not None:
            base, delta = adapted
            w0 = dense(base)
            merged = (w0 + delta).to(dtype)
            loss.add(name, w0, delta, merged)
            writer.add(prefix + "weight", merged)
            if getattr(base, "bias", None) is not None:
                writer.add(prefix + "bias", base.bias.detach().to(dtype).clone())
            skip_prefixes.append(prefix)
            written += 1
            continue
        if is_linear4bit(module):
            writer.add(prefix + "weight", dense(module).to(dtype))
            if module.bias is not None:
                writer.add(prefix + "bias", module.bias.detach().to(dtype).clone())
            skip_prefixes.append(prefix)
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
        from peft import PeftModel

        import sspeft  # noqa: F401  (registers the SSPEFT tuner with PEFT)

        model = PeftModel.from_pretrained(model, str(run.adapter), is_trainable=False)
        model.eval()
    return recipe, base_dir, model


def merge(run_dir: str | Path, dtype_name: str = "bf16", with_adapter: bool = True) -> Path:
    """Write RUN_DIR/merged/ (or RUN_DIR/baseline/merged/ without the adapter); returns the directory."""
    from transformers import AutoTokenizer

    run = RunDir(run_dir)
    if not run.recipe.is_file():
        raise MergeError(f"{run.recipe} is missing: {run.root} is not a run directory made by launch.train")
    if with_adapter and not (run.adapter / "adapter_config.json").is_file():
        raise MergeError(f"{run.adapter} holds no finished adapter; train first: python -m launch.train "
                         f"{run.recipe}")
    if not run.template.is_file():
        raise MergeError(f"{run.template} is missing; rerun python -m launch.train {run.recipe}")
    dtype = torch_dtype(dtype_name)
    recipe, base_dir, model = load_trained(run, with_adapter)
    target = run.merged if with_adapter else run.baseline_run().merged
    loss = RoundingLoss()
    template = run.template.read_text()
    with torch.no_grad(), atomic_directory(target) as out:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        stream_weights(inner, ShardWriter(out), dtype, loss)
        config = inner.config
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        config.dtype = dtype
        config.save_pretrained(out)
        if getattr(inner, "generation_config", None) is not None:
            inner.generation_config.save_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=recipe.model.trust_remote_code)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(out)
        report = {"run": str(run.root), "adapter": str(run.adapter) if with_adapter else None, "dtype": dtype_name,
                  "base": str(base_dir), "quantize": recipe.model.quantize, "adapted_layers": loss.layers,
                  "delta_lost_to_rounding": loss.fraction, "delta_lost_worst_layer": loss.worst}
        atomic_write_json(out / REPORT_FILE, report)
    if not with_adapter:
        shutil.copyfile(run.template, run.baseline_run().template)
    return target


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m launch.merge", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="output weight dtype")
    parser.add_argument("--no-adapter", action="store_true", help="write baseline/merged/: the base without ΔW")
    args = parser.parse_args(argv)
    try:
        out = merge(args.run_dir, args.dtype, with_adapter=not args.no_adapter)
    except (MergeError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = json.loads((out / REPORT_FILE).read_text())
    if report["adapted_layers"]:
        print(f"merged {report['adapted_layers']} adapted layers into {out} ({args.dtype}); rounding to "
              f"{args.dtype} lost {100 * report['delta_lost_to_rounding']:.2f}% of ΔW (worst layer "
              f"{100 * report['delta_lost_worst_layer']:.2f}%)")
    else:
        print(f"wrote the base without adapter into {out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
