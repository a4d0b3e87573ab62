"""Bounds that give the coverage part's captured fractions a scale: per basis, what the best n-position support
could hold of the gradient G, what a uniformly random support holds in expectation, what LoRA r=1 reaches at its
actual random initialisation, and how far SSH's W0-energy positions overlap the gradient's own top positions.

    .venv/bin/python -m benchmarks.quality bounds    # after `coverage` (reuses its cached G, else ~15 min)

For a basis {φ_k} in which a method's ΔW = Σ_{k∈S} c_k φ_k, the captured fraction of G by the span of S is
‖P_S(G)‖²/‖G‖². When the φ_k are orthogonal this is Σ_{k∈S} ⟨G, φ_k⟩²/‖φ_k‖² / ‖G‖², so the best support of n
positions is the n largest terms (`oracle_capture`): an oracle, chosen after seeing G, which no method that fixes
its positions blind can exceed. A uniformly random support holds n/(m·n) in expectation (every term's mean is
‖G‖²/(m·n)). LoRA r=1's tangent space at its initialisation (B = 0, A = a) is {b·aᵀ}, which holds ‖G·â‖²/‖G‖²;
its best rank-1 figure σ₁²/‖G‖² (the coverage part's "LoRA" row) is the same kind of oracle as the top-n support.

Per-term energies: SSH (Hartley), SHiRA (identity) and WaveFT (Haar) through the library's own ΔW (Jᵀ·G by
autograd on a layer holding every position; orthonormality is checked by Parseval and stored). FourierFT (real
coefficients on ifft2 atoms: only the cosine of each conjugate pair is reachable) and LFMA (complex coefficients:
cosine and sine of a pair) in closed form from fft2(G).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from benchmarks import quality_common as qc
from launch.rundir import atomic_write_json

BASIS_LABELS = {"ssh": "Hartley (SSH)", "fourierft": "Fourier, real coefficients (FourierFT)",
                "lfma": "Fourier, complex coefficients (LFMA)", "waveft": "Haar wavelet (WaveFT)",
                "shira": "identity (SHiRA)"}

MEASURED = {"ssh": ("SSH δ=0", "SSH δ=0.7", "SSH δ=1"), "fourierft": ("FourierFT",),
            "lfma": ("LFMA random mask", "LFMA top-k", "LFMA half-spectrum"), "waveft": ("WaveFT",),
            "shira": ("SHiRA",)}
"""Coverage-part variants whose measured capture sits beside each basis's bounds."""

PAGE_TEXT = ("Per basis, the oracle is the best any support of n positions could capture of G: the n largest "
             "per-position energies ⟨G, φ_k⟩²/‖φ_k‖² (the bases are orthogonal; FourierFT's real coefficients "
             "reach only the cosine of each conjugate pair, LFMA's complex ones cosine and sine, n/2 of them). It "
             "is chosen after seeing G, as LoRA's SVD figure is. A uniformly random support holds n/(m·n) in "
             "expectation in any orthonormal basis, so random supports cannot separate the sparse methods except "
             "by their variance; what separates them is how close a rule that fixes positions without seeing G "
             "gets to the oracle. `python -m benchmarks.quality bounds`; tests/test_quality_bench.py checks the "
             "oracle against every support of a small matrix.")

LIBRARY_BASES = ("ssh", "shira", "waveft")
"""Orthonormal bases (up to the method's scaling) measured through sspeft's own ΔW."""

FOURIER_BASES = ("fourierft", "lfma")


def _one_layer(weight: torch.Tensor, method: str, name: str = "w"):
    """An sspeft layer on a copy of `weight` holding every position of its coefficient grid, coefficients zero."""
    import sspeft
    from sspeft.methods import coefficient_grid

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    tree = torch.nn.Module()
    tree.add_module(name, linear)
    probe = sspeft.SpectralConfig(method=method, n=1, target_modules=[name])
    rows, cols = coefficient_grid(probe, tuple(weight.shape))
    opts = {"delta": 0.0} if method == "ssh" else {}
    cfg = sspeft.SpectralConfig(method=method, n=rows * cols, target_modules=[name], init="zeros", **opts)
    sspeft.inject(tree, cfg)
    layer = sspeft.adapted_layers(tree)[name]
    with torch.no_grad():
        layer.coefficients.zero_()
    return layer, (rows, cols)


def library_energies(method: str, grad: torch.Tensor, weight: torch.Tensor | None = None) -> dict:
    """{"energy": (rows, cols) ⟨G, φ_k⟩²/‖φ_k‖² on the method's coefficient grid, "parseval": Σ energy / ‖G‖²}
    for an orthonormal-basis method (ssh, shira, waveft), from the library's ΔW of a layer holding every position.
    ‖φ_k‖ is measured on one atom (the basis is orthonormal up to the method's scaling)."""
    if method not in LIBRARY_BASES:
        raise ValueError(f"method={method!r}; expected one of {LIBRARY_BASES}")
    layer, grid = _one_layer(weight if weight is not None else torch.zeros_like(grad), method)
    coef = layer.coefficients
    with torch.enable_grad():
        d = layer.delta_weight()
        jtg = torch.autograd.grad(d, coef, grad.to(d.dtype))[0].double()
    with torch.no_grad():
        coef.zero_()
        coef.view(-1)[0] = 1.0
        atom = float(layer.delta_weight().double().pow(2).sum())
        coef.zero_()
    energy = torch.zeros(grid, dtype=torch.float64)
    energy[layer.positions[0], layer.positions[1]] = jtg.view(-1).pow(2) / atom
    return {"energy": energy, "parseval": float(energy.sum() / grad.double().pow(2).sum())}


def fourier_energies(method: str, grad: torch.Tensor) -> torch.Tensor:
    """Captured energy of each conjugate pair {k, −k} of the m×n DFT grid (one entry per pair, the other entry 0):
    FourierFT reaches the cosine only, 2·Re(F_k)²/(m·n) (F_k²/(m·n) for a self-conjugate k); LFMA's complex
    coefficient reaches cosine and sine, 2·|F_k|²/(m·n) (|F_k|²/(m·n) self-conjugate). F = fft2(G)."""
    if method not in FOURIER_BASES:
        raise ValueError(f"method={method!r}; expected one of {FOURIER_BASES}")
    m, n = grad.shape
    f = torch.fft.fft2(grad.double())
    part = f.real.pow(2) if method == "fourierft" else f.abs().pow(2)
    flat = torch.arange(m * n).view(m, n)
    conj = ((-torch.arange(m)[:, None]) % m) * n + (-torch.arange(n)[None, :]) % n
    self_conj = flat == conj
    keep = flat <= conj  # one representative per pair
    return torch.where(keep, part * torch.where(self_conj, 1.0, 2.0) / (m * n), torch.zeros((), dtype=torch.float64))


def energies(method: str, grad: torch.Tensor) -> torch.Tensor:
    """Per-term captured energy of `grad` in the method's basis (see the module docstring)."""
    if method in FOURIER_BASES:
        return fourier_energies(method, grad)
    return library_energies(method, grad)["energy"]


def oracle_capture(energy: torch.Tensor, slots: int, total: float) -> float:
    """The best support of `slots` terms: the `slots` largest energies over ‖G‖² (orthogonal terms)."""
    flat = energy.flatten()
    return float(torch.topk(flat, min(slots, flat.numel())).values.sum() / total)


def slots(method: str, budget: int) -> int:
    """Positions a method gets for `budget` real scalars (an LFMA coefficient is complex: 2 scalars)."""
    return budget // 2 if method == "lfma" else budget


def lora_init_capture(grad: torch.Tensor, a: torch.Tensor) -> float:
    """‖G·â‖²/‖G‖²: the share of G in LoRA r=1's tangent space {b·aᵀ} at B = 0, A = a (a: in-features)."""
    g = grad.double()
    a = a.double().flatten()
    return float((g @ (a / a.norm())).pow(2).sum() / g.pow(2).sum())


def top_overlap(a: torch.Tensor, b: torch.Tensor, count: int) -> float:
    """|top-count(a) ∩ top-count(b)| / count over the flattened entries."""
    ta = set(torch.topk(a.flatten(), count).indices.tolist())
    tb = set(torch.topk(b.flatten(), count).indices.tolist())
    return len(ta & tb) / count


def energy_chosen_capture(grad_energy: torch.Tensor, w0_energy: torch.Tensor, count: int, total: float) -> float:
    """Captured fraction of the `count` positions of largest W0 energy (SSH δ = 1), from G's per-term energies."""
    idx = torch.topk(w0_energy.flatten(), count).indices
    return float(grad_energy.flatten()[idx].sum() / total)


def lora_a_vectors(tree, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """LoRA r=1's A at initialisation for every named Linear, drawn as part 2 draws it (PEFT, torch seed)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(tree)
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=1, lora_alpha=2, lora_dropout=0.0, target_modules=names), model)
    return {n: model.get_submodule(n).lora_A["default"].weight.detach()[0].clone() for n in names}


def module_bounds(grad: torch.Tensor, weight: torch.Tensor, budgets: list[int], lora_a: list[torch.Tensor]) -> dict:
    """Every bound of one module at each budget (see the module docstring)."""
    total = float(grad.double().pow(2).sum())
    m, n = grad.shape
    out = {"shape": [m, n], "lora_oracle": float(torch.linalg.svdvals(grad.double())[0] ** 2 / total),
           "lora_init": [lora_init_capture(grad, a) for a in lora_a], "budgets": {}}
    per_basis, parseval = {}, {}
    for method in LIBRARY_BASES:
        e = library_energies(method, grad, weight)
        per_basis[method], parseval[method] = e["energy"], e["parseval"]
    for method in FOURIER_BASES:
        per_basis[method] = fourier_energies(method, grad)
    out["parseval"] = parseval
    from sspeft.transforms import dht2

    w0_hartley = dht2(weight.double(), "standard", "ortho").pow(2)
    g_hartley = per_basis["ssh"]
    w0_fourier = torch.fft.fft2(weight.double()).abs()
    g_fourier = torch.fft.fft2(grad.double()).abs()
    for b in budgets:
        out["budgets"][str(b)] = {
            "random": b / (m * n),
            "oracle": {k: oracle_capture(e, slots(k, b), total) for k, e in per_basis.items()},
            "ssh_energy_chosen": energy_chosen_capture(g_hartley, w0_hartley, b, total),
            "overlap_hartley": top_overlap(w0_hartley, g_hartley, b),
            "overlap_fourier": top_overlap(w0_fourier, g_fourier, slots("lfma", b)),
        }
    return out


def run(setup: qc.Setup, cfg, results: Path, cache: Path, progress=print) -> Path:
    """The bounds of every q,v module of the coverage part's G at its budgets, written to
    results/bounds.json (G from the coverage part's cache, recomputed when absent)."""
    from benchmarks import quality_coverage as qcov

    settings = qc.settings_of(setup, coverage=cfg)
    model, tok = qc.load_model(setup)
    splits = qc.load_splits(setup, tok)
    first = qc.first_adapted_layer(model, setup)
    names = qc.target_names(model, setup)
    grad, _ = qcov.cached_gradient(model, splits, names, first, setup, cfg, cache, settings, progress)
    tree = qcov.skeleton(model, names)
    r1 = qcov.lora_r1_budget(tree, names)
    budgets = [round(mult * r1) for mult in cfg.budget_multiples]
    a_by_seed = [lora_a_vectors(tree, names, seed) for seed in cfg.seeds]
    modules = {}
    for name in names:
        weight = tree.get_submodule(name).weight.detach()
        modules[name] = module_bounds(grad[name], weight, budgets, [a[name] for a in a_by_seed])
        progress(f"[bounds] {name}: oracle SSH {modules[name]['budgets'][str(r1)]['oracle']['ssh']:.4f}")
    path = results / "bounds.json"
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"settings": settings, "budgets": budgets, "lora_seeds": list(cfg.seeds),
                             "modules": modules})
    return path


def summary(bounds: dict) -> dict:
    """Means over modules: {budget: {"random", "oracle": {basis: …}, "ssh_energy_chosen", "overlap_*"}},
    plus "lora_oracle" and "lora_init" (per seed)."""
    mods = list(bounds["modules"].values())

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs)

    out = {"lora_oracle": mean(m["lora_oracle"] for m in mods),
           "lora_init": [mean(m["lora_init"][i] for m in mods) for i in range(len(bounds["lora_seeds"]))],
           "parseval": {k: (min(m["parseval"][k] for m in mods), max(m["parseval"][k] for m in mods))
                        for k in LIBRARY_BASES}, "budgets": {}}
    for b in map(str, bounds["budgets"]):
        rows = [m["budgets"][b] for m in mods]
        out["budgets"][b] = {"random": mean(r["random"] for r in rows),
                             "oracle": {k: mean(r["oracle"][k] for r in rows) for k in rows[0]["oracle"]},
                             **{k: mean(r[k] for r in rows) for k in ("ssh_energy_chosen", "overlap_hartley",
                                                                      "overlap_fourier")}}
    return out


def load(results: Path) -> dict | None:
    path = results / "bounds.json"
    return json.loads(path.read_text()) if path.is_file() else None
