"""The audit in the report: the figures of RUN_DIR/audit/<judge>/audit.json in report.json and report.md (or
"not audited"), and the user's requirements on them (`--max-position-inconsistency`, `--min-kappa`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from eval.common import EvalError

FIGURES = [
    ("position_consistency", "position consistency (verdict survives swapping the order)"),
    ("first_position_preference", "first-position preference (decisive verdicts for the answer shown first)"),
    ("repeat_exact_agreement", "repeat exact agreement (same score when judged again)"),
    ("repeat_weighted_kappa", "repeat weighted κ (quadratic)"),
    ("repeat_flip_rate", "repeat flip rate (pairwise verdict changes when judged again)"),
    ("length_score_correlation", "length–score correlation (Spearman)"),
    ("padding_score_change", "padding score change (neutral padding, padded − original)"),
]
LABEL_FIGURES = [
    ("label_agreement_with_ties", "agreement with labels, ties included"),
    ("label_agreement_without_ties", "agreement with labels, without ties"),
    ("label_exact_agreement", "exact agreement with label scores"),
    ("label_kappa", "Cohen's κ against labels"),
    ("label_weighted_kappa", "weighted κ against label scores"),
]


def load_audit(root: Path, judge_id: str) -> Optional[dict[str, Any]]:
    """The audit of this judge on this run directory, or None when it was not audited."""
    path = Path(root) / "audit" / judge_id / "audit.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()) | {"path": str(path)}
    except ValueError as e:
        raise EvalError(f"{path} is not valid JSON ({e}); run python -m eval.audit again") from e


def _fmt(fig: Optional[dict[str, Any]]) -> str:
    if not fig or fig.get("value") is None:
        note = (fig or {}).get("note")
        return f"not measured ({note})" if note else f"undefined (n={(fig or {}).get('n', 0)})"
    ci = fig.get("ci95")
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{fig['value']:.2f}{interval} (n={fig['n']})"


def audit_lines(audit: Optional[dict[str, Any]]) -> list[str]:
    """The audit as markdown lines: one line per figure, the label agreement, the self-preference warning."""
    if audit is None:
        return ["Judge audit: not audited (run `python -m eval.audit RUN_DIR [BASELINE_DIR] --judge SPEC`)."]
    j, sample = audit["judge"], audit["sample"]
    lines = [f"Judge audit of `{j['judge_spec']}` on {len(sample['questions'])} questions ({sample['items']} "
             f"question-turns, seed {sample['seed']}), {j['samples']} judgments per item at temperature "
             f"{j['judge_temperature']}; 95% bootstrap intervals over questions:", ""]
    lines += [f"- {label}: {_fmt(audit.get(key))}" for key, label in FIGURES]
    labels = audit.get("label_agreement")
    if labels:
        lines.append(f"- labels {labels['labels']}: {labels['labels_matched']} of {labels['labels_about_model']} "
                     f"labels about this model matched a judged item")
        lines += [f"- {label}: {_fmt(labels.get(key))}" for key, label in LABEL_FIGURES if key in labels]
    f = audit["failures"]
    lines.append(f"- audit calls: {f['calls']}, failed {f['total']} "
                 f"({', '.join(f'{k}: {v}' for k, v in f['by_reason'].items()) or 'none'})")
    sp = audit["self_preference"]
    if sp["warning"]:
        lines.append(f"- **self-preference risk**: {'; '.join(sp['reasons'])}")
    return lines


def audit_markdown(audit: Optional[dict[str, Any]]) -> str:
    return "\n## Judge audit\n\n" + "\n".join(audit_lines(audit)) + "\n"


def requirement_problems(audit: Optional[dict[str, Any]], max_inconsistency: Optional[float],
                         min_kappa: Optional[float]) -> list[str]:
    """Why the judge falls short of what the user requires; a requirement on a figure that was not measured is a
    problem too (an unaudited judge does not pass)."""
    problems: list[str] = []
    if max_inconsistency is not None:
        fig = (audit or {}).get("position_consistency") or {}
        if fig.get("value") is None:
            problems.append(f"--max-position-inconsistency {max_inconsistency}: position consistency was not "
                            f"measured ({'not audited' if audit is None else 'no pairwise audit'})")
        elif 1 - fig["value"] > max_inconsistency:
            problems.append(f"position inconsistency {1 - fig['value']:.2f} is above --max-position-inconsistency "
                            f"{max_inconsistency}")
    if min_kappa is not None:
        kappas = _kappas(audit)
        if not kappas:
            why = "not audited" if audit is None else "κ undefined"
            problems.append(f"--min-kappa {min_kappa}: no κ was measured ({why})")
        problems += [f"{name} {value:.2f} is below --min-kappa {min_kappa}" for name, value in kappas.items()
                     if value < min_kappa]
    return problems


def _kappas(audit: Optional[dict[str, Any]]) -> dict[str, float]:
    """The κ figures the audit measured: repeatability, and agreement with labels when given."""
    if audit is None:
        return {}
    found = {"repeat weighted κ": (audit.get("repeat_weighted_kappa") or {}).get("value")}
    labels = audit.get("label_agreement") or {}
    found["κ against labels"] = (labels.get("label_kappa") or {}).get("value")
    return {k: v for k, v in found.items() if v is not None}
