"""Part 1 of the quality benchmark: how much of a real fine-tuning signal each method's support can hold, without
training any adapter.

Two signals of SmolLM2 on Alpaca training records:
  * G, the q,v weight gradient of the mean response loss over `n_grad` records, in every decoder layer;
  * ΔW_FT, a short full fine-tune of q,v in the top layers (AdamW, frozen layers below cached).

Every method in sspeft is linear in its trainable scalars c: ΔW = J·c with J fixed by the positions. Its support
holds the orthogonal projection P(T) = J(JᵀJ)⁺JᵀT of a target T, so the captured fraction is ‖P(T)‖²/‖T‖²
(for an orthonormal transform: Σ over the chosen positions of the transformed target², /‖T‖²). J and Jᵀ are taken
from the library itself (`SpectralLinear.delta_weight` and its autograd), so whatever construction sspeft uses is
what is measured; the projection is solved by conjugate gradients. LoRA-r holds the best rank-r approximation
(Σ_{i≤r} σᵢ²). An LFMA mask of k random frequencies (the top-k rule's control) is projected in closed form with
the FFT. Then W0 + η·P(ΔW_FT) is scored: η chosen on the validation records, the loss reported on the test ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import quality_common as qc
from launch.rundir import atomic_file, atomic_write_json

@dataclass
class CoverageConfig:
    """Sizes of part 1 (the setup's split is shared with part 2)."""

    budget_multiples: tuple[float, ...] = (0.25, 1.0, 4.0)
    """Budgets in trainable real scalars per module, as multiples of LoRA-r1's mean over the targets (on SmolLM2
    q,v: ((576+576) + (576+192)) / 2 = 960, so 240, 960 and 3840)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Position seeds."""
    n_grad: int = 384
    """Training records whose gradient is accumulated."""
    ft_steps: int = 16
    """Full fine-tune steps over the gradient records (batch = setup.batch_size records each, in split order)."""
    ft_lr: float = 1e-4
    eta_evals: int = 16
    """Validation evaluations per η line search (at most); a search that runs out reports its η as at the edge."""
    eta_growth: float = 4.0
    """Factor by which the η search steps out from η = 1 until the validation loss rises."""
    cg_iters: int = 60
    cg_tol: float = 1e-6
    """Relative residual at which the projection's conjugate gradients stop."""


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str
    """lora | sspeft | fourier-random"""
    method: str = ""
    options: tuple = ()
    """sspeft SpectralConfig fields as (key, value) pairs; `n` is set from the budget."""
    complex_coef: bool = False
    """LFMA: a coefficient is complex (2 real scalars), so n = budget / 2."""


VARIANTS = (  # the coverage claims' pairs first
    Variant("LFMA top-k", "sspeft", "lfma", (), True),
    Variant("LFMA random mask", "fourier-random", complex_coef=True),
    Variant("WaveFT", "sspeft", "waveft"),
    Variant("SHiRA", "sspeft", "shira"),
    Variant("SSH δ=0.7", "sspeft", "ssh", (("delta", 0.7),)),
    Variant("SSH δ=0", "sspeft", "ssh", (("delta", 0.0),)),
    Variant("SSH δ=1", "sspeft", "ssh", (("delta", 1.0),)),
    Variant("LoRA", "lora"),
    Variant("LFMA half-spectrum", "sspeft", "lfma", (("half_spectrum", True),), True),
    Variant("FourierFT", "sspeft", "fourierft"),
)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("δ", "delta").replace(".", "")).strip("-")


# ---------------------------------------------------------------------------------------------------- signals
def accumulate_gradient(model, data: qc.Encoded, names: list[str], n_grad: int, batch_size: int,
                        first_layer: int) -> tuple[dict, list]:
    """({module name: ∂(mean response loss over the first n_grad records)/∂W}, per record the hidden states
    entering decoder layer `first_layer`, captured on the way). Batches group records of similar length (the
    gradient is a sum, so order does not matter; less padding is cheaper)."""
    modules = dict(model.named_modules())
    index = sorted(range(min(n_grad, len(data))), key=lambda i: len(data.ids[i]))
    total = sum(sum(1 for t in data.labels[i][1:] if t != -100) for i in index)
    stems: dict[int, torch.Tensor] = {}
    batch: list[int] = []

    def grab(_module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).detach()
        for row, i in enumerate(batch):
            stems[i] = hidden[row, :len(data.ids[i])].clone()

    handle = model.model.layers[first_layer].register_forward_pre_hook(grab, with_kwargs=True)
    for name in names:
        modules[name].weight.requires_grad_(True)
        modules[name].weight.grad = None
    try:
        for start in range(0, len(index), batch_size):
            batch[:] = index[start:start + batch_size]
            sums, _ = qc.batch_losses(model, data, batch, None)
            (sums.sum() / total).backward()
    finally:
        handle.remove()
    out = {}
    for name in names:
        w = modules[name].weight
        out[name] = w.grad.detach().clone()
        w.grad = None
        w.requires_grad_(False)
    return out, [stems[i] for i in range(len(index))]


def full_finetune(model, data: qc.Encoded, stems, names: list[str], cfg: CoverageConfig, batch_size: int,
                  progress=print) -> tuple[dict, list[float]]:
    """ΔW of a plain AdamW full fine-tune of the named weights (model with lower layers dropped, stems given)."""
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.ft_lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(cfg.ft_steps):
        index = [(step * batch_size + i) % len(data) for i in range(batch_size)]
        sums, tokens = qc.batch_losses(model, data, index, stems)
        loss = sums.sum() / tokens.sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"full fine-tune: non-finite loss at step {step}")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0:
            progress(f"  full fine-tune step {step + 1}/{cfg.ft_steps}: loss {sum(losses[-10:]) / 10:.4f}")
    model.eval()
    delta = {}
    with torch.no_grad():
        for n, p, w0 in zip(names, params, start):
            delta[n] = (p.detach() - w0).clone()
            p.copy_(w0)
            p.requires_grad_(False)
    return delta, losses


# ---------------------------------------------------------------------------------------------------- supports
def skeleton(model, names: list[str]) -> torch.nn.Module:
    """A module tree holding copies of the named Linears under the same names (sspeft seeds positions by name)."""
    root = torch.nn.Module()
    modules = dict(model.named_modules())
    for name in names:
        parent = root
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], copy.deepcopy(modules[name]))
    return root


def variant_config(v: Variant, budget: int, seed: int):
    """The sspeft SpectralConfig of a variant at a budget (None when the budget has no such config)."""
    import sspeft

    n = budget // 2 if v.complex_coef else budget
    return sspeft.SpectralConfig(method=v.method, n=n, seed=seed, target_modules=["q_proj", "v_proj"],
                                 **dict(v.options))


class LibraryProjector:
    """Projection onto the span of one sspeft layer's ΔW(c) (J and Jᵀ from the layer, solved by CG)."""

    def __init__(self, layer, cfg: CoverageConfig):
        self.layer, self.cfg = layer, cfg
        self.coef = layer.coefficients
        self.positions = layer.positions
        with torch.no_grad():
            self.coef.zero_()
            if layer.delta_weight().abs().max() != 0:
                raise ValueError(f"{type(layer).__name__}: ΔW(0) ≠ 0, so the method is not linear in its coefficients")

    def J(self, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.coef.copy_(v.to(self.coef.dtype).view_as(self.coef))
            return self.layer.delta_weight().double()

    def Jt(self, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            d = self.layer.delta_weight()
            return torch.autograd.grad(d, self.coef, u.to(d.dtype))[0].double().flatten()

    def project(self, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(P(target), {iterations, relative residual})."""
        b = self.Jt(target)
        x, r = torch.zeros_like(b), b.clone()
        p, rs, b_norm = r.clone(), float(r @ r), float(b.norm())
        it = 0
        for it in range(1, self.cfg.cg_iters + 1):
            if b_norm == 0 or math.sqrt(rs) <= self.cfg.cg_tol * b_norm:
                it -= 1
                break
            ap = self.Jt(self.J(p))
            alpha = rs / float(p @ ap)
            x += alpha * p
            r -= alpha * ap
            rs_new = float(r @ r)
            p = r + (rs_new / rs) * p
            rs = rs_new
        return self.J(x), {"cg_iterations": it, "cg_residual": math.sqrt(rs) / b_norm if b_norm else 0.0}


class LoraProjector:
    """Best rank-r approximation (truncated SVD)."""

    def __init__(self, rank: int):
        self.rank = rank

    def project(self, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        u, s, vh = torch.linalg.svd(target.double(), full_matrices=False)
        r = self.rank
        return (u[:, :r] * s[:r]) @ vh[:r], {"sigma": s[:r].tolist()}


class FourierMaskProjector:
    """Projection onto Re(Σ c_kl·e^{i2π(kp/m+lq/n)}) with complex c on a frequency set S (LFMA's span): the
    real matrices whose 2-D spectrum is zero outside S ∪ −S."""

    def __init__(self, positions: torch.Tensor, shape: tuple[int, int]):
        m, n = shape
        self.positions = positions
        mask = torch.zeros(m, n, dtype=torch.bool)
        mask[positions[0], positions[1]] = True
        mask[(-positions[0]) % m, (-positions[1]) % n] = True
        self.mask = mask

    def project(self, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        spectrum = torch.fft.fft2(target.double()) * self.mask
        return torch.fft.ifft2(spectrum).real, {"frequencies": int(self.mask.sum())}


def random_mask_positions(name: str, shape: tuple[int, int], count: int, seed: int) -> torch.Tensor:
    """(2, count) distinct uniformly random frequencies of an m×n grid, seeded by the seed and the module name."""
    key = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:12], 16)
    flat = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(key))[:count]
    return torch.stack([flat // shape[1], flat % shape[1]])


def lora_r1_budget(tree, names: list[str]) -> int:
    """LoRA-r1's trainable scalars per module, averaged over the targets: mean of (out + in)."""
    return round(sum(sum(tree.get_submodule(n).weight.shape) for n in names) / len(names))


def projectors(v: Variant, mult: float, seed: int, tree, names: list[str], cfg: CoverageConfig) -> dict | None:
    """{module name: projector} of a variant at a budget of `mult` × LoRA-r1's, or None when the budget is not
    reachable (LoRA at a fractional rank)."""
    budget = round(mult * lora_r1_budget(tree, names))
    if v.kind == "lora":
        if mult != int(mult):
            return None
        return {n: LoraProjector(int(mult)) for n in names}
    if v.kind == "fourier-random":
        shapes = {n: tuple(tree.get_submodule(n).weight.shape) for n in names}
        return {n: FourierMaskProjector(random_mask_positions(n, shapes[n], budget // 2, seed), shapes[n])
                for n in names}
    import sspeft

    adapted = copy.deepcopy(tree)
    sspeft.inject(adapted, variant_config(v, budget, seed))
    layers = sspeft.adapted_layers(adapted)
    return {n: LibraryProjector(layers[n], cfg) for n in names}


def support_key(proj: dict) -> str:
    """Fingerprint of a variant's supports (equal for seeds that choose the same positions)."""
    h = hashlib.sha256()
    for name in sorted(proj):
        p = proj[name]
        h.update(name.encode())
        if isinstance(p, LoraProjector):
            h.update(f"lora{p.rank}".encode())
        else:
            h.update(p.positions.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- scoring
def capture(proj: dict, targets: dict[str, torch.Tensor]) -> dict:
    """Per module: captured fraction ‖P(T)‖²/‖T‖² and ⟨P(T),T⟩/‖T‖² (equal for an exact projection)."""
    out = {}
    for name, target in targets.items():
        p, info = proj[name].project(target)
        energy = float(target.double().pow(2).sum())
        out[name] = {"fraction": float(p.pow(2).sum()) / energy, "inner": float((p * target.double()).sum()) / energy,
                     "energy": energy, **info}
    return out


def summarize(per_module: dict) -> dict:
    fr = [m["fraction"] for m in per_module.values()]
    total = sum(m["energy"] for m in per_module.values())
    return {"mean_fraction": sum(fr) / len(fr),
            "energy_fraction": sum(m["fraction"] * m["energy"] for m in per_module.values()) / total,
            "q_mean": _mean([m["fraction"] for n, m in per_module.items() if n.endswith("q_proj")]),
            "v_mean": _mean([m["fraction"] for n, m in per_module.items() if n.endswith("v_proj")])}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


class Scorer:
    """Held-out loss of W0 + η·D on the top layers (lower layers cached), D a dict of ΔW per module."""

    def __init__(self, model, names: list[str], splits: dict, stems: dict, batch_size: int, max_evals: int = 16,
                 growth: float = 4.0):
        self.model, self.names, self.splits, self.stems, self.bs = model, names, splits, stems, batch_size
        self.max_evals, self.growth = max_evals, growth
        mods = dict(model.named_modules())
        self.weights = {n: mods[n].weight for n in names}
        self.w0 = {n: w.detach().clone() for n, w in self.weights.items()}
        self.evals = 0

    def loss(self, delta: dict | None, eta: float, split: str) -> dict:
        with torch.no_grad():
            for n, w in self.weights.items():
                w.copy_(self.w0[n] + (eta * delta[n]).to(w.dtype) if delta is not None else self.w0[n])
        try:
            self.evals += 1
            return qc.record_losses(self.model, self.splits[split], self.stems[split], self.bs)
        finally:
            with torch.no_grad():
                for n, w in self.weights.items():
                    w.copy_(self.w0[n])

    def line_search(self, delta: dict) -> dict:
        """η minimising the validation loss: from η = 1, steps of ×growth (or ÷growth if the first step is worse)
        until the loss rises, then ×2 and ×√2 refinements on each side of the best point, within `max_evals`
        validation evaluations. Returns the η, its validation and test losses, the evaluated points, whether the
        best η is an end of them (`eta_at_edge`: the optimum was not bracketed) and the search's own settings."""
        val = {}

        def f(eta):
            if eta not in val and len(val) < self.max_evals:
                val[eta] = self.loss(delta, eta, "val")["loss"]
            return val.get(eta, math.inf)

        g = self.growth
        direction = g if f(g) < f(1.0) else 1 / g
        eta = g if direction == g else 1.0
        while len(val) < self.max_evals and f(eta * direction) < f(eta):
            eta *= direction
        for step in (2.0, math.sqrt(2)):
            best = min(val, key=val.get)
            for e in (best * step, best / step):
                f(e)
        best = min(val, key=val.get)
        test = self.loss(delta, best, "test")
        return {"eta": best, "val_loss": val[best], "test_loss": test["loss"], "test_sums": test["sums"],
                "points": sorted(val.items()), "eta_at_edge": best in (min(val), max(val)), "search": self.spec}

    @property
    def spec(self) -> dict:
        """The settings a stored η search was made with (a search made under others is redone)."""
        return {"max_evals": self.max_evals, "growth": self.growth}


def project_all(proj: dict, delta: dict) -> dict:
    return {n: proj[n].project(d)[0].float() for n, d in delta.items()}


# ---------------------------------------------------------------------------------------------------- the run
def run(setup: qc.Setup, cfg: CoverageConfig, results: Path, cache: Path, progress=print,
        variants: tuple = VARIANTS, only: list[str] | None = None) -> dict:
    """Part 1, in three phases so a run cut short keeps the most: (1) the gradient's captured fractions for every
    (variant, budget, seed), LoRA-r1's budget first; (2) the full fine-tune and the base losses; (3) per record,
    the ΔW_FT fractions and the η search. One JSON per (variant, budget, seed), rewritten as phases complete;
    a rerun skips what is stored under the same settings. `only`: the variant labels this process measures
    (processes with disjoint labels share the work). Returns {"written": n, "skipped": n}."""
    if only is not None:
        qc.check_labels(only, [v.label for v in variants])
        variants = tuple(v for v in variants if v.label in only)
    torch.manual_seed(0)
    results.mkdir(parents=True, exist_ok=True)
    settings = qc.settings_of(setup, coverage=cfg)
    model, tok = qc.load_model(setup)
    splits = qc.load_splits(setup, tok)
    first = qc.first_adapted_layer(model, setup)
    all_names = qc.target_names(model, setup)
    top_names = qc.target_names(model, setup, first)
    grad, train_stems = cached_gradient(model, splits, all_names, first, setup, cfg, cache, settings, progress)
    tree = skeleton(model, all_names)
    r1 = lora_r1_budget(tree, all_names)
    plan = [(mult, v, seed) for mult in sorted(cfg.budget_multiples, key=lambda m: (m != 1.0, m))
            for v in variants for seed in cfg.seeds]
    written = skipped = 0
    same: dict[str, dict] = {}  # seeds that choose the same positions everywhere share one projection
    for mult, v, seed in plan:  # phase 1
        budget = round(mult * r1)
        path = results / f"{slug(v.label)}_b{budget}_s{seed}.json"
        if _stored(path, settings):
            skipped += 1
            continue
        proj = projectors(v, mult, seed, tree, all_names, cfg)
        if proj is None:
            continue
        everywhere = v.label + support_key(proj)  # methods sharing a seed draw the same positions
        g = same[everywhere] if everywhere in same else capture(proj, grad)
        same[everywhere] = g
        trainable = {n: _trainable(v, budget, proj[n], grad[n].shape) for n in proj}
        atomic_write_json(path, {"label": v.label, "kind": v.kind, "method": v.method, "options": dict(v.options),
                                 "budget": budget, "budget_multiple": mult, "seed": seed,
                                 "support": v.label + support_key({n: proj[n] for n in top_names}),
                                 "trainable_mean": sum(trainable.values()) / len(trainable),
                                 "grad": {**summarize(g), "modules": g}, "settings": settings})
        written += 1
        progress(f"[coverage] {v.label} budget {budget} seed {seed}: gradient {summarize(g)['mean_fraction']:.4f}")
    ft = _finetune(model, splits, train_stems, top_names, first, cfg, setup, cache, settings, progress)  # phase 2
    stems = {s: qc.compute_stems(model, splits[s], first) for s in ("val", "test")}
    qc.drop_lower_layers(model, first)
    scorer = Scorer(model, top_names, splits, stems, setup.batch_size, cfg.eta_evals, cfg.eta_growth)
    base = _base_record(results, settings, scorer, ft, splits, progress)
    searched: dict[str, dict] = {}
    for mult, v, seed in plan:  # phase 3
        path = results / f"{slug(v.label)}_b{round(mult * r1)}_s{seed}.json"
        if not path.is_file():
            continue
        rec = json.loads(path.read_text())
        if rec.get("eta_search", {}).get("search") == scorer.spec:
            continue
        proj = projectors(v, mult, seed, tree, top_names, cfg)
        f = capture(proj, ft["delta"])
        if rec["support"] not in searched:  # seeds that pick the same positions share one η search
            searched[rec["support"]] = scorer.line_search(project_all(proj, ft["delta"]))
        rec.update(ft={**summarize(f), "modules": f}, eta_search=searched[rec["support"]])
        atomic_write_json(path, rec)
        written += 1
        progress(f"[coverage] {v.label} budget {rec['budget']} seed {seed}: ΔW_FT {rec['ft']['mean_fraction']:.4f}, "
                 f"test loss {rec['eta_search']['test_loss']:.4f} (base {base['test_loss']:.4f})")
    return {"written": written, "skipped": skipped}


def _trainable(v: Variant, budget: int, projector, shape) -> int:
    if isinstance(projector, LoraProjector):
        return projector.rank * (shape[0] + shape[1])
    return 2 * (budget // 2) if v.complex_coef else budget


def _stored(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    try:
        return qc.same_settings(json.loads(path.read_text()).get("settings"), settings)
    except ValueError:
        return False


def _cached(path: Path, make):
    if path.is_file():
        return torch.load(path)
    value = make()
    with atomic_file(path) as tmp:
        torch.save(value, tmp)
    return value


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def cached_gradient(model, splits, all_names, first, setup, cfg, cache: Path, settings: dict, progress) -> tuple:
    """(G over all layers, the stems of the gradient records at the first adapted layer), cached under `cache`."""
    def make():
        t0 = time.time()
        progress(f"[coverage] accumulating the q,v gradient over {cfg.n_grad} records ({len(all_names)} modules)")
        out = accumulate_gradient(model, splits["train"], all_names, cfg.n_grad, setup.batch_size, first)
        progress(f"[coverage] gradient done in {time.time() - t0:.0f} s")
        return out
    return _cached(cache / f"coverage-grad-{_digest(settings['setup'], cfg.n_grad)}.pt", make)


def _finetune(model, splits, train_stems, top_names, first, cfg, setup, cache: Path, settings: dict,
              progress) -> dict:
    """ΔW_FT of the top layers over the gradient records (their stems reused), cached under `cache`."""
    def make():
        progress(f"[coverage] full fine-tune of {len(top_names)} modules, {cfg.ft_steps} steps")
        work = copy.deepcopy(model)
        qc.drop_lower_layers(work, first)
        data = _prefix(splits["train"], len(train_stems))
        delta, losses = full_finetune(work, data, train_stems, top_names, cfg, setup.batch_size, progress)
        return {"delta": delta, "losses": losses}
    return _cached(cache / f"coverage-ft-{_digest(settings['setup'], cfg.n_grad, cfg.ft_steps, cfg.ft_lr)}.pt", make)


def _prefix(data: qc.Encoded, n: int) -> qc.Encoded:
    return qc.Encoded(data.ids[:n], data.labels[:n], data.source[:n], data.dropped)


def _base_record(results: Path, settings: dict, scorer: Scorer, ft: dict, splits: dict, progress) -> dict:
    path = results / "base.json"
    if _stored(path, settings):
        rec = json.loads(path.read_text())
        if rec["full_ft"].get("search") != scorer.spec:  # an η search made under other search settings
            rec.update(full_ft=scorer.line_search(ft["delta"]), settings=settings)
            atomic_write_json(path, rec)
        return rec
    base_val = scorer.loss(None, 0.0, "val")
    base_test = scorer.loss(None, 0.0, "test")
    full = scorer.line_search(ft["delta"])
    rec = {"settings": settings, "val_loss": base_val["loss"], "test_loss": base_test["loss"],
           "test_sums": base_test["sums"], "test_tokens": base_test["tokens"], "full_ft": full,
           "ft_losses": ft["losses"],
           "records": {k: {"n": len(v), "dropped": v.dropped, "source": v.source} for k, v in splits.items()}}
    atomic_write_json(path, rec)
    progress(f"[coverage] base test loss {rec['test_loss']:.4f}; full q,v fine-tune of the top layers "
             f"{full['test_loss']:.4f} at η {full['eta']:g}")
    return rec
