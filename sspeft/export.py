"""Exact LoRA export of spectral adapters: ΔW = B·A per adapted layer, written as an ordinary PEFT LoRA adapter.

    export = sspeft.export_lora(model, "lora/", max_rank=512)    # any LoRA-serving tool (vLLM, PEFT) can load it
    export.layers["model.layers.0.self_attn.q_proj"].exact_rank

Every method's ΔW is a sum of separable atoms (atoms.py): a row atom over the output index times a column atom over
the input index. Grouping the atoms by distinct row atom (or by distinct column atom, whichever side has fewer)
gives exact factors B (out×r), A (r×in), without an SVD:

  * ssh (standard DHT), fourierft, lfma: ΔW[p, q] = Re Σ_a z_a·e^{iα_a(p)}·e^{iβ_a(q)}. Row frequencies k and m − k
    share the real atoms cos(2πkp/m), sin(2πkp/m), so the rank is 2 per distinct min(k, m − k), 1 for k = 0 and
    k = m/2 (their sine vanishes on integer p).
  * ssh (separable DHT): ΔW = f·Σ_j c_j·cas(2πk_j p/m)·cas(2πl_j q/n): rank 1 per distinct k (cas(k) and cas(m − k)
    are distinct functions).
  * shira: rank 1 per distinct non-zero row; waveft: rank 1 per distinct row coefficient (its synthesis atom).

The column side is the same with the roles of rows and columns swapped. Where that exact rank exceeds `max_rank`,
the best rank-`max_rank` approximation is taken from the exact factors (QR of B and Aᵀ, SVD of the small r×r core;
never an SVD of the out×in ΔW) and its relative Frobenius error is reported, then measured again against
`delta_weight()`.

The adapter uses one rank r for every module (the largest kept rank, rounded up to a size in `rank_sizes`; vLLM
accepts 1, 8, 16, 32, 64, 128, 256, 320, 512), pads smaller factors with zeros, and sets lora_alpha = r so LoRA's
scaling is 1. torch and safetensors only: PEFT is not needed to write it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import weights
from .layer import SpectralLinear
from .model import adapted_layers
from .atoms import FourierPlan, SparsePlan, cas
from .io import CONFIG_NAME, WEIGHTS_NAME  # PEFT's file names, shared by both adapter formats

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks vLLM's `max_lora_rank` accepts."""


@dataclass
class LayerExport:
    """One adapted layer's LoRA factors and what they cost in accuracy."""

    shape: tuple[int, int]
    exact_rank: int
    """Rank of the exact factorisation (distinct atoms on the chosen side)."""
    side: str
    """'row' or 'column': which atoms were grouped."""
    rank: int
    """Rank kept: exact_rank, or max_rank when truncated."""
    error: float
    """Relative Frobenius error ||B·A − ΔW|| / ||ΔW|| predicted by the discarded singular values (0 when exact)."""
    measured_error: float
    """The same error measured against the layer's delta_weight() (fp32 rounding when exact)."""
    B: torch.Tensor = field(repr=False)
    """(out, rank) fp32."""
    A: torch.Tensor = field(repr=False)
    """(rank, in) fp32."""

    @property
    def truncated(self) -> bool:
        return self.rank < self.exact_rank

    def summary(self) -> dict:
        return {"shape": list(self.shape), "exact_rank": self.exact_rank, "side": self.side, "rank": self.rank,
                "truncated": self.truncated, "error": self.error, "measured_error": self.measured_error}


@dataclass
class LoraExport:
    """The LoRA form of a model's spectral adapter: per-layer factors, the common rank r, the PEFT config."""

    layers: dict[str, LayerExport]
    r: int
    config: dict

    @property
    def max_error(self) -> float:
        return max((layer.measured_error for layer in self.layers.values()), default=0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's saved keys: base_model.model.<module>.lora_A.weight (r, in) and lora_B.weight (out, r)."""
        out = {}
        for name, layer in self.layers.items():
            pad = self.r - layer.rank
            a = torch.nn.functional.pad(layer.A, (0, 0, 0, pad))
            b = torch.nn.functional.pad(layer.B, (0, pad))
            out[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write adapter_config.json and adapter_model.safetensors into ``path`` (created if missing)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        return path


# ---------------------------------------------------------------------------------------------------- public entry
def export_lora(
    model: nn.Module,
    path: str | os.PathLike | None = None,
    *,
    max_rank: int | None = 512,
    rank_sizes: tuple[int, ...] | None = VLLM_LORA_RANKS,
    base_model_name_or_path: str | None = None,
    adapter_name: str | None = None,
) -> LoraExport:
    """LoRA factors of every adapted layer of ``model`` (sspeft.inject or a PEFT SSPEFT model), saved to ``path``
    when given.

    Args:
        max_rank: the largest rank kept per layer (None: no limit); layers whose exact rank exceeds it are
            truncated by SVD of their exact factors.
        rank_sizes: ranks the adapter may declare (default: the sizes vLLM accepts); None writes the largest kept
            rank as it is.
        base_model_name_or_path: recorded in adapter_config.json (default: the model config's name_or_path).
        adapter_name: which sspeft adapter (default: each layer's active one).
    """
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"export_lora: max_rank={max_rank!r}; expected a positive integer or None")
    if rank_sizes is not None and max_rank is not None and max_rank > max(rank_sizes):
        raise ValueError(f"export_lora: max_rank={max_rank} exceeds the largest rank the target accepts "
                         f"({max(rank_sizes)}; rank_sizes={list(rank_sizes)})")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = adapted_layers(inner)
    if not layers:
        raise ValueError("export_lora: the model carries no sspeft adapter (call sspeft.inject or load one first)")
    exported = {name: export_layer(layer, max_rank, adapter_name) for name, layer in layers.items()}
    kept = max(layer.rank for layer in exported.values())
    r = _round_rank(kept, rank_sizes)
    base = base_model_name_or_path or getattr(getattr(inner, "config", None), "name_or_path", None)
    config = lora_config(r, _target_modules(inner, list(layers)), base, _task_type(inner))
    export = LoraExport(exported, r, config)
    if path is not None:
        export.save(path)
    return export


def lora_config(r: int, target_modules: list[str], base: str | None, task_type: str | None) -> dict:
    """A PEFT LoraConfig as JSON with scaling lora_alpha / r = 1."""
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base, "r": r,
            "lora_alpha": r, "lora_dropout": 0.0, "target_modules": target_modules, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True}


def export_layer(layer: SpectralLinear, max_rank: int | None = None, adapter_name: str | None = None) -> LayerExport:
    """The exact (or, above ``max_rank``, truncated) LoRA factors of one adapted layer."""
    name = adapter_name or layer.active_adapter
    b, a, side = exact_factors(layer, name)
    exact = b.shape[1]
    error = 0.0
    if max_rank is not None and exact > max_rank:
        b, a, error = truncate(b, a, max_rank)
    b, a = b.float(), a.float()
    with torch.no_grad():
        delta = layer.delta_weight(name).detach().float()
        norm = float(delta.norm())
        diff = float((b.to(delta.device) @ a.to(delta.device) - delta).norm())
    measured = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    return LayerExport(tuple(layer.shape), exact, side, b.shape[1], error, measured, b.cpu(), a.cpu())


# ---------------------------------------------------------------------------------------------------- exact factors
def exact_factors(layer: SpectralLinear, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(B (out, r), A (r, in), side) in float64 with B·A = ΔW exactly (up to rounding), grouped on the side with
    fewer distinct atoms."""
    from .forward import plan_for

    name = adapter_name or layer.active_adapter
    plan = plan_for(layer, name)
    coeff = layer.sspeft_coefficients[name]
    with torch.no_grad(), weights.gathered(coeff):
        if isinstance(plan, SparsePlan):
            return _sparse_factors(plan, coeff.detach())
        if isinstance(plan, FourierPlan):
            if plan.cas_scale is not None:
                return _cas_factors(plan, coeff.detach())
            return _fourier_factors(plan, plan.atom_weights(coeff.detach()))
    raise TypeError(f"export: no LoRA form for plan {type(plan).__name__}")


def _pick_side(row_groups: int, col_groups: int) -> str:
    return "row" if row_groups <= col_groups else "column"


def _spectral_synthesis(groups: torch.Tensor, freq: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Y[g, q] = Σ_{a in group g} values_a·e^{+i2π·freq_a·q/size} (G, size) complex128, one inverse FFT."""
    spectrum = torch.zeros(int(groups.max()) + 1 if groups.numel() else 0, size, dtype=torch.complex128)
    flat = torch.view_as_real(spectrum).view(-1, 2)
    flat.index_add_(0, groups * size + freq, torch.view_as_real(values.to(torch.complex128)))
    return torch.fft.ifft(spectrum, dim=1, norm="forward")


def _fold(freq: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(f, size − f), +1/−1): frequencies f and size − f share the real atoms cos and ±sin."""
    folded = torch.minimum(freq, (size - freq) % size)
    return folded, torch.where(freq <= size // 2, 1.0, -1.0).double()


def _real_atom_count(freq: torch.Tensor, size: int) -> int:
    folded = torch.unique(_fold(freq, size)[0])
    return int(2 * folded.numel() - ((folded == 0) | (2 * folded == size)).sum())


def _complex_side(k, l, z, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Re Σ_a z_a·e^{i2π(k_a·p/m + l_a·q/n)} = B·A grouped by the row frequencies k."""
    folded, sign = _fold(k, m)
    freqs, group = torch.unique(folded, return_inverse=True)
    y_cos = _spectral_synthesis(group, l, z, n)
    y_sin = _spectral_synthesis(group, l, z * sign, n)
    has_sin = (freqs != 0) & (2 * freqs != m)
    angle = (torch.outer(torch.arange(m), freqs) % m).double() * (2 * math.pi / m)
    b = torch.cat([angle.cos(), angle.sin()[:, has_sin]], 1)
    # Re(z·e^{iβ}·(cos α + i·s·sin α)) = cos α·Re(z·e^{iβ}) − s·sin α·Im(z·e^{iβ})
    a = torch.cat([y_cos.real, -y_sin.imag[has_sin]], 0)
    return b, a


def _fourier_factors(plan: FourierPlan, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    m, n = plan.shape
    zc = torch.complex(z[:, 0].double(), z[:, 1].double())
    k, l = plan.k.long().cpu(), plan.l.long().cpu()
    zc = zc.cpu()
    side = _pick_side(_real_atom_count(k, m), _real_atom_count(l, n))
    if side == "row":
        b, a = _complex_side(k, l, zc, m, n)
        return b, a, side
    bt, at = _complex_side(l, k, zc, n, m)  # ΔWᵀ has the same form with rows and columns swapped
    return at.t(), bt.t(), side


def _cas_side(k, l, c, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j c_j·cas(2πk_j p/m)·cas(2πl_j q/n) = B·A grouped by k (cas θ = Re y + Im y of a complex exponential)."""
    freqs, group = torch.unique(k, return_inverse=True)
    y = _spectral_synthesis(group, l, c.to(torch.complex128), n)
    return cas(freqs, m, torch.float64), y.real + y.imag


def _cas_factors(plan: FourierPlan, coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    m, n = plan.shape
    k, l = plan.cas_rows.long().cpu(), plan.cas_cols.long().cpu()
    c = coeff.double().cpu() * plan.cas_scale
    side = _pick_side(torch.unique(k).numel(), torch.unique(l).numel())
    if side == "row":
        b, a = _cas_side(k, l, c, m, n)
        return b, a, side
    bt, at = _cas_side(l, k, c, n, m)
    return at.t(), bt.t(), side


def _sparse_side(k, own_taps, other_taps, c, own_size: int, other_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j c_j·atom(k_j)·atom'(l_j)ᵀ grouped by k: B = the distinct atoms, A[g] = Σ_{j in g} c_j·atom'(l_j)."""
    _, group = torch.unique(k, return_inverse=True)
    count = int(group.max()) + 1 if group.numel() else 0
    rep = torch.zeros(count, dtype=torch.long).scatter_(0, group, torch.arange(k.numel()))
    index, weight = (t.cpu() for t in own_taps)
    b = torch.zeros(own_size, count, dtype=torch.float64)
    for t in range(index.shape[0]):
        b.index_put_((index[t, rep], torch.arange(count)), weight[t, rep].double(), accumulate=True)
    index, weight = (t.cpu() for t in other_taps)
    a = torch.zeros(count, other_size, dtype=torch.float64)
    for t in range(index.shape[0]):
        a.index_put_((group, index[t]), c * weight[t].double(), accumulate=True)
    return b, a


def _sparse_factors(plan: SparsePlan, coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    m, n = plan.shape
    k, l = plan.k.long().cpu(), plan.l.long().cpu()
    c = coeff.double().cpu() * plan.scale
    side = _pick_side(torch.unique(k).numel(), torch.unique(l).numel())
    if side == "row":
        b, a = _sparse_side(k, plan.row_taps, plan.col_taps, c, m, n)
        return b, a, side
    bt, at = _sparse_side(l, plan.col_taps, plan.row_taps, c, n, m)
    return at.t(), bt.t(), side


# ---------------------------------------------------------------------------------------------------- truncation
def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` approximation of B·A, as (B', A', relative Frobenius error), through QR of B and Aᵀ
    and an SVD of the small core R_B·R_Aᵀ; the singular values are split evenly between the two factors."""
    b, a = b.double(), a.double()
    q1, r1 = torch.linalg.qr(b)
    q2, r2 = torch.linalg.qr(a.t())
    u, s, vh = torch.linalg.svd(r1 @ r2.t())
    total = float(s.pow(2).sum())
    dropped = float(s[rank:].pow(2).sum())
    root = s[:rank].sqrt()
    b_out = q1 @ (u[:, :rank] * root)
    a_out = (root[:, None] * vh[:rank]) @ q2.t()
    return b_out, a_out, math.sqrt(dropped / total) if total > 0 else 0.0


def _round_rank(rank: int, sizes: tuple[int, ...] | None) -> int:
    if sizes is None:
        return rank
    fitting = [s for s in sorted(sizes) if s >= rank]
    if not fitting:
        raise ValueError(f"export_lora: rank {rank} exceeds the largest accepted rank {max(sizes)}")
    return fitting[0]


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names when they select exactly the adapted modules (the usual LoRA config), else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in leaves
                and (isinstance(m, SpectralLinear) or weights.is_supported_base(m)) and not n.endswith(".base_layer")}
    return leaves if selected == set(names) else sorted(names)


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
