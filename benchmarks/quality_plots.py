"""PNG plots of the quality benchmark (matplotlib, Agg backend). Each takes the numbers to draw, already reduced by
`quality_report`; nothing here reads results or imports the report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from launch.rundir import atomic_file  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def coverage_bars(rows: list[tuple[str, int, float, float, float]], path: Path, title: str) -> Path | None:
    """rows: (variant, budget, mean, lo, hi) of a captured fraction; one group of bars per budget."""
    if not rows:
        return None
    labels = sorted({r[0] for r in rows}, key=[r[0] for r in rows].index)
    budgets = sorted({r[1] for r in rows})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(budgets)
    for j, b in enumerate(budgets):
        xs, ys, err = [], [], [[], []]
        for i, label in enumerate(labels):
            hit = [r for r in rows if r[0] == label and r[1] == b]
            if hit:
                _, _, mean, lo, hi = hit[0]
                xs.append(i + (j - (len(budgets) - 1) / 2) * width)
                ys.append(mean)
                err[0].append(max(mean - lo, 0.0))
                err[1].append(max(hi - mean, 0.0))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=f"{b} scalars / module")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("captured fraction (mean over modules)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def loss_vs_lr(curves: dict[str, list[tuple[float, float]]], base: float | None, path: Path) -> Path | None:
    """curves: {method: [(lr multiplier, validation loss), ...]} of seed 0."""
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(curves.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if base is not None:
        ax.axhline(base, color="grey", ls="--", lw=1, label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("lr / the method's grid centre (quality_train.GRID_CENTRE)")
    ax.set_ylabel("validation response loss (seed 0)")
    ax.set_title("Learning-rate grids")
    ax.legend(fontsize=7)
    return _save(fig, path)
