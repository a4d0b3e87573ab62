"""Part 2 of the quality benchmark: matched training of every adapter on q,v of the top decoder layers.

Each run trains one adapter with plain AdamW (linear warmup over 10 % of the steps, then constant) on the training
records in a seeded order, and scores every validation and test record. Learning rates are multiples of each
method's grid centre (`GRID_CENTRE`: a fixed effective step size per method, absorbing the methods' scalings), on a
grid of factor 3; a method's grid starts at ×⅓, ×1, ×3 of it and is extended past an edge whenever the best validation
loss lies on that edge, so every chosen lr is an interior optimum. The lr chosen on seed 0's validation loss is then
run with the other seeds (a seed sets both the data order and the adapter's positions / initial values; `--seeds`
adds more at the chosen lr). Contrasts are judged by `quality_verdicts` over seeds and test records together.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import sspeft
from benchmarks import quality_common as qc
from launch.rundir import atomic_file, atomic_write_json
from sspeft.model import is_adapter_layer

RANK_TOL = 1e-3
"""ΔW numerical rank counts singular values above RANK_TOL·σmax."""


@dataclass
class TrainConfig:
    steps: int = 60
    """Optimizer steps of every run (setup.batch_size records each)."""
    seeds: tuple[int, ...] = (0, 1)
    budget_multiple: int = 1
    """Trainable real scalars per module as a multiple of LoRA-r1's mean over the targets (960 on SmolLM2 q,v);
    LoRA runs at this rank."""
    grid_factor: float = 3.0
    max_extensions: int = 4
    """Grid points added past an edge, per side, before the method is reported with its optimum at the edge (a
    planning limit: results stored under another limit are reused)."""
    warmup_frac: float = 0.1


@dataclass(frozen=True)
class Method:
    label: str
    method: str
    """lora | an sspeft method | peft-fourierft"""
    lr0: float
    """The grid's ×1 point."""
    options: tuple = ()
    grid: bool = True
    """False: run at another method's chosen lr (`lr_from`) instead of a grid (equal-settings comparisons)."""
    lr_from: str = ""


GRID_CENTRE = {"ssh": 1e-2, "lfma": 1e-2, "waveft": 1e-3, "fourierft": 3e-2, "shira": 1e-3}
"""Each method's ×1 grid point: a fixed effective step size per method (the scalings differ by orders of magnitude),
kept constant so stored runs stay comparable; the library's suggested lrs (sspeft.METHOD_DEFAULTS) are set from the
lrs this part chooses."""


LIBRARY_LABELS = {"ssh": "SSH δ=0.7", "lfma": "LFMA", "waveft": "WaveFT", "fourierft": "FourierFT", "shira": "SHiRA"}
"""The part-2 method that runs each library method at its defaults: its chosen lr is the suggested lr."""


def methods(budget: int, r: int) -> list[Method]:
    """Every method of part 2 at `budget` scalars per module (LoRA at rank r), in the order they run: each
    contrast's pair together, the paper's headline claim (SSH vs LoRA) and the FourierFT fidelity check first."""
    lr = GRID_CENTRE
    return [
        Method("SSH δ=0.7", "ssh", lr["ssh"], (("n", budget), ("delta", 0.7))),
        Method("LoRA r=1", "lora", 1e-3, (("r", r), ("lora_alpha", 2 * r))),
        Method("FourierFT", "fourierft", lr["fourierft"], (("n", budget),)),
        # PEFT's FourierFT at sspeft's α (300) and at sspeft FourierFT's chosen lr: the same settings
        Method("PEFT FourierFT", "peft-fourierft", lr["fourierft"], (("n_frequency", budget), ("scaling", 300.0)),
               grid=False, lr_from="FourierFT"),
        # the init contrast: coefficients start at zero (ΔW = 0) instead of the paper's N(0, 1); run at the lr
        # FourierFT's random init chose
        Method("FourierFT zero init", "fourierft", lr["fourierft"], (("n", budget), ("init", "zeros")),
               grid=False, lr_from="FourierFT"),
        Method("WaveFT", "waveft", lr["waveft"], (("n", budget),)),
        Method("SHiRA", "shira", lr["shira"], (("n", budget),)),
        Method("LFMA", "lfma", lr["lfma"], (("n", budget // 2),)),
        # LFMA's positions in the rfft2 half spectrum (no conjugate pairs), at the lr full-spectrum top-k chose
        Method("LFMA half-spectrum", "lfma", lr["lfma"], (("n", budget // 2), ("half_spectrum", True)),
               grid=False, lr_from="LFMA"),
        Method("SSH δ=0", "ssh", lr["ssh"], (("n", budget), ("delta", 0.0))),
        Method("SSH δ=1", "ssh", lr["ssh"], (("n", budget), ("delta", 1.0))),
    ]


CONTRASTS = (
    ("SSH δ=0.7", "LoRA r=1", "SSH vs LoRA r=1 at an equal budget"),
    ("LFMA", "FourierFT", "LFMA (half the coefficients, complex) vs FourierFT"),
    ("WaveFT", "SHiRA", "WaveFT vs SHiRA at an equal budget"),
    ("SSH δ=0.7", "SSH δ=0", "SSH δ=0.7 vs δ=0 (all random)"),
    ("SSH δ=0.7", "SSH δ=1", "SSH δ=0.7 vs δ=1 (all by energy)"),
    ("FourierFT", "PEFT FourierFT", "sspeft FourierFT vs PEFT FourierFT at the same α and lr"),
)
"""(a, b, title): each reported as test loss a − b with a paired bootstrap interval (negative: a is better)."""


@dataclass
class Run:
    method: Method
    mult: float
    """lr = method.lr0 · mult"""
    seed: int

    @property
    def lr(self) -> float:
        return self.method.lr0 * self.mult

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.method.label.lower().replace("δ", "delta").replace(".", "")).strip("-")
        return f"{slug}_x{self.mult:.4g}_s{self.seed}"


# ---------------------------------------------------------------------------------------------------- planning
def grid_state(label: str, done: dict, cfg: TrainConfig) -> tuple[list[float], float | None]:
    """(multipliers still to run at seed 0, the chosen multiplier once the grid has an interior optimum or can
    grow no further)."""
    f = cfg.grid_factor
    start = [1 / f, 1.0, f]
    runs = {r["mult"]: r["val"]["loss"] for r in done.values() if r["label"] == label and r["seed"] == 0}
    missing = [m for m in start if not any(math.isclose(m, k) for k in runs)]
    if missing:
        return missing, None
    best = min(runs, key=runs.get)
    low, high = min(runs), max(runs)
    edge_ext = {math.isclose(best, low): best / f, math.isclose(best, high): best * f}.get(True)
    if edge_ext is not None and abs(math.log(edge_ext) / math.log(f)) <= 1 + cfg.max_extensions:
        return [edge_ext], None
    return [], best


def next_run(ms: list[Method], done: dict, cfg: TrainConfig) -> Run | None:
    """The next run in priority order, or None when the part is complete."""
    chosen = {}
    for m in ms:
        if m.grid:
            todo, best = grid_state(m.label, done, cfg)
            if todo:
                return Run(m, todo[0], cfg.seeds[0])
        else:
            best_of = chosen.get(m.lr_from)
            if best_of is None:
                continue  # its reference method has not chosen an lr yet
            best = best_of * ms_by_label(ms)[m.lr_from].lr0 / m.lr0
        chosen[m.label] = best
        for seed in cfg.seeds:
            run = Run(m, best, seed)
            if run.name not in done:
                return run
    return None


def ms_by_label(ms: list[Method]) -> dict[str, Method]:
    return {m.label: m for m in ms}


# ---------------------------------------------------------------------------------------------------- one run
def target_regex(setup: qc.Setup, first: int, n_layers: int) -> str:
    """A full-match regex sspeft and PEFT both accept for the targets in layers ≥ first."""
    layers = "|".join(str(i) for i in range(first, n_layers))
    return rf".*\.layers\.({layers})\..*\.({'|'.join(setup.targets)})"


def attach(model, m: Method, seed: int, targets: str):
    opts = dict(m.options)
    if m.method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # LoRA's A init
        return get_peft_model(model, LoraConfig(lora_dropout=0.0, target_modules=targets, **opts))
    if m.method == "peft-fourierft":
        from peft import FourierFTConfig, get_peft_model

        torch.manual_seed(seed)
        return get_peft_model(model, FourierFTConfig(target_modules=targets, random_loc_seed=seed, **opts))
    import sspeft

    return sspeft.inject(model, sspeft.SpectralConfig(method=m.method, target_modules=targets, seed=seed, **opts))


def lm_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def delta_ranks(model) -> list[int]:
    """Numerical rank of every adapted layer's ΔW (sspeft layers or PEFT tuner layers)."""
    out = []
    with torch.no_grad():
        for module in lm_of(model).modules():
            if isinstance(module, sspeft.SpectralLinear):
                d = module.delta_weight()
            elif is_adapter_layer(module) and module.active_adapters:  # a PEFT tuner layer (LoRA & co.)
                d = module.get_delta_weight(module.active_adapters[0])
            else:
                continue
            s = torch.linalg.svdvals(d.detach().double())
            out.append(int((s > RANK_TOL * s[0]).sum()) if s[0] > 0 else 0)
    return out


def train_run(base, run: Run, setup: qc.Setup, cfg: TrainConfig, splits: dict, stems: dict, targets: str,
              progress=print) -> dict:
    """Train one adapter on a copy of `base` (lower layers already dropped) and score it."""
    torch.manual_seed(run.seed)
    model = attach(copy.deepcopy(base), run.method, run.seed, targets)
    lm = lm_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0)
    train = splits["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + run.seed)).tolist()
    warm = max(1, round(cfg.warmup_frac * cfg.steps))
    losses, t0 = [], time.time()
    lm.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = run.lr * min(1.0, (step + 1) / warm)
        index = [order[(step * setup.batch_size + i) % len(order)] for i in range(setup.batch_size)]
        sums, tokens = qc.batch_losses(lm, train, index, stems["train"])
        loss = sums.sum() / tokens.sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"run {run.name}: non-finite training loss at step {step}")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.steps // 4) == 0:
            progress(f"  {run.name}: step {step + 1}/{cfg.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    train_s = time.time() - t0
    lm.eval()
    val = qc.record_losses(lm, splits["val"], stems["val"], setup.batch_size)
    test = qc.record_losses(lm, splits["test"], stems["test"], setup.batch_size)
    ranks = delta_ranks(model)
    return {"name": run.name, "label": run.method.label, "method": run.method.method,
            "options": dict(run.method.options), "mult": run.mult, "lr": run.lr, "seed": run.seed,
            "trainable": sum(p.numel() for p in params), "train_losses": losses, "val": val, "test": test,
            "delta_rank_mean": sum(ranks) / len(ranks) if ranks else None, "train_s": train_s}


# ---------------------------------------------------------------------------------------------------- the part
def load_done(results: Path, settings: dict) -> dict:
    out = {}
    for path in sorted(results.glob("*.json")):
        if path.name == "base.json":
            continue
        try:
            r = json.loads(path.read_text())
        except ValueError:
            continue
        if qc.same_settings(r.get("settings"), settings):
            out[r["name"]] = r
    return out


def run(setup: qc.Setup, cfg: TrainConfig, results: Path, cache: Path, progress=print, max_runs: int | None = None,
        ms: list[Method] | None = None, only: list[str] | None = None) -> dict:
    """Run part 2 (resuming from the results present); one JSON per run. `only`: the method labels this process
    runs (a method run at another's lr waits for that one's results, which another process may write). Returns
    {"written", "complete"}."""
    settings = qc.settings_of(setup, train=cfg)
    results.mkdir(parents=True, exist_ok=True)
    model, tok = qc.load_model(setup)
    splits = qc.load_splits(setup, tok)
    first = qc.first_adapted_layer(model, setup)
    names = qc.target_names(model, setup, first)
    r1 = round(sum(sum(model.get_submodule(n).weight.shape) for n in names) / len(names))
    ms = ms or methods(cfg.budget_multiple * r1, cfg.budget_multiple)
    if only is not None:
        qc.check_labels(only, [m.label for m in ms])
        ms = [m for m in ms if m.label in only or m.lr_from in only]
    stems = _stems(model, splits, first, cache, settings)
    targets = target_regex(setup, first, len(model.model.layers))
    qc.drop_lower_layers(model, first)
    _base(results, settings, model, splits, stems, setup)
    written = 0
    while max_runs is None or written < max_runs:
        done = load_done(results, settings)
        nxt = next_run(ms, done, cfg)
        if nxt is None:
            return {"written": written, "complete": True}
        progress(f"[train] {nxt.name}: {nxt.method.label} lr {nxt.lr:.3g} seed {nxt.seed}")
        rec = train_run(model, nxt, setup, cfg, splits, stems, targets, progress)
        rec["settings"] = settings
        atomic_write_json(results / f"{nxt.name}.json", rec)
        written += 1
        progress(f"[train] {nxt.name}: val {rec['val']['loss']:.4f} test {rec['test']['loss']:.4f} "
                 f"({rec['trainable']} params, {rec['train_s']:.0f} s)")
    return {"written": written, "complete": next_run(ms, load_done(results, settings), cfg) is None}


def _stems(model, splits: dict, first: int, cache: Path, settings: dict) -> dict:
    import hashlib

    digest = hashlib.sha256(json.dumps(settings["setup"]).encode()).hexdigest()[:16]
    path = cache / f"train-stems-{digest}.pt"
    if path.is_file():
        return torch.load(path)
    stems = {s: qc.compute_stems(model, splits[s], first) for s in ("train", "val", "test")}
    with atomic_file(path) as tmp:
        torch.save(stems, tmp)
    return stems


def _base(results: Path, settings: dict, model, splits: dict, stems: dict, setup: qc.Setup) -> None:
    path = results / "base.json"
    if path.is_file() and qc.same_settings(json.loads(path.read_text()).get("settings"), settings):
        return
    val = qc.record_losses(model, splits["val"], stems["val"], setup.batch_size)
    test = qc.record_losses(model, splits["test"], stems["test"], setup.batch_size)
    atomic_write_json(path, {"settings": settings, "val": val, "test": test,
                             "records": {k: {"n": len(v), "dropped": v.dropped} for k, v in splits.items()}})
