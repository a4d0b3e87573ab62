"""Reference labels the audit compares the judge with (`--labels FILE`), in one of two JSONL formats:

- FastChat's human judgments (the `mt_bench_human_judgments` rows): `question_id, model_a, model_b, winner, turn,
  judge`, with winner `model_a`, `model_b`, `tie` or `tie (bothbad)`; other fields (the conversations) are ignored.
- plain single scores: `question_id, turn, score` (1–10), and optionally `model` (the model the score is about).

The format is read from the first row; every row must have that format's fields. Several rows for one item (several
human judges) each count as one label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from eval.common import EvalError, read_jsonl
from eval.judging.verdicts import RATING_MAX, RATING_MIN

WINNERS = {"model_a": "model_a", "model_b": "model_b", "tie": "tie", "tie (bothbad)": "tie"}


@dataclass(frozen=True)
class PairLabel:
    """One human verdict on two models' answers to one question-turn."""

    question_id: Union[int, str]
    turn: int
    model_a: str
    model_b: str
    winner: Literal["model_a", "model_b", "tie"]
    judge: str

    def outcome_for(self, model: str, other: str) -> Optional[str]:
        """The verdict from `model`'s side against `other` ('win', 'loss', 'tie'); None if it is about other models."""
        if (self.model_a, self.model_b) == (model, other):
            return {"model_a": "win", "model_b": "loss", "tie": "tie"}[self.winner]
        if (self.model_a, self.model_b) == (other, model):
            return {"model_a": "loss", "model_b": "win", "tie": "tie"}[self.winner]
        return None


@dataclass(frozen=True)
class ScoreLabel:
    """One reference score of a model's answer to one question-turn."""

    question_id: Union[int, str]
    turn: int
    score: float
    model: Optional[str] = None


@dataclass(frozen=True)
class Labels:
    kind: Literal["pair", "single"]
    rows: list
    path: Path


def load_labels(path: Union[str, Path]) -> Labels:
    """Read and check a label file; every problem names the file, the line, the field and the value."""
    path = Path(path)
    rows = read_jsonl(path, "labels")
    if not rows:
        raise EvalError(f"labels file {path} is empty; expected FastChat human judgments or single scores")
    kind = "pair" if "winner" in rows[0][1] else "single"
    read = _pair_label if kind == "pair" else _score_label
    return Labels(kind, [read(path, lineno, r) for lineno, r in rows], path)


def _field(path: Path, lineno: int, row: dict, name: str, kind: str):
    if name not in row:
        expected = ("question_id, model_a, model_b, winner, turn, judge" if kind == "pair"
                    else "question_id, turn, score")
        raise EvalError(f"labels file {path} line {lineno}: missing field {name!r}; the first line makes this a "
                        f"{'FastChat human-judgment' if kind == 'pair' else 'single-score'} file, whose rows need "
                        f"{expected}")
    return row[name]


def _turn(path: Path, lineno: int, row: dict, kind: str) -> int:
    turn = _field(path, lineno, row, "turn", kind)
    if turn not in (1, 2) or isinstance(turn, bool):
        raise EvalError(f"labels file {path} line {lineno}: turn is {turn!r}; expected 1 or 2")
    return turn


def _pair_label(path: Path, lineno: int, row: dict) -> PairLabel:
    winner = _field(path, lineno, row, "winner", "pair")
    if winner not in WINNERS:
        raise EvalError(f"labels file {path} line {lineno}: winner is {winner!r}; expected one of {sorted(WINNERS)}")
    return PairLabel(_field(path, lineno, row, "question_id", "pair"), _turn(path, lineno, row, "pair"),
                     str(_field(path, lineno, row, "model_a", "pair")), str(_field(path, lineno, row, "model_b",
                                                                                   "pair")),
                     WINNERS[winner], str(_field(path, lineno, row, "judge", "pair")))  # type: ignore[arg-type]


def _score_label(path: Path, lineno: int, row: dict) -> ScoreLabel:
    score = _field(path, lineno, row, "score", "single")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not RATING_MIN <= score <= RATING_MAX:
        raise EvalError(f"labels file {path} line {lineno}: score is {score!r}; expected a number from 1 to 10")
    model = row.get("model")
    return ScoreLabel(_field(path, lineno, row, "question_id", "single"), _turn(path, lineno, row, "single"),
                      float(score), None if model is None else str(model))


def labelled_questions(labels: Labels, model: str, other: Optional[str]) -> set:
    """Question ids that have a label about `model` (against `other` for pairwise labels)."""
    if labels.kind == "pair":
        if other is None:
            return set()
        return {r.question_id for r in labels.rows if r.outcome_for(model, other) is not None}
    return {r.question_id for r in labels.rows if r.model in (None, model)}
