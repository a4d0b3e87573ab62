"""What the quality benchmark runs: profiles, the prioritised run list, and the expected run time.

Runs are listed most important first (the papers' central claim needs base, LoRA-r1, SSH, LFMA at matched budgets
before anything else), so a benchmark cut short still answers the main question.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sspeft import METHOD_DEFAULTS

from benchmarks import quality_lib as ql

LORA_R1_LR, LORA_R8_LR = 1e-3, 3e-4
"""LoRA learning rates (lora_alpha = 2r); r=1 gets a 3-point grid around its value."""
DELTAS = (0.0, 0.7, 1.0)
"""SSH δ ablation: all random, the paper's best, all by energy."""
TOPK_RATIOS = (0.0005, 0.0016, 0.005)
"""LFMA top-k ratio ablation (the paper's GLUE range 0.0005–0.0016, and one step above)."""
SSH_DEFAULT_DELTA = 0.7
"""SpectralConfig's default δ (the paper's best)."""
GRID = (1 / 3, 1.0, 3.0)
"""The lr grid: the suggested lr divided and multiplied by ~3."""


@dataclass
class Profile:
    """A benchmark size."""

    steps: int
    """Optimizer steps of a main / grid / seed run."""
    ablation_steps: int
    """Optimizer steps of an ablation run."""
    n_train: int
    """Training records (steps × batch of them are used, in a fixed seeded order)."""
    n_eval: int
    """Held-out records."""
    first_layer: int
    """Adapt q,v from this decoder layer up (0 = all); the frozen layers below run once and are cached."""
    est_step_s: float
    """s/step assumed for the first time estimate (later estimates use measured step times)."""
    per_module: int = 960
    """Trainable scalars per adapted module: LoRA-r1's q+v budget on SmolLM2 is (1152 + 768)/2 = 960."""
    grid: bool = True
    """Run the 3-point lr grids."""
    extras: bool = True
    """Run LoRA-r8, LFMA half-spectrum, WaveFT db2, the PEFT peers."""
    ablations: bool = True
    """Run the SSH δ and LFMA top-k ablations."""
    seeds: int = 4
    """Best methods re-run with a second seed."""
    only_labels: tuple[str, ...] = ()
    """Restrict the method table to these labels (empty: all)."""
    max_length: int = 192
    batch_size: int = 4
    threads: int = 2
    overhead_s: float = 25.0
    """Per-run process start, model load and ΔW spectra (for the estimate)."""
    eval_steps: float = 0.15
    """Cost of held-out evaluation in training steps per held-out record (for the estimate)."""
    notes: list[str] = field(default_factory=list)

    def bench(self, model_dir: str, data: str) -> ql.BenchConfig:
        return ql.BenchConfig(model_dir=model_dir, data=data, n_train=self.n_train, n_eval=self.n_eval,
                              max_length=self.max_length, batch_size=self.batch_size, threads=self.threads,
                              first_layer=self.first_layer)


PROFILES = {
    # the protocol: q,v of all 30 layers, 100 steps × 4, 800 train / 64 held-out records
    "full": Profile(steps=100, ablation_steps=60, n_train=800, n_eval=64, first_layer=0, est_step_s=2.5),
    # the quick profile's data and steps with the whole grid: what fit a shared, oversubscribed 2-core machine
    # (q,v of the top 2 layers; frozen layers 0–27 cached); shares its runs with "quick"
    "reduced": Profile(steps=10, ablation_steps=10, n_train=40, n_eval=16, first_layer=28, est_step_s=4.0,
                       seeds=2),
    # between reduced and full: q,v of the top 6 layers (frozen layers 0–23 cached), 30 steps, 48 held-out records
    "medium": Profile(steps=30, ablation_steps=20, n_train=120, n_eval=48, first_layer=24, est_step_s=3.0,
                      seeds=2),
    # a few minutes on idle cores: main methods only
    "quick": Profile(steps=10, ablation_steps=10, n_train=40, n_eval=16, first_layer=28, est_step_s=4.0,
                     grid=False, extras=False, ablations=False, seeds=0),
    # the test suite's smoke run on a tiny random model
    "smoke": Profile(steps=2, ablation_steps=2, n_train=8, n_eval=4, first_layer=1, est_step_s=0.1, per_module=16,
                     grid=False, extras=False, ablations=False, seeds=0, max_length=96, threads=1,
                     overhead_s=5.0, only_labels=("LoRA r=1", "SSH")),
}


def _lr(method: str) -> float:
    return METHOD_DEFAULTS[method]["lr"]


def _round(lr: float) -> float:
    """One significant digit (grid points read 3e-4, not 3.33333e-4)."""
    return float(f"{lr:.0e}")


def _run(label: str, method: str, lr: float, steps: int, options: dict, groups: list[str], seed: int = 0,
         suffix: str = "") -> ql.RunSpec:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    name = f"{slug}{suffix}_lr{lr:g}_s{seed}_t{steps}"
    return ql.RunSpec(name=name, method=method, lr=lr, steps=steps, seed=seed, options=dict(options),
                      groups=groups, label=label)


def method_table(p: Profile) -> list[tuple[str, str, float, dict, bool]]:
    """(label, method, suggested lr, options, in the lr grid), most important first, at LoRA-r1's budget."""
    n = p.per_module
    main = [
        ("LoRA r=1", "lora", LORA_R1_LR, {"r": 1}, True),
        ("SSH", "ssh", _lr("ssh"), {"n": n}, True),
        ("LFMA", "lfma", _lr("lfma"), {"n": n // 2}, True),
        ("FourierFT", "fourierft", _lr("fourierft"), {"n": n}, True),
        ("WaveFT haar", "waveft", _lr("waveft"), {"n": n}, False),
        ("SHiRA", "shira", _lr("shira"), {"r": 1}, False),
    ]
    extras = [
        # PEFT at PEFT's defaults except the budget; FourierFT's α is 150 there (300 here), so twice the lr
        ("PEFT FourierFT", "peft-fourierft", 2 * _lr("fourierft"), {"n_frequency": n}, False),
        ("PEFT WaveFT", "peft-waveft", _lr("waveft"), {"n_frequency": n}, False),
        ("PEFT SHiRA", "peft-shira", _lr("shira"), {"r": 1}, False),
        ("LoRA r=8", "lora", LORA_R8_LR, {"r": 8}, False),
        ("LFMA half-spectrum", "lfma", _lr("lfma"), {"n": n // 2, "half_spectrum": True}, False),
        ("WaveFT db2", "waveft", _lr("waveft"), {"n": n, "wavelet": "db2"}, False),
    ]
    table = main + (extras if p.extras else [])
    return [row for row in table if not p.only_labels or row[0] in p.only_labels]


def build_plan(p: Profile, done: dict[str, dict]) -> list[ql.RunSpec]:
    """Every run of the profile, in priority order; the seed runs appear once the grid they depend on is done."""
    plan = [ql.RunSpec(name="base", method="base", steps=0, groups=["main"], label="base (no adapter)")]
    table = method_table(p)
    main = [row for row in table if row[4] or row[0] in ("WaveFT haar", "SHiRA")]
    plan += [_run(label, m, lr, p.steps, o, ["main"]) for label, m, lr, o, _ in main]
    up, down = [], []
    if p.grid:  # the higher grid points first: short budgets favour them, so they answer more if cut short
        for label, m, lr, o, in_grid in table:
            if in_grid:
                up.append(_run(label, m, _round(lr * GRID[2]), p.steps, o, ["lr-grid"]))
                down.append(_run(label, m, _round(lr * GRID[0]), p.steps, o, ["lr-grid"]))
    extras = [_run(label, m, lr, p.steps, o, ["main"]) for label, m, lr, o, _ in table
              if (label, m, lr, o, _) not in main]
    # priority when a run is cut short: the claims first (upper grid points, PEFT peers, LoRA-r8's rank), then the
    # δ ablation and the seed spread, then the rest; the lower grid points last (short budgets rarely favour them)
    plan += up + extras[:4]
    delta_runs, topk_runs = [], []
    if p.ablations:
        main_ssh = next(s for s in plan if s.label == "SSH" and "main" in s.groups)
        for d in DELTAS:
            if d == SSH_DEFAULT_DELTA and p.ablation_steps == p.steps:
                main_ssh.groups.append("ablation-delta")  # the default point is the main run itself
                continue
            delta_runs.append(_run("SSH", "ssh", _lr("ssh"), p.ablation_steps, {"n": p.per_module, "delta": d},
                                   ["ablation-delta"], suffix=f"-delta{d:g}"))
        topk_runs = [_run("LFMA", "lfma", _lr("lfma"), p.ablation_steps, {"top_k_ratio": r},
                          ["ablation-topk"], suffix=f"-topk{r:g}") for r in TOPK_RATIOS]
    plan += delta_runs
    if p.seeds and all(s.name in done for s in plan if {"main", "lr-grid"} & set(s.groups)):
        plan += seed_runs(p, done)  # chosen from the runs above; re-chosen if later grid points win
    plan += topk_runs + extras[4:] + down
    if p.seeds:
        plan += [s for s in seed_runs(p, done) if s.name not in {q.name for q in plan}]
    return _mark_grid(plan)


def _mark_grid(plan: list[ql.RunSpec]) -> list[ql.RunSpec]:
    """Main runs of gridded methods also belong to the lr grid (their suggested lr is its middle point)."""
    gridded = {s.label for s in plan if "lr-grid" in s.groups}
    for s in plan:
        if "main" in s.groups and s.label in gridded and "lr-grid" not in s.groups:
            s.groups.append("lr-grid")
    return plan


TRAINING_FIELDS = ("method", "lr", "steps", "seed", "options")
"""What decides a run's numbers (its name, label and groups are presentation)."""


def same_run(result: dict, spec: ql.RunSpec, bench: ql.BenchConfig) -> bool:
    """A stored result stands for `spec` under `bench` (thread count aside: it changes timings, not losses)."""
    stored, wanted = result.get("spec", {}), asdict(spec)
    if any(stored.get(k) != wanted[k] for k in TRAINING_FIELDS):
        return False
    strip = lambda d: {k: v for k, v in d.items() if k != "threads"}  # noqa: E731
    return strip(result.get("bench", {})) == strip(asdict(bench))


def tag_with_plan(done: dict[str, dict], plan: list[ql.RunSpec]) -> dict[str, dict]:
    """Results keyed by run name with label and groups taken from the current plan (a run made under another
    profile, e.g. quick, counts for the same run of this one)."""
    out = {}
    for spec in plan:
        r = done.get(spec.name)
        if r is not None and (spec.method == "base" or r["spec"]["method"] == spec.method):
            r = dict(r, spec=dict(r["spec"], label=spec.label, groups=list(spec.groups)))
            out[spec.name] = r
    return out


def best_per_label(done: dict[str, dict], steps: int) -> dict[str, dict]:
    """Lowest held-out loss per method label among main and grid runs of `steps` steps, seed 0."""
    best: dict[str, dict] = {}
    for r in done.values():
        s = r["spec"]
        if s["method"] == "base" or s["steps"] != steps or s["seed"] != 0:
            continue
        if not {"main", "lr-grid"} & set(s["groups"]):
            continue
        if s["label"] not in best or r["heldout_loss"] < best[s["label"]]["heldout_loss"]:
            best[s["label"]] = r
    return best


def seed_runs(p: Profile, done: dict[str, dict]) -> list[ql.RunSpec]:
    """The best `p.seeds` methods (each at its best lr) again with seed 1."""
    best = sorted(best_per_label(done, p.steps).values(), key=lambda r: r["heldout_loss"])[: p.seeds]
    out = []
    for r in best:
        s = r["spec"]
        out.append(_run(s["label"], s["method"], s["lr"], s["steps"], s["options"], ["seed"], seed=1))
    return out


def current(results: Path, p: Profile, bench: ql.BenchConfig, pattern: str | None = None) -> tuple:
    """(plan, done): the profile's plan and the stored results that stand for its runs, tagged with the plan."""
    raw = load_results(results)
    done: dict[str, dict] = {}
    for _ in range(2):  # the seed runs are planned from the results of the others
        plan = build_plan(p, done)
        valid = {s.name: raw[s.name] for s in plan if s.name in raw and same_run(raw[s.name], s, bench)}
        done = tag_with_plan(valid, plan)
    return filter_plan(plan, pattern), done


def filter_plan(plan: list[ql.RunSpec], pattern: str | None) -> list[ql.RunSpec]:
    if not pattern:
        return plan
    rx = re.compile(pattern)
    return [s for s in plan if rx.search(s.name)]


def load_results(results: Path) -> dict[str, dict]:
    """{run name: result} for every finished run in the directory (ignores temp and failure files)."""
    out = {}
    for path in sorted(Path(results).glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        if "heldout_loss" in data and "spec" in data:
            out[data["spec"]["name"]] = data
    return out


def measured_step_s(done: dict[str, dict]) -> float | None:
    times = sorted(r["step_s"] for r in done.values() if r.get("step_s"))
    return times[len(times) // 2] if times else None


def estimate_s(pending: list[ql.RunSpec], step_s: float, p: Profile) -> float:
    """Expected seconds for the pending runs (training + held-out evaluation + per-run overhead)."""
    total = 0.0
    for s in pending:
        total += p.overhead_s + step_s * (s.steps + p.eval_steps * p.n_eval)
    return total
