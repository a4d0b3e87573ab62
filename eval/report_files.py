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


def report_markdown(rep: dict[str, Any]) -> str:
    judge = rep["judge"]
    lines = [f"# MT-Bench-style report: {rep['model']}", "",
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


def comparison_markdown(cmp: dict[str, Any]) -> str:
    lines = [f"# Comparison against {cmp['baseline']}", "",
             f"Score difference (model − baseline) over question-turns both have scores for; 95% paired bootstrap CI "
             f"over questions, seed {cmp['seed']}, {cmp['resamples']} resamples. Judge: {cmp['judge']}.", ""]
    for model, res in cmp["models"].items():
        lines += [f"## {model}", "", "| category | baseline | model | Δ all [95% CI] | Δ turn 1 | Δ turn 2 |",
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


def _bars(ax, labels: list[str], series: list[tuple[str, list[dict[str, Any]]]]) -> None:
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, ests) in enumerate(series):
        means = [e["mean"] if e["mean"] is not None else 0.0 for e in ests]
        err = [[(e["mean"] - e["ci95"][0]) if e["ci95"] else 0 for e in ests],
               [(e["ci95"][1] - e["mean"]) if e["ci95"] else 0 for e in ests]]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("judge score (1-10)")
    ax.legend()


def report_png(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["overall"] + list(rep["categories"])
    blocks = [rep["overall"]] + list(rep["categories"].values())
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 4))
    _bars(ax, labels, [(s.replace("turn", "turn "), [b[s] for b in blocks]) for s in ("turn1", "turn2", "all")])
    ax.set_title(f"{rep['model']} — judge {rep['judge']['id']} (95% bootstrap CI)")
    _save_png(fig, path)
    plt.close(fig)


def comparison_png(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["overall"] + list(dict.fromkeys(c for r in reports for c in r["categories"]))
    empty = {"mean": None, "ci95": None, "n": 0}
    series = [(r["model"], [r["overall"]["all"]] + [r["categories"].get(c, {"all": empty})["all"]
                                                    for c in labels[1:]]) for r in reports]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 4))
    _bars(ax, labels, series)
    ax.set_title(f"baseline {reports[0]['model']} vs tuned (all turns, 95% bootstrap CI)")
    _save_png(fig, path)
    plt.close(fig)

