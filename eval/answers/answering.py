"""Answering questions with a generator, turn by turn, into a resumable answers file (FastChat's model-answer format).

    done, kept, todo = pending_answers(path, questions)
    for q, turns in zip(todo, answer_questions(todo, tokenizer, generator, 1024, None, seed=0)):
        done[q.question_id] = turns
    save_answers(path, questions, done, kept, model_id)

Turn 2 is answered with turn 1 and its answer in context. Temperatures follow MT-Bench per category unless one
temperature is given. Each request's seed is derived from the base seed, the question and the turn, so an answer does
not depend on which batch it was generated in.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from eval.answers.chat_template import tokenize_chat
from eval.answers.generators import GenRequest, Generator, fit_new_tokens
from eval.common import digest, read_jsonl, write_jsonl
from eval.questions import (Question, QuestionId, answer_record, answer_temperature, answered_text, load_answers,
                            question_digest)


def pending_answers(path: Path, questions: list[Question]) -> tuple[dict[QuestionId, list[str]],
                                                                     dict[QuestionId, dict[str, Any]],
                                                                     list[Question]]:
    """(answers so far by question, their records as stored, the questions still lacking a turn) of an answers
    file; a missing file has none. An answer is resumed only if it was given to the same text: a stored answer whose
    question_digest differs from the question's now is dropped and answered again (and said so on stderr)."""
    done = load_answers(path) if path.exists() else {}
    kept = {r["question_id"]: r for _, r in read_jsonl(path, "answers")} if done else {}
    changed, unchecked = answered_text(kept, questions)
    for qid in changed:
        del done[qid], kept[qid]
    if changed:
        print(f"{path}: {len(changed)} question(s) changed since they were answered, answering them again: "
              f"{changed[:20]}{' ...' if len(changed) > 20 else ''}", file=sys.stderr)
    if unchecked:
        print(f"note: {len(unchecked)} answer(s) in {path} carry no question_digest (written by an older version or "
              f"another tool), so whether their question changed is unknown; they are kept (delete the file to "
              f"answer again)", file=sys.stderr)
    todo = [q for q in questions if len(done.get(q.question_id, [])) < len(q.turns)]
    return done, kept, todo


def answer_questions(chunk: list[Question], tokenizer, generator: Generator, max_new: int,
                     temperature: Optional[float], seed: int) -> list[list[str]]:
    """Both turns of every question in the chunk: all first turns in one batch, then all second turns."""
    convs: list[list[dict[str, str]]] = [[] for _ in chunk]
    answers: list[list[str]] = [[] for _ in chunk]
    for turn in (1, 2):
        active = [i for i, q in enumerate(chunk) if len(q.turns) >= turn]
        requests = []
        for i in active:
            q = chunk[i]
            convs[i].append({"role": "user", "content": q.turns[turn - 1]})
            ids = tokenize_chat(tokenizer, convs[i])
            new = fit_new_tokens(len(ids), max_new, generator.max_model_len,
                                 f"question {q.question_id} turn {turn}")
            temp = answer_temperature(q.category) if temperature is None else temperature
            requests.append(GenRequest(ids, temp, new, int(digest(seed, q.question_id, turn), 16) % (2**31 - 1)))
        for i, out in zip(active, generator.generate(requests) if requests else []):
            text = out.text.strip()
            answers[i].append(text)
            convs[i].append({"role": "assistant", "content": text})
    return answers


def save_answers(path: Path, questions: list[Question], done: dict[QuestionId, list[str]],
                 kept: dict[QuestionId, dict[str, Any]], model_id: str) -> None:
    """Rewrite the answers file atomically: questions in file order first, then answers to questions outside this
    selection (--limit); a record whose turns are unchanged is written as it was stored, a new one with the
    question_digest of the question it answers."""
    asked = {q.question_id: question_digest(q) for q in questions}
    order = [q.question_id for q in questions if q.question_id in done]
    order += [qid for qid in done if qid not in set(order)]
    write_jsonl(path, (kept[qid] if qid in kept and _turns(kept[qid]) == done[qid]
                       else answer_record(model_id, qid, done[qid], asked.get(qid)) for qid in order))


def _turns(record: dict[str, Any]) -> list[str]:
    return record["choices"][0]["turns"]
