"""Per-category MT-Bench report from judgments, and a paired before/after comparison.

    python -m eval.report RUN_DIR                       # RUN_DIR/report.{json,md,png}
    python -m eval.report RUN_DIR/baseline RUN_DIR      # both reports + RUN_DIR/comparison/ (first = baseline)
    python -m eval.report BASE RUN_A RUN_B --out cmp/   # several models against one baseline

report.json: `overall` and `categories[c]`, each {turn1, turn2, all} of {mean, ci95, n} — means over judged
question-turns, 95% intervals from a bootstrap over questions; failed judgments are excluded from means and
counted in `failures` {total, by_reason}; with the judge, the prompts, the seed and the number of resamples.
The comparison resamples questions jointly for both models (paired bootstrap of the score difference).

`checkpoint` in report.json (and a paragraph in report.md) comes from the run's merged/merge_report.json (written
by launch.merge): the merged dtype, the share of ΔW rounding lost, the logits probe's agreement with the trained
adapter, and the response loss on the run's held-out records computed from that checkpoint. The comparison puts
the held-out losses of baseline and model side by side, a measured effect next to the judge's scores.

Order of every page and figure: the measured effect first (report.md: the checkpoint paragraph; comparison.md and
the left panel of comparison.png: the held-out losses with the record count), then the judge's scores under a
heading that states how far that judge can be read as quality (`judge.reliability` in report.json,
`judge_reliability` in comparison.json; see eval/judge_reliability.py).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from eval.auditing.section import audit_markdown, load_audit, requirement_problems
from eval.common import EvalError, atomic_write_json, atomic_write_text, check_file_id
from eval.judge_reliability import judge_reliability
from eval.judging.engine import JudgmentStore
from eval.questions import MT_BENCH_CATEGORIES, load_answers
from eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_mean, check_resamples
from eval.target import Target, read_merge_report, resolve_target, share_text
from launch.credentials import redact
from launch.rundir import MERGE_REPORT

SLICES = {"turn1": (1,), "turn2": (2,), "all": (1, 2)}
EXIT_OK, EXIT_JUDGE_BELOW_REQUIREMENT, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class Judged:
    """One model's judgments, read from its run directory."""

    target: Target
    path: Path
    rows: list[dict[str, Any]]
    """Single-grading rows of this model."""
    pair_rows: list[dict[str, Any]]
    """Pairwise rows with this model as the first model."""
    expected: Optional[int]
    """Question-turns in the model's answers file (None when there is none)."""


def load_judged(target: Target, judge_id: Optional[str]) -> Judged:
    folder = target.out.judgments
    files = sorted(folder.glob("*_single.jsonl")) if folder.is_dir() else []
    if judge_id:
        files = [target.out.judgments_file(judge_id, "single")]
        if not files[0].is_file():
            raise EvalError(f"judgments file {files[0]} does not exist; run python -m eval.judge first")
    if not files:
        raise EvalError(f"no judgments in {folder}; run `python -m eval.judge {target.out.root} --judge ...` first")
    if len(files) > 1:
        raise EvalError(f"{folder} holds judgments of several judges ({[f.name for f in files]}); pick one with "
                        f"--judge-id")
    path = files[0]
    # a judge killed mid-run leaves superseded rows behind until its next run compacts the file: keep the latest
    rows = [r for r in JudgmentStore(path).rows.values() if r.get("model") == target.model_id and not r.get("model_b")]
    if not rows:
        raise EvalError(f"{path} has no judgments of model {target.model_id!r}; pass --model-id")
    pair_path = path.with_name(path.name.replace("_single.jsonl", "_pair.jsonl"))
    pair_rows = [r for r in JudgmentStore(pair_path).rows.values()
                 if r.get("model") == target.model_id] if pair_path.is_file() else []
    answers_path = target.out.answers_file(target.model_id)
    expected = sum(len(t) for t in load_answers(answers_path).values()) if answers_path.is_file() else None
    return Judged(target, path, rows, pair_rows, expected)


def checkpoint_summary(target: Target) -> Optional[dict[str, Any]]:
    """What report.json says about the evaluated weights; None when TARGET is not a merged run."""
    if target.run is None:
        return None
    report = read_merge_report(target.run.merged)
    if report is None:
        return None
    probe, held = report.get("probe") or {}, report.get("heldout") or {}
    return {"merge_report": str(target.run.merged / MERGE_REPORT), "dtype": report.get("dtype"),
            "dtype_requested": report.get("dtype_requested"), "adapter": report.get("adapter"),
            "delta_lost_to_rounding": report.get("delta_lost_to_rounding"),
            "delta_lost_worst_layer": report.get("delta_lost_worst_layer"), "lossy": report.get("lossy"),
            "probe": {k: probe.get(k) for k in ("cosine", "residual", "max_abs_logit_diff", "passed")},
            "heldout_loss": held.get("loss"), "heldout_records": held.get("records"),
            "heldout_tokens": held.get("tokens")}


def checkpoint_markdown(rep: dict[str, Any]) -> str:
    """The report.md paragraph on the evaluated checkpoint (empty when there is no merge report)."""
    c = rep.get("checkpoint")
    if not c:
        return ""
    held = (f"Response loss on the run's {c['heldout_records']} held-out records: {c['heldout_loss']:.4f}."
            if c.get("heldout_loss") is not None else "No held-out records (data.eval_fraction is 0).")
    if c.get("adapter") is None:
        return f"\nCheckpoint: the base without ΔW, merged in {c['dtype']}. {held}\n"
    p = c["probe"]
    agree = ("n/a" if p.get("cosine") is None else
             f"logit-shift cosine {p['cosine']:.5f}, residual {p['residual']:.3g}, max |Δlogit| "
             f"{p['max_abs_logit_diff']:.3g}")
    lossy = " **LOSSY: this checkpoint is not the trained model.**" if c.get("lossy") else ""
    return (f"\nCheckpoint: merged in {c['dtype']} (asked: {c['dtype_requested']}); rounding lost "
            f"{share_text(c['delta_lost_to_rounding'])} of ΔW (worst layer {share_text(c['delta_lost_worst_layer'])}); "
            f"agreement with the adapter at runtime: {agree}.{lossy} {held}\n")


def heldout_comparison(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Held-out response losses of baseline and model from their checkpoints (lower is better)."""
    b, o = (r.get("checkpoint") or {} for r in (base, other))
    lb, lo = b.get("heldout_loss"), o.get("heldout_loss")
    return {"baseline": lb, "model": lo, "delta": lo - lb if lb is not None and lo is not None else None,
            "records": o.get("heldout_records")}


def heldout_markdown(cmp: dict[str, Any]) -> str:
    lines = ["## Measured effect: held-out response loss", "",
             "Mean loss per response token on the run's held-out records, from the checkpoints evaluation answers "
             "with (lower is better).", "",
             "| model | baseline | model | Δ | records |", "|---|---|---|---|---|"]
    for model, res in cmp["models"].items():
        h = res["heldout_loss"]
        num = (lambda x, fmt: "–" if x is None else format(x, fmt))
        lines.append(f"| {model} | {num(h['baseline'], '.4f')} | {num(h['model'], '.4f')} | "
                     f"{num(h['delta'], '+.4f')} | {num(h['records'], 'd')} |")
    return "\n".join(lines) + "\n"


def _categories(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["category"] for r in rows}
    return [c for c in MT_BENCH_CATEGORIES if c in present] + sorted(present - set(MT_BENCH_CATEGORIES))


def _groups(rows, turns, category=None) -> dict[Any, list[float]]:
    groups: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        if r["turn"] in turns and (category is None or r["category"] == category) and r.get("score") is not None:
            groups[r["question_id"]].append(float(r["score"]))
    return groups


def _slices(rows, seed, resamples, scope: str, category=None) -> dict[str, Any]:
    return {name: bootstrap_mean(_groups(rows, turns, category), seed, f"{scope}/{name}", resamples).to_dict()
            for name, turns in SLICES.items()}


def failures(rows: list[dict[str, Any]], expected: Optional[int]) -> dict[str, Any]:
    """Every failed call by reason, plus calls never attempted and answers never judged."""
    reasons: Counter = Counter()
    for r in rows:
        for samples in (r.get("calls") or {}).values():
            for s in samples:
                if s is None:
                    reasons["not_attempted"] += 1
                elif s.get("failure"):
                    reasons[s["failure"]["reason"]] += 1
    if expected is not None and expected > len(rows):
        reasons["not_judged"] += expected - len(rows)
    return {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))}


def _one_or_all(values: list[Any]) -> Any:
    distinct = sorted({str(v) if isinstance(v, (dict, list)) else v for v in values}, key=str)
    return distinct[0] if len(distinct) == 1 else distinct


def summarize(judged: Judged, seed: int, resamples: int) -> dict[str, Any]:
    rows = judged.rows
    spec = _one_or_all([redact(r.get("judge_spec")) for r in rows])
    report: dict[str, Any] = {
        "model": judged.target.model_id,
        "judge": {"id": _one_or_all([r.get("judge") for r in rows]),
                  "spec": spec,
                  "samples": _one_or_all([r.get("samples") for r in rows]),
                  "temperature": _one_or_all([r.get("judge_temperature") for r in rows]),
                  "judgments": str(judged.path)},
        "prompts": {"source": _one_or_all([r.get("prompts_source") for r in rows]),
                    "names": sorted({r.get("prompt") for r in rows})},
        "seed": seed,
        "resamples": resamples,
        "overall": _slices(rows, seed, resamples, "overall"),
        "categories": {c: _slices(rows, seed, resamples, f"category/{c}", c) for c in _categories(rows)},
        "failures": failures(rows, judged.expected),
        "checkpoint": checkpoint_summary(judged.target),
    }
    judge_id = report["judge"]["id"]
    report["audit"] = load_audit(judged.target.out.root, judge_id) if isinstance(judge_id, str) else None
    report["judge"]["reliability"] = judge_reliability(spec, report["audit"])
    if judged.pair_rows:
        report["pairwise"] = _pairwise(judged.pair_rows)
    return report


def _pairwise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for other in sorted({r["model_b"] for r in rows}):
        outcomes = Counter(r.get("outcome") or "failed" for r in rows if r["model_b"] == other)
        decided = outcomes["win"] + outcomes["tie"] + outcomes["loss"]
        out[other] = {k: outcomes[k] for k in ("win", "tie", "loss", "failed")} | {
            "win_rate": round((outcomes["win"] + 0.5 * outcomes["tie"]) / decided, 4) if decided else None}
    return out


def compare(base: Judged, other: Judged, seed: int, resamples: int) -> dict[str, Any]:
    """Paired differences other − base over question-turns both have a score for."""
    b = {(r["question_id"], r["turn"]): r for r in base.rows if r.get("score") is not None}
    o = {(r["question_id"], r["turn"]): r for r in other.rows if r.get("score") is not None}
    paired = [(o[k], b[k]) for k in o if k in b]

    def block(scope: str, turns, category=None) -> dict[str, Any]:
        sel = [(x, y) for x, y in paired if x["turn"] in turns and (category is None or x["category"] == category)]
        diffs: dict[Any, list[float]] = defaultdict(list)
        for x, y in sel:
            diffs[x["question_id"]].append(float(x["score"]) - float(y["score"]))
        est = bootstrap_mean(diffs, seed, f"compare/{scope}", resamples)
        mean_of = (lambda rows: round(sum(float(r["score"]) for r in rows) / len(rows), 4) if rows else None)
        return {"delta": est.mean, "ci95": list(est.ci95) if est.ci95 else None, "n": est.n,
                "baseline_mean": mean_of([y for _, y in sel]), "mean": mean_of([x for x, _ in sel])}

    cats = _categories([x for x, _ in paired])
    return {"overall": {s: block(f"overall/{s}", t) for s, t in SLICES.items()},
            "categories": {c: {s: block(f"{c}/{s}", t, c) for s, t in SLICES.items()} for c in cats}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", help="run directories; with several, the first is the baseline")
    p.add_argument("--out", help="folder for the comparison (several TARGETs) or the report (one TARGET)")
    p.add_argument("--judge-id", help="which judgments/<judge>_single.jsonl to report (if there are several)")
    p.add_argument("--model-id", action="append", help="model id per TARGET, in order (default: the run's)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed (saved in report.json)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    p.add_argument("--fastchat", metavar="DIR", help="also write FastChat-readable judgments and answers under DIR "
                   "(model_judgment/, model_answer/; see eval/fastchat.py)")
    p.add_argument("--max-position-inconsistency", type=float, metavar="SHARE",
                   help="fail (exit 1) when the judge's audited position inconsistency is above SHARE, or unmeasured")
    p.add_argument("--min-kappa", type=float, metavar="K",
                   help="fail (exit 1) when an audited κ (repeatability, labels) is below K, or none was measured")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _write_report(rep: dict[str, Any], folder: Path) -> Path:
    from eval.report_files import report_markdown, report_png

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "report.json", rep)
    atomic_write_text(folder / "report.md", report_markdown(rep, effect=checkpoint_markdown(rep))
                      + audit_markdown(rep.get("audit")))
    report_png(rep, folder / "report.png")
    return folder / "report.md"


def _run(args: argparse.Namespace) -> int:
    from eval.report_files import comparison_markdown, comparison_png

    check_resamples(args.resamples)
    if args.judge_id is not None:
        check_file_id("--judge-id", args.judge_id, "judgments/<judge_id>_single.jsonl")
    if args.max_position_inconsistency is not None and not 0 <= args.max_position_inconsistency <= 1:
        raise EvalError(f"--max-position-inconsistency is {args.max_position_inconsistency}; expected a share "
                        f"from 0 to 1")
    if args.min_kappa is not None and not -1 <= args.min_kappa <= 1:
        raise EvalError(f"--min-kappa is {args.min_kappa}; expected a κ from -1 to 1")
    ids = args.model_id or []
    if ids and len(ids) != len(args.targets):
        raise EvalError(f"--model-id was given {len(ids)} times for {len(args.targets)} TARGETs; give one per TARGET")
    targets = [resolve_target(t, None, ids[i] if ids else None) for i, t in enumerate(args.targets)]
    judged = [load_judged(t, args.judge_id) for t in targets]  # everything read before anything is written
    reports = [summarize(j, args.seed, args.resamples) for j in judged]
    if args.fastchat:
        from eval.fastchat import export

        print(f"FastChat files: {export(judged, Path(args.fastchat))}")
    if len(targets) == 1:
        folder = Path(args.out) if args.out else targets[0].out.root
        print(f"report: {_write_report(reports[0], folder)}")
        return _judge_requirements(reports, args)
    judges = {r["judge"]["id"] if isinstance(r["judge"]["id"], str) else str(r["judge"]["id"]) for r in reports}
    if len(judges) > 1:
        raise EvalError(f"the TARGETs were graded by different judges ({sorted(judges)}); compare scores of one "
                        f"judge (--judge-id)")
    if args.out:
        out = Path(args.out)
    elif len(targets) == 2:
        out = targets[1].out.comparison
    else:
        raise EvalError("with more than two TARGETs give --out DIR for the comparison")
    for t, rep in zip(targets, reports):
        print(f"report: {_write_report(rep, t.out.root)}")
    cmp = {"baseline": reports[0]["model"], "judge": reports[0]["judge"]["spec"],
           "judge_reliability": reports[0]["judge"]["reliability"], "seed": args.seed,
           "resamples": args.resamples,
           "models": {rep["model"]: compare(judged[0], j, args.seed, args.resamples)
                      | {"heldout_loss": heldout_comparison(reports[0], rep)}
                      for j, rep in zip(judged[1:], reports[1:])}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "comparison.json", cmp)
    atomic_write_text(out / "comparison.md", comparison_markdown(cmp, effect=heldout_markdown(cmp)))
    comparison_png(reports, cmp, out / "comparison.png")
    print(f"comparison: {out / 'comparison.md'}")
    return _judge_requirements(reports, args)


def _judge_requirements(reports: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Exit 1, naming each shortfall, when an audited figure misses what --max-position-inconsistency or
    --min-kappa requires (the reports are written either way, with the figures in them). The TARGETs share one
    judge, so the audits found (usually the tuned run's, pairwise against its baseline) speak for it; with none,
    a requirement fails as unmeasured."""
    audited = [rep for rep in reports if rep.get("audit")] or reports
    problems = [f"{rep['model']}: {p}" for rep in audited
                for p in requirement_problems(rep.get("audit"), args.max_position_inconsistency, args.min_kappa)]
    for p in problems:
        print(f"error: judge below requirement: {p}", file=sys.stderr)
    return EXIT_JUDGE_BELOW_REQUIREMENT if problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
