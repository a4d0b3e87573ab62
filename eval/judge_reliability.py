"""How far a judge's scores can be read as answer quality: stated next to every score a report shows.

    judge_reliability("local:smollm2")   # {"level": "not-a-quality-measure", "label": "…", "reason": "…"}

Two levels, decided from the judge spec alone (no call is made):
- `not-a-quality-measure`: the judge is a model known to be too small to grade answers (the demo's SmolLM2-135M).
  Its scores exercise the pipeline; a single stray verdict moves a mean by whole points.
- `unaudited`: any other judge. Its scores are what it said, and nothing in this run measured how often it agrees
  with a reference grader; read them with that in mind.
"""

from __future__ import annotations

from eval.judging.spec import parse_judge_spec

TOO_SMALL_TO_GRADE = ("smollm2",)
"""Judge ids (lower case, prefix) of models too small to grade: the 135M model the demo ships as its judge."""


def judge_reliability(spec: str | list[str] | None) -> dict[str, str]:
    """`level`, a short `label` for figure titles and table headings, and the `reason` in one sentence.

    Several specs (rows graded by different specs) get the level of the least reliable one; a missing spec is
    `unaudited`."""
    specs = spec if isinstance(spec, list) else [spec]
    small = [s for s in specs if s is not None and _too_small(s)]
    if small:
        spec = small[0]
        return {"level": "not-a-quality-measure", "label": "tiny judge: not a quality measure",
                "reason": f"the judge {spec} is a 135M-parameter model: its scores exercise the pipeline and one "
                          "stray verdict moves a mean by whole points; the held-out loss is the measured effect"}
    spec = ", ".join(str(s) for s in specs)
    return {"level": "unaudited", "label": "judge agreement not measured",
            "reason": f"the judge {spec} was not checked against reference verdicts in this run: its scores are "
                      "what it said, not a measured quality"}


def _too_small(spec: str) -> bool:
    return parse_judge_spec(spec).judge_id.lower().startswith(TOO_SMALL_TO_GRADE)
