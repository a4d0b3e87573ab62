"""The audit's judge items: a seeded sample of the run's questions, judged as the run's judge judges them (single
scores, and pairwise in both orders when there is a second model), plus the padding probe — the same answers with
neutral padding around them.

Padding adds no content: the question restated before the answer and a closing sentence that only says the reply
above answers it. A judge that weighs content gives the padded answer the same score; a judge that rewards length
scores it higher.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

from eval.common import EvalError, digest
from eval.judging.engine import Item, build_items
from eval.judging.prompts import PromptSet
from eval.questions import Question, QuestionId

PADDED_SUFFIX = "+padded"
CLOSING = "In summary, the reply above answers the question as it was asked."


def pad(question_turn: str, answer: str) -> str:
    """The same answer with neutral padding: the question restated first, a closing summary sentence last."""
    return f"To restate the question: {question_turn}\n\n{answer}\n\n{CLOSING}"


def sample_questions(questions: list[Question], eligible: Iterable[QuestionId], n: int, seed: int) -> list[Question]:
    """`n` of the eligible questions (all of them if fewer), drawn with a generator seeded from `seed`, in the
    questions file's order. The same seed and population give the same sample, so a rerun reuses its calls."""
    if n < 1:
        raise EvalError(f"--sample is {n}; expected a positive number of questions")
    allowed = set(eligible)
    population = [q for q in questions if q.question_id in allowed]
    if not population:
        raise EvalError("no question is eligible for the audit: none has an answer (and a label, with --labels)")
    chosen = set(random.Random(int(digest(seed, "audit-sample"), 16)).sample(
        [q.question_id for q in population], min(n, len(population))))
    return [q for q in population if q.question_id in chosen]


@dataclass
class AuditItems:
    """Everything the audit judges, as the judging engine's items."""

    single: list[Item]
    padded: list[Item]
    pair: list[Item]

    @property
    def all(self) -> list[Item]:
        return self.single + self.padded + self.pair


def audit_items(questions: list[Question], answers: dict, model: str, prompts: PromptSet, references: dict,
                other: Optional[tuple[str, dict]]) -> AuditItems:
    """Single items of the sampled questions, their padded twins (model id `<model>+padded`), and pairwise items
    against `other` (model id, answers) when given."""
    mine = {q.question_id: answers[q.question_id] for q in questions}
    padded = {q.question_id: [pad(turn, a) for turn, a in zip(q.turns, mine[q.question_id])] for q in questions}
    single = build_items(questions, mine, model, prompts, references)
    padded_items = build_items(questions, padded, model + PADDED_SUFFIX, prompts, references)
    pair: list[Item] = []
    if other is not None:
        theirs = {qid: a for qid, a in other[1].items() if qid in mine}
        pair = build_items([q for q in questions if q.question_id in theirs], mine, model, prompts, references,
                           (other[0], theirs))
    return AuditItems(single, padded_items, pair)
