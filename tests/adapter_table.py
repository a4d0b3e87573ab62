"""The one table of adapter cases: method variants × bases (plain, NF4) × front ends (sspeft, PEFT).

    from adapter_table import CASES, build
    for variant, base, front in CASES:            # the combinations every per-method contract runs over
        model = build(variant, base, front)       # Tiny on that base, the variant's adapter added by that front end

Every variant runs on the plain base through sspeft.inject; the other bases and front ends run each method's
default variant (the variants differ in positions, ΔW construction or initial values, which sspeft computes the same
way on every base and behind either front end).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

import sspeft
from conftest import require_module
from sspeft_helpers import dequantized, linear4bit_layers, quantize_linears

VARIANTS: dict[str, dict[str, Any]] = {
    "ssh": dict(method="ssh"),
    "ssh-separable": dict(method="ssh", dht="separable"),
    "ssh-global": dict(method="ssh", budget="global"),
    "lfma": dict(method="lfma"),
    "lfma-half": dict(method="lfma", half_spectrum=True),
    "lfma-gaussian": dict(method="lfma", init="gaussian"),
    "waveft": dict(method="waveft"),
    "waveft-db3": dict(method="waveft", wavelet="db3"),
    "waveft-periodic": dict(method="waveft", wavelet="db2", construction="periodic"),
    "fourierft": dict(method="fourierft"),
    "fourierft-zeros": dict(method="fourierft", init="zeros", shared_positions=False),
    "shira": dict(method="shira"),
}
"""Variant name → SpectralConfig fields; each method's default variant carries the method's name."""

ZERO_INIT = {"ssh", "ssh-separable", "ssh-global", "waveft", "waveft-db3", "waveft-periodic", "fourierft-zeros",
             "shira"}
"""Variants whose coefficients start at zero (the adapted model starts as its base)."""

CONSTRUCTIONS = ("ssh", "ssh-separable", "fourierft", "lfma", "lfma-half", "waveft", "waveft-db3", "waveft-periodic",
                 "shira")
"""One variant per way of building ΔW from coefficients (the others differ only in positions or initial values)."""

TARGETS = ["q_proj", "v_proj", "k_proj"]
BASES = ("plain", "nf4")
FRONT_ENDS = ("sspeft", "peft")


class Tiny(nn.Module):
    """q: 16×24 (non-square), v: 24×24 (square), k: 9×7 (odd), plus an untouched layer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(24, 16)
        self.v_proj = nn.Linear(24, 24, bias=False)
        self.k_proj = nn.Linear(7, 9)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        h = self.q_proj(self.v_proj(x))
        k = self.k_proj(x[..., :7])
        return self.out(torch.tanh(h)) + k[..., :5]


def base_model(base: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Tiny(seed) in ``dtype``; on the NF4 base every Linear (the targets and the untouched `out`) is a real
    bitsandbytes Linear4bit computing in ``dtype``. Two calls with the same arguments give identical models."""
    model = Tiny(seed).to(dtype)
    if base == "nf4":
        require_module("bitsandbytes")
        quantize_linears(model, [*TARGETS, "out"], compute_dtype=dtype)
    return model


def config(variant: str, **kw) -> sspeft.SpectralConfig:
    return sspeft.SpectralConfig(**{"n": 12, "target_modules": TARGETS, "seed": 3, **VARIANTS[variant], **kw})


@dataclass(frozen=True)
class FrontEnd:
    """How a user adds, merges, disables, saves and loads an adapter through one API."""

    add: Callable[[nn.Module, sspeft.SpectralConfig], nn.Module]
    merge: Callable[[nn.Module], None]
    unmerge: Callable[[nn.Module], None]
    merge_and_unload: Callable[[nn.Module], nn.Module]
    disabled: Callable[[nn.Module], ContextManager]
    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path], nn.Module]
    unloads_every_4bit_layer: bool
    """merge_and_unload dequantizes the 4-bit layers it did not adapt too (sspeft's default; PEFT keeps them)."""


def _peft() -> FrontEnd:
    require_module("peft")
    import peft

    return FrontEnd(
        add=lambda model, cfg: peft.get_peft_model(model, sspeft.peft_config(cfg, task_type=None)),
        merge=lambda model: model.merge_adapter(),
        unmerge=lambda model: model.unmerge_adapter(),
        merge_and_unload=lambda model: model.merge_and_unload(),
        disabled=lambda model: model.disable_adapter(),
        save=lambda model, path: model.save_pretrained(str(path)),
        load=lambda base, path: peft.PeftModel.from_pretrained(base, str(path)),
        unloads_every_4bit_layer=False,
    )


SSPEFT = FrontEnd(add=sspeft.inject, merge=sspeft.merge, unmerge=sspeft.unmerge,
                  merge_and_unload=sspeft.merge_and_unload, disabled=sspeft.disabled, save=sspeft.save_adapter,
                  load=sspeft.load_adapter, unloads_every_4bit_layer=True)


def front_end(name: str) -> FrontEnd:
    return SSPEFT if name == "sspeft" else _peft()


def build(variant: str, base: str, front: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """``base_model(base, seed, dtype)`` with ``variant``'s adapter added through ``front``."""
    return front_end(front).add(base_model(base, seed, dtype), config(variant))


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers keyed by their name in the user's model (PEFT's wrapper prefix removed)."""
    return {n.removeprefix("base_model.model."): m for n, m in sspeft.adapted_layers(model).items()}


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight an adapter adds to: the base layer's own, or the dequantized NF4 one."""
    base = layer.base_layer
    return dequantized(base) if linear4bit_layers(base) else base.weight.detach().float()


CASES = [(variant, base, front) for base in BASES for front in FRONT_ENDS
         for variant in (VARIANTS if (base, front) == ("plain", "sspeft") else sspeft.METHODS)]
"""(variant, base, front end) combinations the per-method contracts run over."""

METHODS_ON_NF4 = [(method, front) for front in FRONT_ENDS for method in sspeft.METHODS]
"""(method, front end) pairs of the contracts that only the NF4 base has."""


def case_id(case: tuple[str, str, str]) -> str:
    return "-".join(case)
