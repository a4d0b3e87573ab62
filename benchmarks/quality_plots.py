"""PNG plots of the quality benchmark (matplotlib, Agg backend): loss vs parameters, loss vs lr, ΔW spectra and
numerical rank, SSH δ and LFMA top-k ablations."""

from __future__ import annotations

from pathlib import Path

OPTION_DEFAULTS = {"delta": 0.7}
"""Ablated options a run may leave at SpectralConfig's default."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _best(done: dict[str, dict]) -> dict[str, dict]:
    from benchmarks.quality_report import best_by_label

    return best_by_label(done)


def loss_vs_params(done: dict[str, dict], out: Path, prefix: str) -> Path | None:
    best = _best(done)
    if not best:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    markers = "osD^v<>pP*Xh"
    for i, (label, r) in enumerate(sorted(best.items())):
        ax.scatter(r["trainable"], r["heldout_loss"], s=45, marker=markers[i % len(markers)],
                   label=f"{label} (lr {r['spec']['lr']:g})")
    if "base" in done:
        ax.axhline(done["base"]["heldout_loss"], color="grey", ls="--", lw=1, label="base model")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (real scalars)")
    ax.set_ylabel("held-out response loss (best lr)")
    ax.set_title("Quality per parameter")
    return _save(fig, out / f"{prefix}loss_vs_params.png")


def loss_vs_lr(done: dict[str, dict], out: Path, prefix: str) -> Path | None:
    rows = [r for r in done.values() if "lr-grid" in r["spec"]["groups"] and r["spec"]["seed"] == 0]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted({r["spec"]["label"] for r in rows}):
        pts = sorted((r["spec"]["lr"], r["heldout_loss"]) for r in rows if r["spec"]["label"] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if "base" in done:
        ax.axhline(done["base"]["heldout_loss"], color="grey", ls="--", lw=1, label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("AdamW learning rate")
    ax.set_ylabel("held-out response loss")
    ax.set_title("Learning-rate sensitivity")
    ax.legend(fontsize=8)
    return _save(fig, out / f"{prefix}loss_vs_lr.png")


def spectra(done: dict[str, dict], out: Path, prefix: str) -> Path | None:
    best = {k: v for k, v in _best(done).items() if v.get("delta") and v["delta"]["spectra"]}
    if not best:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted(best)
    for label in labels:
        spectra_ = best[label]["delta"]["spectra"]
        name = sorted(spectra_)[len(spectra_) // 2]  # the middle of the sampled layers
        s = [max(x, 1e-12) for x in spectra_[name]]
        ax1.plot(range(1, len(s) + 1), s, label=label, lw=1.2)
    ax1.axhline(1e-3, color="grey", ls=":", lw=1)
    ax1.set_yscale("log")
    ax1.set_ylim(1e-7, 2)
    ax1.set_xlabel("singular value index")
    ax1.set_ylabel("σ / σmax of ΔW (a middle q_proj)")
    ax1.set_title("ΔW singular-value spectra (dotted: rank threshold 1e-3)")
    ax1.legend(fontsize=7)
    ranks = [best[lab]["delta"]["rank_mean"] for lab in labels]
    ax2.barh(labels, ranks)
    ax2.set_xscale("log")
    ax2.set_xlabel("numerical rank of ΔW (σ > 1e-3·σmax), mean over adapted layers")
    ax2.set_title("Numerical rank")
    return _save(fig, out / f"{prefix}delta_spectra.png")


def ablation(done: dict[str, dict], out: Path, group: str, key: str, title: str, fname: str) -> Path | None:
    rows = sorted(((r["spec"]["options"].get(key, OPTION_DEFAULTS.get(key)), r["heldout_loss"], r["trainable"]) for r in done.values()
                   if group in r["spec"]["groups"]), key=lambda t: t[0])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o")
    for x, y, n in rows:
        ax.annotate(f"{n:,} params", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if key == "top_k_ratio":
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("held-out response loss")
    ax.set_title(title)
    return _save(fig, out / fname)


def write_plots(done: dict[str, dict], out: Path, prefix: str = "quality_") -> list[Path]:
    made = [
        loss_vs_params(done, out, prefix),
        loss_vs_lr(done, out, prefix),
        spectra(done, out, prefix),
        ablation(done, out, "ablation-delta", "delta", "SSH: share of positions chosen by energy (δ)",
                 f"{prefix}ssh_delta.png"),
        ablation(done, out, "ablation-topk", "top_k_ratio", "LFMA: top-k ratio", f"{prefix}lfma_topk.png"),
    ]
    return [p for p in made if p is not None]
