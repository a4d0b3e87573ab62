"""FastChat-readable copies of a run's judgments and answers (`python -m eval.report RUN_DIR --fastchat DIR`).

    DIR/model_judgment/<judge>_single.jsonl   {question_id, model, judge: [judge, prompt], user_prompt, judgment,
                                               score, turn, tstamp}
    DIR/model_judgment/<judge>_pair.jsonl     {question_id, model_1, model_2, g1_winner, g2_winner,
                                               judge: [judge, prompt], g1_user_prompt, g1_judgment, g2_user_prompt,
                                               g2_judgment, turn, tstamp}
    DIR/model_answer/<model>.jsonl            the answers, already in FastChat's model_answer format

These are the rows FastChat's llm_judge writes (`play_a_match_single` / `play_a_match_pair`) and reads
(`show_result --mode single|pairwise-baseline|pairwise-all --input-file ...`). A failed judgment becomes what
FastChat writes for one: score -1, winner "error" (its tools then leave such rows out). Only the export uses these
markers; the run's own judgments keep their failure records (reason, detail, attempts).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from eval.common import write_jsonl

# game 1 puts the first model in position A, game 2 puts it in position B; our per-order outcome is always from the
# first model's side
_WINNER = {"win": "model_1", "loss": "model_2", "tie": "tie"}
FAILED_SCORE = -1
FAILED_WINNER = "error"


def single_row(row: dict[str, Any], judge: str) -> dict[str, Any]:
    """One of our single-grading rows as FastChat writes it."""
    score = row.get("score")
    return {"question_id": row["question_id"], "model": row["model"], "judge": [judge, row.get("prompt", "")],
            "user_prompt": row.get("user_prompt", ""), "judgment": _first_judgment(row, "single"),
            "score": FAILED_SCORE if score is None else score, "turn": row["turn"], "tstamp": row.get("tstamp")}


def pair_row(row: dict[str, Any], judge: str) -> dict[str, Any]:
    """One of our pairwise rows (model vs model_b, both orders) as FastChat writes it."""
    by_order = row.get("by_order") or {}
    return {"question_id": row["question_id"], "model_1": row["model"], "model_2": row["model_b"],
            "g1_winner": _WINNER.get(by_order.get("AB"), FAILED_WINNER),
            "g2_winner": _WINNER.get(by_order.get("BA"), FAILED_WINNER),
            "judge": [judge, row.get("prompt", "")],
            "g1_user_prompt": row.get("user_prompt", ""), "g1_judgment": _first_judgment(row, "AB"),
            # the second order's prompt is not stored (it is the first with the answers swapped); FastChat's readers
            # do not use it
            "g2_user_prompt": "", "g2_judgment": _first_judgment(row, "BA"),
            "turn": row["turn"], "tstamp": row.get("tstamp")}


def _first_judgment(row: dict[str, Any], variant: str) -> str:
    """The judge's text of the first successful call (FastChat keeps one judgment per game)."""
    calls = (row.get("calls") or {}).get(variant) or []
    for call in calls:
        if call and not call.get("failure") and call.get("judgment"):
            return call["judgment"]
    failed = next((c for c in calls if c and c.get("failure")), None)
    return f"(failed: {failed['failure']['reason']})" if failed else ""


def export(judged: list, out: Path) -> Path:
    """Write FastChat's files for reports' Judged inputs (eval.report.Judged) under `out`; returns out."""
    out = Path(out)
    single: dict[str, dict[tuple, dict]] = {}
    pair: dict[str, dict[tuple, dict]] = {}
    for j in judged:
        judge = j.path.name.removesuffix("_single.jsonl")
        for row in j.rows:
            single.setdefault(judge, {})[(row["model"], row["question_id"], row["turn"])] = single_row(row, judge)
        for row in j.pair_rows:
            key = (row["model"], row["model_b"], row["question_id"], row["turn"])
            pair.setdefault(judge, {})[key] = pair_row(row, judge)
        answers = j.target.out.answers_file(j.target.model_id)
        if answers.is_file():
            (out / "model_answer").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(answers, out / "model_answer" / answers.name)
    for kind, tables in (("single", single), ("pair", pair)):
        for judge, rows in tables.items():
            write_jsonl(out / "model_judgment" / f"{judge}_{kind}.jsonl", rows.values())
    return out
