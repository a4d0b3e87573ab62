"""Model-level operations: find targets, choose positions, inject, merge, disable."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator

import torch
from torch import nn

from . import methods, weights
from .config import SpectralConfig
from .layer import SpectralLinear

# Output heads are never "all-linear" targets (they tie to embeddings and dominate the parameter count).
_HEAD_NAMES = ("lm_head", "embed_out", "output", "score", "classifier")


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` wraps a base layer with adapters: a SpectralLinear or any PEFT tuner layer (LoRA & co.),
    recognised by the `adapter_layer_names` every BaseTunerLayer declares (so PEFT need not be imported)."""
    return hasattr(type(module), "adapter_layer_names")


def _is_peft_tuner_layer(module: nn.Module) -> bool:
    return is_adapter_layer(module) and not isinstance(module, SpectralLinear)


def already_adapted(name: str, module: nn.Module) -> str:
    """The message for a target that already carries an adapter (LoRA & co., or one of ours when loading)."""
    kind = "an sspeft" if isinstance(module, SpectralLinear) else "a PEFT"
    return (f"module {name!r} already carries {kind} adapter ({type(module).__name__}); sspeft adapters and LoRA may "
            f"sit on different modules of one model, not on the same one")


def warn_base_mismatch(mismatched: list[str], adapter: str, stacklevel: int) -> None:
    """Warn that base weights differ from those `adapter` (a description) was trained on; `stacklevel` as the
    caller's own warnings.warn would take it."""
    warnings.warn(
        f"sspeft: {len(mismatched)} base weight(s) differ from those the adapter {adapter} was trained on (first: "
        f"{mismatched[0]!r}); its positions were chosen from the original weights (the saved ones are loaded), so "
        f"results will differ. Load the same base (same checkpoint and quantization) to reproduce them.",
        stacklevel=stacklevel + 1,
    )


def _linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if weights.is_supported_base(module):
            yield name, module


def _matches(name: str, targets, excludes) -> bool:
    if excludes and any(name == e or name.endswith("." + e) for e in excludes):
        return False
    if targets == "all-linear":
        return name.split(".")[-1] not in _HEAD_NAMES
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, cfg: SpectralConfig) -> dict[str, nn.Module]:
    """{module name: module} of the layers ``cfg.target_modules`` selects; raises with what exists if none."""
    found: dict[str, nn.Module] = {}
    seen_other: list[str] = []
    for name, module in model.named_modules():
        if not name or not _matches(name, cfg.target_modules, cfg.exclude_modules):
            continue
        if isinstance(module, SpectralLinear):
            raise ValueError(f"module {name!r} already carries an sspeft adapter; remove it before injecting again")
        if _is_peft_tuner_layer(module):
            raise ValueError(already_adapted(name, module))
        if name.endswith(".base_layer"):
            continue
        if weights.is_supported_base(module):
            found[name] = module
        elif isinstance(cfg.target_modules, list) and any(name.endswith(t) for t in cfg.target_modules):
            seen_other.append(f"{name} ({type(module).__name__})")
    if seen_other and not found:
        raise TypeError(
            f"SpectralConfig.target_modules={cfg.target_modules!r} matched only unsupported layer types: "
            f"{', '.join(seen_other[:5])}; sspeft adapts nn.Linear and bitsandbytes Linear4bit"
        )
    if not found:
        leaves = sorted({n.split(".")[-1] for n, _ in _linear_modules(model) if n})
        raise ValueError(
            f"SpectralConfig.target_modules={cfg.target_modules!r} matched no Linear layer; the model's Linear "
            f"layers are named: {', '.join(leaves) or '(none)'}"
        )
    return found


def plan_positions(
    cfg: SpectralConfig, targets: dict[str, nn.Module]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """{name: (positions, initial coefficients, base fingerprint)} for every target; ``cfg`` must be resolved."""
    _check_meta(cfg, targets)
    counts: dict[str, int] = {}
    if cfg.budget == "global":
        counts = _global_counts(cfg, targets)
    plan = {}
    for name, module in targets.items():
        if module.weight.is_meta:  # only the shape is used (checked above); no fingerprint without values
            weight = torch.empty((module.out_features, module.in_features), device="meta")
            positions = methods.select_positions(cfg, weight, name)
            plan[name] = (positions, methods.init_coefficients(cfg, weight, positions, name), "")
            continue
        weight = weights.dense_weight(module)
        count = counts.get(name)
        if count is not None and cfg.budget == "global":
            positions = _global_positions(cfg, weight, name, count)
        else:
            positions = methods.select_positions(cfg, weight, name)
        coefficients = methods.init_coefficients(cfg, weight, positions, name)
        plan[name] = (positions, coefficients, weights.fingerprint(weight))
    return plan


# Methods that choose positions (or initial coefficients) from the values of the pretrained weight.
WEIGHT_DEPENDENT = ("ssh", "lfma")


def _check_meta(cfg: SpectralConfig, targets: dict[str, nn.Module]) -> None:
    meta = [name for name, module in targets.items() if module.weight.is_meta]
    if meta and cfg.method in WEIGHT_DEPENDENT:
        raise ValueError(
            f"SpectralConfig.method={cfg.method!r} chooses its positions from the pretrained weights, but "
            f"{len(meta)} target layer(s) (first: {meta[0]!r}) are on the meta device and hold no values; it needs "
            f"the real weights: load the model with its weights before sspeft.inject (fourierft, waveft and shira "
            f"draw positions from the seed alone and can be injected on the meta device)"
        )


def _global_counts(cfg: SpectralConfig, targets: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """SSH global budget: n × layers positions; round(δ·N) by energy ranked across all layers, the rest drawn
    uniformly over all remaining positions (a seeded multinomial split by layer size)."""
    total = int(cfg.n) * len(targets)
    top = int(round(cfg.delta * total))
    values, owners = [], []
    for i, (name, module) in enumerate(targets.items()):
        energy = methods.ssh_energy(weights.dense_weight(module), cfg).flatten()
        k = min(top, energy.numel())
        values.append(torch.topk(energy, k, sorted=False).values)
        owners.append(torch.full((k,), i, dtype=torch.long))
    if top:
        chosen = torch.topk(torch.cat(values), top).indices
        per_layer_top = torch.bincount(torch.cat(owners)[chosen], minlength=len(targets))
    else:
        per_layer_top = torch.zeros(len(targets), dtype=torch.long)
    sizes = torch.tensor([m.out_features * m.in_features for m in targets.values()], dtype=torch.float64)
    free = sizes - per_layer_top.double()
    g = torch.Generator().manual_seed(int(cfg.seed))
    draws = torch.multinomial(free / free.sum(), total - top, replacement=True, generator=g) if total > top else None
    per_layer_rand = torch.bincount(draws, minlength=len(targets)) if draws is not None else torch.zeros_like(per_layer_top)
    return {
        name: (int(per_layer_top[i]), int(per_layer_rand[i])) for i, name in enumerate(targets)
    }


def _global_positions(cfg: SpectralConfig, weight: torch.Tensor, name: str, count: tuple[int, int]) -> torch.Tensor:
    by_energy, rand = count
    energy = methods.ssh_energy(weight, cfg).flatten()
    top_idx = torch.topk(energy, by_energy, sorted=True).indices
    g = methods.generator_for(cfg, name, tuple(weight.shape))
    rest = methods.sample_excluding(energy.numel(), rand, top_idx, g)
    flat = torch.cat([top_idx, rest])
    return torch.stack([flat // weight.shape[1], flat % weight.shape[1]])


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def record_layer(cfg: SpectralConfig, name: str, module: nn.Module, positions: torch.Tensor, fp: str) -> None:
    cfg.layers[name] = {
        "shape": [module.out_features, module.in_features],
        "n": int(positions.shape[1]),
        "parameters": int(positions.shape[1]) * methods.parameters_per_position(cfg),
        "fingerprint": fp,
    }


def inject(model: nn.Module, cfg: SpectralConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap every target Linear of ``model`` with a SpectralLinear, **in place**, and return ``model``.

    Works on any torch module whose targeted children are nn.Linear or bitsandbytes Linear4bit. Every base
    parameter is frozen (parameters of existing PEFT adapters, e.g. LoRA on other modules, stay trainable); only the
    coefficients train. Positions are chosen from the fp32 (dequantized, gathered) base weights, seeded by
    ``cfg.seed`` and the module name. 4-bit layers get bitsandbytes' CPU repack switched off before any forward.

    On a model built on the meta device, fourierft, waveft and shira (positions from the seed alone) create their
    positions and coefficients on the CPU with the values a real model would get; load the base weights afterwards
    with ``load_state_dict(..., assign=True)`` (``to_empty`` would discard the coefficients too). SSH and LFMA raise:
    they need the real weights.
    """
    resolved = cfg.resolved()
    targets = find_targets(model, resolved)
    weights.prepare_4bit(model)
    plan = plan_positions(resolved, targets)
    return apply_plan(model, resolved, targets, plan, adapter_name)


def apply_plan(model, resolved, targets, plan, adapter_name):
    """Freeze ``model``'s base parameters and wrap each of ``targets`` in a SpectralLinear holding its ``plan`` entry
    (positions, coefficients, fingerprint), recording the layer in ``resolved``; the one sspeft adapter per model."""
    existing = adapted_layers(model)
    if existing:
        # One sspeft adapter per model: save_adapter records one config, and freezing the base would freeze the
        # first adapter's coefficients. PEFT's multi-adapter API (sspeft.peft_config + add_adapter) covers more.
        raise ValueError(
            f"the model already carries an sspeft adapter (on {next(iter(existing))!r} and "
            f"{len(existing) - 1} more); inject one SpectralConfig per model, listing every target module in it"
        )
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        if not any(_is_peft_tuner_layer(m) for m in _owners(model, owner)):
            param.requires_grad_(False)
    for name, module in targets.items():
        positions, coefficients, fp = plan[name]
        record_layer(resolved, name, module, positions, fp)
        _set_module(model, name, SpectralLinear(module, adapter_name, resolved, positions, coefficients))
    return model


def _owners(model: nn.Module, module_name: str) -> list[nn.Module]:
    """The module and its ancestors along a dotted name."""
    out, current = [model], model
    for part in module_name.split(".") if module_name else []:
        current = getattr(current, part, None)
        if current is None:
            break
        out.append(current)
    return out


def adapted_layers(model: nn.Module) -> dict[str, SpectralLinear]:
    """{name as in ``model.named_modules()``: SpectralLinear} for every adapted layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SpectralLinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name as in ``model.named_parameters()``: coefficients} of every adapter of every adapted layer — the
    parameters sspeft trains, found by asking the layers rather than by matching names."""
    owned = {id(p) for layer in adapted_layers(model).values() for p in layer.sspeft_coefficients.values()}
    return {name: p for name, p in model.named_parameters(remove_duplicate=False) if id(p) in owned}


def adapter_positions(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name as in ``model.named_buffers()``: (2, n) int64 positions} of every adapter of every adapted layer."""
    owned = {id(layer.sspeft_positions[adapter]) for layer in adapted_layers(model).values()
             for adapter in layer.sspeft_positions.keys()}
    return {name: b for name, b in model.named_buffers(remove_duplicate=False) if id(b) in owned}


def base_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{name in the unwrapped model: Linear} of every supported Linear (nn.Linear, Linear4bit) the model computes
    with as a base: an adapted layer's (sspeft or PEFT tuner layer, e.g. LoRA) base under the adapted layer's own
    name, every other Linear under its own. Names are those of the model without adapters, so they match a
    checkpoint of the base; a PeftModel is unwrapped with `get_base_model()`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(inner.named_modules())
    wrappers = {name: m for name, m in modules.items() if is_adapter_layer(m)}
    inside = {id(sub) for wrapper in wrappers.values() for sub in wrapper.modules()}  # bases, adapters (LoRA's A, B)
    named_by_wrapper: dict[int, str] = {}
    for name, wrapper in wrappers.items():  # outermost first: named_modules walks parents before children
        named_by_wrapper.setdefault(id(wrapper.get_base_layer()), name)
    return {named_by_wrapper.get(id(m), name): m for name, m in modules.items()
            if weights.is_supported_base(m) and (id(m) not in inside or id(m) in named_by_wrapper)}


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> SpectralConfig:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model carries no sspeft adapter (call sspeft.inject first)")
    layer = next(iter(layers.values()))
    return layer.sspeft_config[adapter_name or layer.active_adapter]


def count_trainable(model: nn.Module) -> int:
    """Trainable real scalars (sum of numel over parameters that require grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def restore_fp32(model: nn.Module) -> None:
    """Put adapter coefficients cast outside sspeft back to exact fp32 (see `SpectralLinear.restore_fp32`). Call it
    once after TRL's SFTTrainer is built (it casts them to bf16 on 4-bit models), or pass
    ``callbacks=[sspeft.KeepFP32Callback()]`` to the trainer."""
    for layer in adapted_layers(model).values():
        layer.restore_fp32()


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model without adapters inside the block. Merged adapters are unmerged on entry and merged again
    on exit; which coefficients train is unchanged."""
    layers = [layer for layer in adapted_layers(model).values() if not layer.disable_adapters]
    for layer in layers:
        layer.set_disabled(True)
    try:
        yield model
    finally:
        for layer in layers:
            layer.set_disabled(False)


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base in place (reversible with `unmerge`)."""
    for layer in adapted_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base again; inside `disabled`, cancel the merge the block's exit would
    restore."""
    for layer in adapted_layers(model).values():
        if layer.merged or layer.merge_pending:
            layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None, dequantize_all: bool = True) -> nn.Module:
    """Replace every adapted layer by a plain nn.Linear holding W0 + ΔW (ΔW added to a dequantized copy of a 4-bit
    weight, never re-quantized), in place, and return the plain model. With ``dequantize_all`` the remaining
    Linear4bit layers are dequantized too, so the result holds no bitsandbytes layer."""
    weights.prepare_4bit(model)  # before anything dequantizes or runs a forward (bitsandbytes' CPU repack)
    for name, layer in adapted_layers(model).items():
        _set_module(model, name, layer.merged_linear(dtype))
    if dequantize_all:
        for name, module in list(model.named_modules()):
            if weights.is_linear4bit(module):
                _set_module(model, name, weights.dense_linear(module, weights.dense_weight(module), dtype))
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        for attr in ("is_loaded_in_4bit", "is_quantized"):
            if getattr(model, attr, False):
                setattr(model, attr, False)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
    return model
