"""report.md and report.png (and the comparison's) from the report dictionaries of eval.report."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from launch.rundir import atomic_write_bytes


def _fmt(est: dict[str, Any]) -> str:
    if est["mean"] is None:
        return "– (n=0)"
    lo, hi = est["ci95"]
    return f"{est['mean']:.2f} [{lo:.2f}, {hi:.2f}] (n={est['n']})"


def report_markdown(rep: dict[str, Any], effect: str = "") -> str:
    """Title, then `effect` (the checkpoint paragraph with its held-out loss: the measured effect), then the judge's
    scores under a heading that says how far they can be read as quality."""
    judge = rep["judge"]
    lines = [f"# MT-Bench-style report: {rep['model']}", ""]
    if effect.strip():
        lines += ["## Checkpoint and held-out response loss", "", effect.strip(), ""]
    lines += [*_judge_heading(judge["reliability"]),
              f"Judge `{judge['spec']}` (samples {judge['samples']}, temperature {judge['temperature']}), "
              f"prompts: {rep['prompts']['source']}. Scores 1–10, mean [95% bootstrap CI over questions] (n = judged "
              f"question-turns); bootstrap seed {rep['seed']}, {rep['resamples']} resamples.", "",
              "| category | turn 1 | turn 2 | all |", "|---|---|---|---|"]
    for name, block in [("**overall**", rep["overall"])] + list(rep["categories"].items()):
        lines.append(f"| {name} | {_fmt(block['turn1'])} | {_fmt(block['turn2'])} | {_fmt(block['all'])} |")
    f = rep["failures"]
    reasons = ", ".join(f"{k}: {v}" for k, v in f["by_reason"].items()) or "none"
    lines += ["", f"Failures (excluded from the means): {f['total']} ({reasons})."]
    for other, p in rep.get("pairwise", {}).items():
        lines += ["", f"Pairwise against {other}: {p['win']} wins, {p['tie']} ties, {p['loss']} losses, "
                      f"{p['failed']} failed; win rate {p['win_rate']}."]
    return "\n".join(lines) + "\n"


def _judge_heading(reliability: dict[str, str]) -> list[str]:
    return [f"## Judge scores ({reliability['label']})", "", f"**Reliability:** {reliability['reason']}.", ""]


def comparison_markdown(cmp: dict[str, Any], effect: str = "") -> str:
    """Title, then `effect` (the held-out loss table: the measured effect), then the paired judge-score differences
    under a heading that says how far they can be read as quality."""
    lines = [f"# Comparison against {cmp['baseline']}", ""]
    if effect.strip():
        lines += [effect.strip(), ""]
    lines += [*_judge_heading(cmp["judge_reliability"]),
              f"Score difference (model − baseline) over question-turns both have scores for; 95% paired bootstrap "
              f"CI over questions, seed {cmp['seed']}, {cmp['resamples']} resamples. Judge: {cmp['judge']}.", ""]
    for model, res in cmp["models"].items():
        lines += [f"### {model}", "", "| category | baseline | model | Δ all [95% CI] | Δ turn 1 | Δ turn 2 |",
                  "|---|---|---|---|---|---|"]
        for name, block in [("**overall**", res["overall"])] + list(res["categories"].items()):
            a = block["all"]
            lines.append(f"| {name} | {_num(a['baseline_mean'])} | {_num(a['mean'])} | {_delta(a)} | "
                         f"{_delta(block['turn1'])} | {_delta(block['turn2'])} |")
        lines.append("")
    return "\n".join(lines)


def _num(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _delta(d: dict[str, Any]) -> str:
    if d["delta"] is None:
        return "– (n=0)"
    lo, hi = d["ci95"]
    return f"{d['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={d['n']})"


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _bars(ax, labels: list[str], series: list[tuple[str, list[dict[str, Any]]]], alpha: float = 1.0) -> None:
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, ests) in enumerate(series):
        means = [e["mean"] if e["mean"] is not None else 0.0 for e in ests]
        err = [[(e["mean"] - e["ci95"][0]) if e["ci95"] else 0 for e in ests],
               [(e["ci95"][1] - e["mean"]) if e["ci95"] else 0 for e in ests]]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=name, alpha=alpha)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("judge score (1-10)")
    ax.legend()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _judge_title(reliability: dict[str, str]) -> tuple[str, str]:
    """The judge panel's reliability line and its colour: red where the scores are not a quality measure."""
    warn = reliability["level"] == "not-a-quality-measure"
    return reliability["label"].upper() if warn else reliability["label"], "firebrick" if warn else "black"


def _heldout_text(rep: dict[str, Any]) -> str:
    c = rep.get("checkpoint") or {}
    if c.get("heldout_loss") is None:
        return "held-out response loss: not measured"
    return f"held-out response loss {c['heldout_loss']:.4f} ({c['heldout_records']} records)"


def report_png(rep: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    labels = ["overall"] + list(rep["categories"])
    blocks = [rep["overall"]] + list(rep["categories"].values())
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 4))
    line, colour = _judge_title(rep["judge"]["reliability"])
    _bars(ax, labels, [(s.replace("turn", "turn "), [b[s] for b in blocks]) for s in ("turn1", "turn2", "all")],
          alpha=0.5 if colour == "firebrick" else 1.0)
    ax.set_title(f"{rep['model']}: {_heldout_text(rep)}\njudge {rep['judge']['id']} scores (95% bootstrap CI): {line}",
                 color=colour)
    _save_png(fig, path)
    plt.close(fig)


def _heldout_panel(ax, cmp: dict[str, Any]) -> None:
    """Held-out response loss of the baseline and each model, with Δ: the measured effect, drawn first."""
    names = [cmp["baseline"]] + list(cmp["models"])
    first = next(iter(cmp["models"].values()))["heldout_loss"]
    losses = [first["baseline"]] + [res["heldout_loss"]["model"] for res in cmp["models"].values()]
    records = {res["heldout_loss"]["records"] for res in cmp["models"].values()} - {None}
    ax.set_title(f"1. Measured effect: held-out response loss\n({', '.join(map(str, sorted(records))) or 'no'} "
                 f"held-out records; lower is better)")
    if all(v is None for v in losses):
        ax.text(0.5, 0.5, "not measured:\nno held-out records\n(data.eval_fraction is 0)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    # the colours of the judge panel's series: one colour per model across both panels
    bars = ax.bar(range(len(names)), [v or 0.0 for v in losses], color=[f"C{i}" for i in range(len(names))])
    for bar, value, model in zip(bars, losses, [None] + list(cmp["models"])):
        text = "–" if value is None else f"{value:.3f}"
        delta = cmp["models"][model]["heldout_loss"]["delta"] if model else None
        base = cmp["models"][model]["heldout_loss"]["baseline"] if model else None
        if delta is not None and base:
            text += f"\nΔ {delta:+.3f} ({100 * delta / base:+.0f}%)"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(names)), ["baseline"] + names[1:], rotation=30, ha="right")
    ax.set_ylim(0, 1.25 * max(v for v in losses if v is not None))
    ax.set_ylabel("response loss (nats/token)")


def comparison_png(reports: list[dict[str, Any]], cmp: dict[str, Any], path: Path) -> None:
    """Left: the held-out loss of baseline and tuned (the measured effect); right: the judge's scores with their
    intervals, titled with how far that judge can be read as quality."""
    plt = _pyplot()
    labels = ["overall"] + list(dict.fromkeys(c for r in reports for c in r["categories"]))
    empty = {"mean": None, "ci95": None, "n": 0}
    series = [(r["model"], [r["overall"]["all"]] + [r["categories"].get(c, {"all": empty})["all"]
                                                    for c in labels[1:]]) for r in reports]
    fig, (effect_ax, judge_ax) = plt.subplots(
        1, 2, figsize=(1.0 * len(labels) + 7, 4.6), gridspec_kw={"width_ratios": [2.2, max(3.0, 0.9 * len(labels))]})
    _heldout_panel(effect_ax, cmp)
    line, colour = _judge_title(cmp["judge_reliability"])
    _bars(judge_ax, labels, series, alpha=0.5 if colour == "firebrick" else 1.0)
    judge_ax.set_title(f"2. Judge scores, all turns (95% bootstrap CI)\n{line}", color=colour)
    tuned = ", ".join(r["model"] for r in reports[1:])
    fig.suptitle(f"{tuned} against its baseline {reports[0]['model']}", fontweight="bold")
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
