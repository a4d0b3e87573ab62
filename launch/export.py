"""Export a trained run's spectral adapter as an exact PEFT LoRA adapter, so one LoRA-serving engine evaluates many.

    python -m launch.export RUN_DIR --to lora [--max-rank N] [--max-error E] [--base-cache DIR]   # → RUN_DIR/lora/

RUN_DIR/lora/ holds adapter_config.json and adapter_model.safetensors (lora_A/lora_B per adapted module, one rank
for all of them, rounded up to a size vLLM accepts, lora_alpha = r) and export_report.json: per layer the exact
rank, the rank written and the relative Frobenius error of B·A against ΔW, plus a logits probe of the LoRA against
the runtime adapter on a few seeded prompts from the run's data.

The LoRA applies to the base the adapter was trained on. For an unquantized run that is the recipe's base
checkpoint. For a 4-bit run it is the dequantized base `launch.merge --no-adapter` writes; it is written once per
base and quantisation into BASE_CACHE/<quantize>-<dtype>-<fingerprint>/ (default: lora_bases/ next to the run
directory), and RUN_DIR/baseline/merged is a symlink to it, so every run of that base shares one copy. The
fingerprint hashes every base linear weight as training saw it (dequantized), so different bases never collide.
A baseline the run already holds (`launch.merge --no-adapter`, as the README's order makes one) is adopted as the
shared copy when its weights are those the shared base would hold (same dtype, every layer's fingerprint equal).
Exit status 0 on success, 2 for bad input or when --max-error is exceeded (nothing is written then).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from launch.filelock import exclusive
from launch.recipe import RecipeError, load_resolved
from launch.rundir import (OutputError, RunDir, atomic_directory, atomic_write_json, check_writable,
                           run_writing_stage)

log = logging.getLogger("launch.export")
REPORT_FILE = "export_report.json"
LORA_DIR = "lora"
BASE_CACHE = "lora_bases"
PROBE_PROMPTS = 4
PROBE_TOKENS = 64


class ExportError(RuntimeError):
    """The export cannot run or its result is not acceptable; the message says why and what to do."""


def lora_dir(run: RunDir) -> Path:
    return run.root / LORA_DIR


def default_base_cache(run: RunDir) -> Path:
    return run.root.parent / BASE_CACHE


def base_fingerprint(model: torch.nn.Module, quantize: str) -> str:
    """A hash of every base linear weight as the adapter sees it (dequantized if 4-bit) and the quantisation."""
    h = hashlib.sha256(quantize.encode())
    for clean, value in layer_fingerprints(model).items():
        h.update(f"{clean}:{value};".encode())
    return h.hexdigest()[:16]


def layer_fingerprints(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, str]:
    """{module name as in the base checkpoint: fingerprint of its dense weight} for every base linear layer, the
    weight first rounded to `dtype` when given (as a checkpoint written in that dtype holds it)."""
    import sspeft
    from sspeft.weights import dense_weight, fingerprint

    out = {}
    for name, module in sspeft.base_linears(model).items():
        weight = dense_weight(module)
        out[name] = fingerprint(weight.to(dtype).float() if dtype is not None else weight)
    return out


def baseline_matches(baseline: Path, expected: dict[str, str], dtype: str) -> str | None:
    """None when the checkpoint in `baseline` holds, in `dtype`, exactly the weights `expected` fingerprints (read one
    tensor at a time); otherwise what differs."""
    from safetensors import safe_open

    from sspeft.weights import fingerprint

    try:
        recorded = json.loads((baseline / "merge_report.json").read_text())["dtype"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{baseline / 'merge_report.json'} does not record its dtype ({type(e).__name__})"
    if recorded != dtype:
        return f"it is {recorded}, the shared base is {dtype}"
    found: dict[str, str] = {}
    for file in sorted(baseline.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                name = key.removesuffix(".weight")
                if key.endswith(".weight") and name in expected:
                    found[name] = fingerprint(f.get_tensor(key))
    # a tied output layer is stored once, as the embedding
    differ = [n for n, v in expected.items() if found.get(n, v if n == "lm_head" else None) != v]
    return f"{len(differ)} layers differ (first: {differ[0]})" if differ else None


def probe_prompts(recipe, tokenizer, template: str) -> list[list[int]]:
    """Token ids of a few seeded prompts from the run's training data, rendered through the run's template."""
    from launch.data import apply_template, load_records, messages_for

    records = load_records(recipe.data.path)
    picked = random.Random(recipe.train.seed).sample(records, min(PROBE_PROMPTS, len(records)))
    out = []
    for example in picked:
        text = apply_template(tokenizer, template, messages_for(example, recipe.data.template)[:1],
                              generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"][:PROBE_TOKENS])
    return out


def _logits(model, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids])).logits[0].float() for ids in prompts])


def probe(adapted: torch.Tensor, plain: torch.Tensor, lora: torch.Tensor, lora_plain: torch.Tensor) -> dict:
    """How the LoRA's logit shift compares with the runtime adapter's on the same prompts."""
    shift, lora_shift = (adapted - plain).double().flatten(), (lora - lora_plain).double().flatten()
    norm = float(shift.norm())
    return {
        "tokens": int(adapted.shape[0]),
        "shift_max_abs": float(shift.abs().max()),
        "shift_cosine": float(torch.nn.functional.cosine_similarity(shift, lora_shift, dim=0)),
        "shift_relative_residual": float((lora_shift - shift).norm()) / norm if norm > 0 else 0.0,
        "max_abs_logit_difference": float((lora - adapted).abs().max()),
        "base_max_abs_logit_difference": float((lora_plain - plain).abs().max()),
    }


def shared_base(run: RunDir, cache: Path, key: str, dtype: str, layers: dict[str, str]) -> Path:
    """The dequantized base of a 4-bit run in cache/<key>/, written once by launch.merge --no-adapter; the run's
    baseline/merged points at it (a symlink). A baseline the run holds already becomes the shared copy when it holds
    the same weights (`layers`: launch.export.layer_fingerprints in `dtype`)."""
    from launch.merge import merge

    target = cache / key
    link = run.baseline_run().merged
    with exclusive(cache / f".{key}.lock"):
        if not (target / "config.json").is_file():
            if link.is_symlink():
                link.unlink()
            if link.is_dir():
                differs = baseline_matches(link, layers, dtype)
                if differs:
                    raise ExportError(f"{link} holds a baseline that is not the shared base {key} ({differs}); "
                                      f"move it away so the shared base is written once")
                log.info("adopting %s as the shared base %s (same weights)", link, target)
                shutil.move(str(link), str(target))
            else:
                log.info("writing the dequantized base once into %s", target)
                written = merge(run.root, dtype_name=dtype, with_adapter=False)
                shutil.move(str(written), str(target))
        if not link.exists():
            if link.is_symlink():
                link.unlink()
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, link, target_is_directory=True)
            shutil.copyfile(run.template, run.baseline_run().template)
    return target


def _check(run: RunDir, to: str, max_rank: int | None, max_error: float | None):
    if to != "lora":
        raise ExportError(f"--to is {to!r}; expected lora")
    if max_error is not None and not max_error >= 0:
        raise ExportError(f"--max-error is {max_error}; expected a number >= 0")
    from sspeft.export import VLLM_LORA_RANKS

    if max_rank is not None and not 1 <= max_rank <= max(VLLM_LORA_RANKS):
        raise ExportError(f"--max-rank is {max_rank}; expected 1..{max(VLLM_LORA_RANKS)} (vLLM's largest LoRA rank)")
    if not run.recipe.is_file():
        raise ExportError(f"{run.recipe} is missing: {run.root} is not a run directory made by launch.train")
    if not (run.adapter / "adapter_config.json").is_file():
        raise ExportError(f"{run.adapter} holds no finished adapter; train first: python -m launch.train {run.recipe}")
    if not run.template.is_file():
        raise ExportError(f"{run.template} is missing; rerun python -m launch.train {run.recipe}")
    recipe = load_resolved(run.root)
    if recipe.adapter.method == "lora":
        raise ExportError(f"{run.root} trained a LoRA adapter already (adapter.method = lora); serve {run.adapter} "
                          f"directly")
    import sspeft

    sspeft.read_adapter(run.adapter)  # the loaders' one validation (positions, shapes), before the base loads
    check_writable(run.root, "launch.export")
    return recipe


def export(run_dir: str | Path, to: str = "lora", max_rank: int | None = 512, max_error: float | None = None,
           base_cache: str | Path | None = None) -> Path:
    """Write RUN_DIR/lora/ (adapter + export_report.json) and return it."""
    import sspeft
    from launch.merge import load_trained
    from launch.models import load_causal_lm

    run = RunDir(run_dir)
    recipe = _check(run, to, max_rank, max_error)
    _, base_dir, model = load_trained(run, with_adapter=True)
    quantize = recipe.model.quantize
    key = f"{quantize}-{recipe.model.dtype}-{base_fingerprint(model, quantize)}"
    from launch.models import torch_dtype

    layers = layer_fingerprints(model, torch_dtype(recipe.model.dtype)) if quantize == "nf4" else {}
    lora = sspeft.export_lora(model, max_rank=max_rank)
    worst = max(lora.layers, key=lambda n: lora.layers[n].measured_error)
    if max_error is not None and lora.max_error > max_error:
        raise ExportError(f"layer {worst} loses {lora.layers[worst].measured_error:.3g} of ΔW (relative Frobenius) "
                          f"at rank {lora.layers[worst].rank}, above --max-error {max_error}; raise --max-rank "
                          f"(exact rank {lora.layers[worst].exact_rank}) or --max-error")
    from transformers import AutoTokenizer

    template = run.template.read_text()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=recipe.model.trust_remote_code)
    prompts = probe_prompts(recipe, tokenizer, template)
    adapted = _logits(model, prompts)
    with model.disable_adapter():
        plain = _logits(model, prompts)
    del model
    gc.collect()
    cache = Path(base_cache).expanduser().resolve() if base_cache else default_base_cache(run)
    if quantize == "nf4":
        check_writable(cache, "launch.export (the shared base)")
    lora_base = shared_base(run, cache, key, recipe.model.dtype, layers) if quantize == "nf4" else base_dir
    with atomic_directory(lora_dir(run)) as out:
        lora.config["base_model_name_or_path"] = str(lora_base)
        lora.save(out)
        served_plain, served = _lora_logits(lora_base, out, recipe, prompts, load_causal_lm)
        report = {"run": str(run.root), "to": "lora", "base": str(lora_base), "base_key": key, "quantize": quantize,
                  "shared_base": quantize == "nf4", "r": lora.r, "max_rank": max_rank, "max_error": max_error,
                  "exact_rank_max": max(e.exact_rank for e in lora.layers.values()),
                  "worst_layer": worst, "worst_layer_error": lora.max_error,
                  "truncated_layers": sum(e.truncated for e in lora.layers.values()),
                  "probe": probe(adapted, plain, served, served_plain),
                  "layers": {name: e.summary() for name, e in lora.layers.items()}}
        atomic_write_json(out / REPORT_FILE, report)
    return lora_dir(run)


def _lora_logits(base: Path, adapter: Path, recipe, prompts, load_causal_lm):
    """(base logits, base + LoRA logits) with PEFT's own LoRA layers, as any LoRA tool would apply the export."""
    from dataclasses import replace

    from peft import PeftModel

    section = replace(recipe.model, quantize="none")
    model = PeftModel.from_pretrained(load_causal_lm(base, section, zero3=False, device_map={"": "cpu"}),
                                      str(adapter)).eval()
    served = _logits(model, prompts)
    with model.disable_adapter():
        plain = _logits(model, prompts)
    return plain, served


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--to", default="lora", help="export format (lora)")
    parser.add_argument("--max-rank", type=int, default=512,
                        help="largest rank kept per layer; above it a truncated SVD (default 512, vLLM's largest)")
    parser.add_argument("--max-error", type=float,
                        help="fail when a layer's relative Frobenius error exceeds this (e.g. 0.01)")
    parser.add_argument("--base-cache", help=f"where 4-bit runs share their dequantized base (default: {BASE_CACHE}/ "
                                             "next to the run directory)")
    args = parser.parse_args(argv)
    import sspeft
    from launch.merge import MergeError

    status, out = run_writing_stage(
        "launch.export", lambda: export(args.run_dir, args.to, args.max_rank, args.max_error, args.base_cache),
        (ExportError, RecipeError, MergeError, OutputError, sspeft.AdapterFileError))
    if status:
        return status
    report = json.loads((out / REPORT_FILE).read_text())
    p = report["probe"]
    print(f"wrote a rank-{report['r']} LoRA of {len(report['layers'])} layers into {out} for base {report['base']}; "
          f"{report['truncated_layers']} layers truncated, worst relative error {report['worst_layer_error']:.2g}; "
          f"logit shift vs the runtime adapter: cosine {p['shift_cosine']:.6f}, max |Δlogit| "
          f"{p['max_abs_logit_difference']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
