"""MT-Bench-format questions, reference answers and model answers: reading, validation, category settings.

Question file (FastChat `question.jsonl`): one object per line
    {"question_id": 81, "category": "writing", "turns": ["...", "..."], "reference": ["...", "..."]}
`reference` is optional. Reference and model answers use FastChat's model-answer format
    {"question_id": 101, "answer_id": "...", "model_id": "...", "choices": [{"index": 0, "turns": [...]}], "tstamp": ...}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from eval.common import EvalError, digest, read_jsonl

QuestionId = Union[int, str]

DEFAULT_QUESTIONS = Path(__file__).resolve().parent / "default_questions.jsonl"
"""The small two-turn question set this project ships (a few per MT-Bench category, references inline)."""

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
"""MT-Bench's eight categories in its own order (reports list categories in it)."""

CATEGORY_TEMPERATURE = {
    "writing": 0.7, "roleplay": 0.7,
    "stem": 0.1, "humanities": 0.1,
    "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
}
"""Answer sampling temperature per category, as MT-Bench generates answers."""

DEFAULT_TEMPERATURE = 0.7
"""Temperature for a category MT-Bench does not list (unless --strict-categories makes it an error)."""

REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
"""Categories graded against a reference answer."""


@dataclass(frozen=True)
class Question:
    """One MT-Bench question of one or two turns."""

    question_id: QuestionId
    """FastChat's id (an integer in MT-Bench, a string is accepted too)."""
    category: str
    """MT-Bench category; decides the answer temperature and whether grading needs a reference."""
    turns: tuple[str, ...]
    """The user's messages, one per turn."""
    reference: tuple[str, ...] = field(default=())
    """Inline reference answers per turn (may be empty or shorter than turns)."""

    @property
    def needs_reference(self) -> bool:
        return self.category in REFERENCE_CATEGORIES


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(value))


def _str_list(value: Any, allow_empty_items: bool) -> bool:
    return isinstance(value, list) and all(isinstance(t, str) and (allow_empty_items or t.strip()) for t in value)


def parse_question(record: dict[str, Any], where: str) -> Question:
    """Validate one question record; `where` names the file and line in errors."""
    qid = record.get("question_id")
    if not _is_id(qid):
        raise EvalError(f"{where}: field 'question_id' is {qid!r}; expected an integer or a non-empty string")
    category = record.get("category")
    if not isinstance(category, str) or not category.strip():
        raise EvalError(f"{where}: field 'category' is {category!r}; expected a non-empty string")
    turns = record.get("turns")
    if not _str_list(turns, allow_empty_items=False) or not 1 <= len(turns) <= 2:
        raise EvalError(f"{where}: field 'turns' is {turns!r}; expected a list of 1 or 2 non-empty strings")
    reference = record.get("reference", [])
    if reference is None:
        reference = []
    if not _str_list(reference, allow_empty_items=True) or len(reference) > len(turns):
        raise EvalError(f"{where}: field 'reference' is {reference!r}; expected a list of at most {len(turns)} "
                        f"strings (one per turn)")
    return Question(qid, category, tuple(turns), tuple(reference))


def load_questions(path: str | Path, limit: int | None = None, strict_categories: bool = False) -> list[Question]:
    """The first `limit` questions of a FastChat question file, validated as a whole before any is used."""
    path = Path(path)
    check_limit(limit)
    questions: list[Question] = []
    seen: dict[QuestionId, int] = {}
    for lineno, record in read_jsonl(path, "questions"):
        where = f"questions file {path} line {lineno}"
        q = parse_question(record, where)
        if q.question_id in seen:
            raise EvalError(f"{where}: question_id {q.question_id!r} repeats line {seen[q.question_id]}")
        seen[q.question_id] = lineno
        if strict_categories and q.category not in CATEGORY_TEMPERATURE:
            raise EvalError(f"{where}: category {q.category!r} is not an MT-Bench category "
                            f"({', '.join(CATEGORY_TEMPERATURE)}); drop --strict-categories to sample it at "
                            f"temperature {DEFAULT_TEMPERATURE}")
        questions.append(q)
    if not questions:
        raise EvalError(f"questions file {path} holds no questions")
    return questions[:limit] if limit else questions


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise EvalError(f"--limit is {limit!r}; expected a positive number of questions")


def answer_temperature(category: str) -> float:
    return CATEGORY_TEMPERATURE.get(category, DEFAULT_TEMPERATURE)


def parse_answer_record(record: dict[str, Any], where: str) -> tuple[QuestionId, str, list[str]]:
    """(question_id, model_id, turns) of one model-answer record (the first choice)."""
    qid = record.get("question_id")
    if not _is_id(qid):
        raise EvalError(f"{where}: field 'question_id' is {qid!r}; expected an integer or a non-empty string")
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EvalError(f"{where}: field 'choices' is {choices!r}; expected a non-empty list of "
                        f"{{'index': 0, 'turns': [...]}} objects")
    turns = choices[0].get("turns")
    if not _str_list(turns, allow_empty_items=True) or not turns:
        raise EvalError(f"{where}: field 'choices[0].turns' is {turns!r}; expected a non-empty list of strings")
    model_id = record.get("model_id", "")
    return qid, str(model_id), list(turns)


def load_answers(path: str | Path, what: str = "answers") -> dict[QuestionId, list[str]]:
    """question_id → answer turns of a model-answer file; a repeated question_id is an error."""
    path = Path(path)
    out: dict[QuestionId, list[str]] = {}
    for lineno, record in read_jsonl(path, what):
        where = f"{what} file {path} line {lineno}"
        qid, _, turns = parse_answer_record(record, where)
        if qid in out:
            raise EvalError(f"{where}: question_id {qid!r} appears twice")
        out[qid] = turns
    return out


def load_references(path: str | Path) -> dict[QuestionId, list[str]]:
    """Reference answers (FastChat's reference_answer/<model>.jsonl): question_id → turns."""
    return load_answers(path, what="references")


def question_digest(question: Question) -> str:
    """A hash of the question's turns: an answer stored with another digest answers another text."""
    return digest(list(question.turns))


def answered_text(records: dict[QuestionId, dict[str, Any]], questions: list[Question]) -> tuple[list[QuestionId],
                                                                                                list[QuestionId]]:
    """(questions whose stored answer record was given to another text of the question, questions whose record
    carries no question_digest to tell) among `questions`; `records` are answer records by question id."""
    changed, unknown = [], []
    for q in questions:
        if q.question_id in records:
            stored = records[q.question_id].get("question_digest")
            if stored is None:
                unknown.append(q.question_id)
            elif stored != question_digest(q):
                changed.append(q.question_id)
    return changed, unknown


def answer_record(model_id: str, qid: QuestionId, turns: list[str], asked: str | None = None) -> dict[str, Any]:
    """One line of FastChat's model-answer format; answer_id is a hash of the content (stable across reruns).
    `asked` is the question_digest of the question answered (an extra field FastChat ignores)."""
    record = {"question_id": qid, "answer_id": digest(model_id, qid, turns), "model_id": model_id,
              "choices": [{"index": 0, "turns": list(turns)}], "tstamp": time.time()}
    if asked is not None:
        record["question_digest"] = asked
    return record
