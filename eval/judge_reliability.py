"""How far a judge's scores can be read as answer quality: stated next to every score a report shows.

    judge_reliability("local:smollm2")   # {"level": "not-a-quality-measure", "label": "…", "reason": "…"}

Three levels, decided from the judge spec and the run's judge audit (`python -m eval.audit`; no call is made):
- `not-a-quality-measure`: the judge is a model known to be too small to grade answers (the demo's SmolLM2-135M).
  Its scores exercise the pipeline; a single stray verdict moves a mean by whole points. An audit does not lift it.
- `audited`: `eval.audit` measured this judge on this run; the label carries its position consistency and κ figures
  (what they mean, and the thresholds studies suggest: eval/README.md).
- `unaudited`: any other judge. Its scores are what it said, and nothing in this run measured how often it agrees
  with a reference grader or itself; read them with that in mind.
"""

from __future__ import annotations

from typing import Any, Optional

from eval.judging.spec import parse_judge_spec

TOO_SMALL_TO_GRADE = ("smollm2",)
"""Judge ids (lower case, prefix) of models too small to grade: the 135M model the demo ships as its judge."""


def judge_reliability(spec: str | list[str] | None, audit: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """`level`, a short `label` for figure titles and table headings, and the `reason` in one sentence.

    Several specs (rows graded by different specs) get the level of the least reliable one; a missing spec is
    `unaudited`; `audit` is the run's audit.json of this judge (eval.auditing.section.load_audit), or None."""
    specs = spec if isinstance(spec, list) else [spec]
    small = [s for s in specs if s is not None and _too_small(s)]
    if small:
        spec = small[0]
        return {"level": "not-a-quality-measure", "label": "tiny judge: not a quality measure",
                "reason": f"the judge {spec} is a 135M-parameter model: its scores exercise the pipeline and one "
                          "stray verdict moves a mean by whole points; the held-out loss is the measured effect"}
    spec = ", ".join(str(s) for s in specs)
    if audit is not None:
        figures = _audited_figures(audit)
        return {"level": "audited", "label": f"judge audited: {figures}",
                "reason": f"eval.audit measured the judge {spec} on {len(audit['sample']['questions'])} of this "
                          f"run's questions: {figures} (see the judge audit section)"}
    return {"level": "unaudited", "label": "judge agreement not measured",
            "reason": f"the judge {spec} was not checked against reference verdicts in this run: its scores are "
                      "what it said, not a measured quality"}


def _too_small(spec: str) -> bool:
    if spec.partition(":")[0] == "openai":
        return False  # a served API model; its stored spec may hold a redacted URL, which is not parsed again
    return parse_judge_spec(spec).judge_id.lower().startswith(TOO_SMALL_TO_GRADE)


def _audited_figures(audit: dict[str, Any]) -> str:
    """Position consistency and the κ figures the audit measured, e.g. "position consistency 0.62, repeat κ 0.80"."""
    shown = []
    for key, name in (("position_consistency", "position consistency"), ("repeat_weighted_kappa", "repeat κ")):
        value = (audit.get(key) or {}).get("value")
        if value is not None:
            shown.append(f"{name} {value:.2f}")
    value = ((audit.get("label_agreement") or {}).get("label_kappa") or {}).get("value")
    if value is not None:
        shown.append(f"κ against labels {value:.2f}")
    return ", ".join(shown) or "no figure defined"
