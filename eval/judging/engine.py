"""The judging engine: grading items from questions + answers, calls through a Backend (eval.judging.calls),
resumable storage.

An item is one (question, turn) of one model (single grading) or of two models (pairwise, judged in both orders).
Each item needs `samples` calls per variant ("single", or "AB"/"BA" for pairwise). A judgments file row holds
every call's outcome; a rerun reuses each stored call whose judge input is unchanged and repeats only calls that
are missing or ended in a transient failure, so no item is judged twice.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from eval.common import EvalError, digest, read_jsonl_lines, write_jsonl
from eval.judging.calls import Backend, CallRequest, CallResult
from eval.judging.prompts import JudgePrompt, PromptSet, kind_for
from eval.judging.verdicts import extract_rating, extract_verdict
from eval.progress import Progress
from eval.questions import Question, QuestionId
from launch.filelock import exclusive


@dataclass
class Item:
    """One grading task and its calls."""

    question: Question
    turn: int
    prompt: JudgePrompt
    variants: dict[str, list[dict[str, str]]]
    """variant ('single', 'AB', 'BA') → judge messages."""
    model: str
    model_b: Optional[str] = None
    key: tuple = field(init=False)
    input_digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.model, self.model_b, self.question.question_id, self.turn)
        self.input_digest = digest(self.prompt.system, {k: v for k, v in self.variants.items()})


def _fields_single(q: Question, answer: list[str], ref: list[str], turn: int) -> dict[str, str]:
    if turn == 1:
        f = {"question": q.turns[0], "answer": answer[0]}
    else:
        f = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": answer[0], "answer_2": answer[1]}
    return f | _ref_fields(ref, turn)


def _fields_pair(q: Question, a: list[str], b: list[str], ref: list[str], turn: int) -> dict[str, str]:
    if turn == 1:
        f = {"question": q.turns[0], "answer_a": a[0], "answer_b": b[0]}
    else:
        f = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_a_1": a[0], "answer_a_2": a[1],
             "answer_b_1": b[0], "answer_b_2": b[1]}
    return f | _ref_fields(ref, turn)


def _ref_fields(ref: list[str], turn: int) -> dict[str, str]:
    return {f"ref_answer_{i + 1}": ref[i] for i in range(min(turn, len(ref)))}


def build_items(questions: list[Question], answers: dict[QuestionId, list[str]], model: str, prompts: PromptSet,
                references: dict[QuestionId, list[str]], other: Optional[tuple[str, dict]] = None) -> list[Item]:
    """Every (question, turn) with an answer; all problems (missing references, short answers) raised at once."""
    by_id = {q.question_id: q for q in questions}
    unknown = [qid for qid in answers if qid not in by_id]
    if unknown:
        raise EvalError(f"answers of {model!r} include question ids {unknown[:10]} that the questions file lacks; "
                        f"judge with the questions file the answers were generated from (--questions)")
    problems: list[str] = []
    items: list[Item] = []
    for q in questions:
        if q.question_id not in answers or (other and q.question_id not in other[1]):
            continue
        ref = list(references.get(q.question_id) or q.reference)
        for turn in range(1, len(q.turns) + 1):
            sides = [(model, answers[q.question_id])] + ([(other[0], other[1][q.question_id])] if other else [])
            short = [m for m, a in sides if len(a) < turn]
            if short:
                problems.append(f"question {q.question_id}: the answers of {short} have no turn {turn}")
                continue
            if q.needs_reference and (len(ref) < turn or not all(r.strip() for r in ref[:turn])):
                problems.append(f"question {q.question_id} ({q.category}) turn {turn}: no reference answer")
                continue
            kind = kind_for(pairwise=other is not None, reference=q.needs_reference, turn=turn)
            prompt = prompts[kind]
            if other is None:
                variants = {"single": prompt.messages(**_fields_single(q, answers[q.question_id], ref, turn))}
            else:
                a, b = answers[q.question_id], other[1][q.question_id]
                variants = {"AB": prompt.messages(**_fields_pair(q, a, b, ref, turn)),
                            "BA": prompt.messages(**_fields_pair(q, b, a, ref, turn))}
            items.append(Item(q, turn, prompt, variants, model, other[0] if other else None))
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise EvalError(f"cannot judge: {shown}. Reference answers come from --references (FastChat's "
                        f"reference_answer/*.jsonl) or the questions' inline 'reference' field")
    if not items:
        raise EvalError(f"no answers of {model!r} match the questions: nothing to judge")
    return items


@dataclass
class Sample:
    """Outcome of one judge call."""

    value: Any = None
    judgment: Optional[str] = None
    reason: Optional[str] = None
    detail: str = ""
    attempts: int = 0
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "judgment": self.judgment, "attempts": self.attempts}
        if not self.ok:
            out["failure"] = {"reason": self.reason, "detail": self.detail, "retryable": self.retryable}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        f = d.get("failure") or {}
        return cls(d.get("value"), d.get("judgment"), f.get("reason"), f.get("detail", ""), d.get("attempts", 0),
                   bool(f.get("retryable", False)))


def sample_from_call(result: CallResult, output: str) -> Sample:
    """A call result → a stored sample: transport failures pass through, the text must hold a verdict."""
    if result.text is None:
        return Sample(None, None, result.reason, result.detail, result.attempts, result.retryable)
    found = extract_rating(result.text) if output == "rating" else extract_verdict(result.text)
    if not found.ok:
        return Sample(None, result.text, found.reason, found.detail, result.attempts, False)
    return Sample(found.value, result.text, attempts=result.attempts)


def combine(item: Item, samples: dict[str, list[Optional[Sample]]]) -> dict[str, Any]:
    """The item's result: the median rating, or the pairwise outcome from both orders; None if no call succeeded."""
    ok = {v: [s for s in ss if s is not None and s.ok] for v, ss in samples.items()}
    if item.model_b is None:
        values = [s.value for s in ok["single"]]
        return {"score": statistics.median(values) if values else None}
    if not ok["AB"] or not ok["BA"]:
        return {"outcome": None}
    # each order's majority verdict from the first model's side: A wins in AB, B wins in BA
    side = {"AB": {"A": "win", "B": "loss", "C": "tie"}, "BA": {"A": "loss", "B": "win", "C": "tie"}}
    votes = {v: Counter(side[v][s.value] for s in ok[v]).most_common() for v in ("AB", "BA")}
    first = {v: (c[0][0] if len(c) == 1 or c[0][1] > c[1][1] else "tie") for v, c in votes.items()}
    outcome = first["AB"] if first["AB"] == first["BA"] else "tie"  # inconsistent orders count as a tie
    return {"outcome": outcome, "by_order": first}


class JudgmentStore:
    """The judgments file: rows keyed by (model, model_b, question, turn). Each finished call appends its item's row
    (a later row of a key supersedes earlier ones); `compact` rewrites the file atomically, one row per key in item
    order. A last line cut short by a kill is dropped on reading (its calls are repeated).

    Several processes may judge into one file (two models of one run directory): every append and rewrite holds
    the file's cross-process lock (`<file>.lock`, launch.filelock), and a rewrite starts from the rows on disk, so
    rows another process wrote are kept."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: dict[tuple, dict[str, Any]] = {}
        self.compacted = True
        if self.path.exists():
            self.rows, self.compacted = self._read()
        self._appendable = self.compacted
        """The file may be appended to: compacted when this run started, or since written only by whole-line
        appends (a torn last line from a kill must be rewritten away before anything is appended after it)."""
        self.lock_file = self.path.with_name(self.path.name + ".lock")
        """Held (launch.filelock) by whichever process appends to or rewrites the file."""
        self._lock = threading.Lock()
        self._order: dict[tuple, int] = {}

    def _read(self) -> tuple[dict[tuple, dict[str, Any]], bool]:
        """(the latest row per key on disk, whether the file is already compact: one row per key, whole lines)."""
        rows: dict[tuple, dict[str, Any]] = {}
        compact = True
        lines = read_jsonl_lines(self.path, "judgments", torn_tail_ok=True)
        for lineno, row, _ in lines:
            try:
                key = (row["model"], row.get("model_b"), row["question_id"], row["turn"])
            except KeyError as e:
                raise EvalError(f"judgments file {self.path} line {lineno}: missing field {e}; delete the "
                                f"file to judge again from scratch") from e
            compact &= key not in rows
            rows[key] = row
        compact &= all(ends for _, _, ends in lines) and self.path.read_bytes().endswith(b"\n")
        return rows, compact

    def order_like(self, items: list[Item]) -> None:
        """Write rows of these items in this order (others after them), whatever order calls finish in."""
        self._order = {item.key: i for i, item in enumerate(items)}
        last = len(self._order)
        self.compacted &= list(self.rows) == sorted(self.rows, key=lambda k: self._order.get(k, last))
        self._appendable = self.compacted

    def reusable(self, item: Item, samples: int) -> dict[str, list[Optional[Sample]]]:
        """Stored calls for this item that need no repeat (same input; success or a non-transient failure)."""
        row = self.rows.get(item.key)
        out: dict[str, list[Optional[Sample]]] = {v: [None] * samples for v in item.variants}
        if not row or row.get("input_digest") != item.input_digest:
            return out
        for variant, stored in (row.get("calls") or {}).items():
            if variant not in out:
                continue
            for i, d in enumerate(stored[:samples]):
                s = Sample.from_dict(d)
                out[variant][i] = None if (not s.ok and s.retryable) else s
        return out

    def put(self, item: Item, samples: dict[str, list[Optional[Sample]]], meta: dict[str, Any]) -> None:
        row = {"question_id": item.question.question_id, "model": item.model, "model_b": item.model_b,
               "turn": item.turn, "category": item.question.category, "prompt": item.prompt.name,
               "kind": item.prompt.kind, "input_digest": item.input_digest, **meta,
               "user_prompt": item.variants[next(iter(item.variants))][-1]["content"],
               **combine(item, samples),
               "calls": {v: [s.to_dict() if s else None for s in ss] for v, ss in samples.items()},
               "tstamp": time.time()}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock, exclusive(self.lock_file):
            # another writer killed mid-append may have left a torn last line: rewrite it away before appending
            if not self._appendable or not _ends_whole(self.path):
                self._compact_locked()
            self.rows[item.key] = row
            # one write of the whole line, flushed before the next call is stored: a kill leaves at most one
            # torn last line, which reading drops
            with self.path.open("ab") as f:
                f.write(line)
            self.compacted = False
            self._appendable = True

    def compact(self) -> None:
        """Rewrite the file atomically: one row per key (the latest on disk, whoever wrote it), in item order."""
        if not self.rows and not self.path.exists():
            return
        with self._lock, exclusive(self.lock_file):
            self._compact_locked()

    def _compact_locked(self) -> None:
        # start from the file: another process may have appended rows since this one last read it
        on_disk = self._read()[0] if self.path.exists() else {}
        merged = on_disk | {key: row for key, row in self.rows.items() if key not in on_disk}
        last = len(self._order)
        ordered = sorted(merged.items(), key=lambda kv: self._order.get(kv[0], last))
        self.rows = dict(ordered)
        write_jsonl(self.path, (r for _, r in ordered))
        self.compacted = self._appendable = True


def _ends_whole(path: Path) -> bool:
    """The file is missing, empty, or ends with a newline (its last line is whole)."""
    try:
        with path.open("rb") as f:
            if f.seek(0, 2) == 0:
                return True
            f.seek(-1, 2)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


@dataclass
class Summary:
    """What one judging run did."""

    items: int
    calls: int
    failed_calls: int
    by_reason: dict[str, int]
    new_calls: int
    unattempted: int

    @property
    def failure_share(self) -> float:
        return self.failed_calls / self.calls if self.calls else 0.0


def seed_for(base: int, item: Item, variant: str, sample: int) -> int:
    return int(digest(base, item.question.question_id, item.turn, variant, sample), 16) % (2**31 - 1)


def run_judging(items: list[Item], store: JudgmentStore, backend: Backend, samples: int, temperature: float,
                max_tokens: int, seed: int, meta: dict[str, Any]) -> Summary:
    """Call the judge for every missing sample of every item, saving after each call; return the tally."""
    store.order_like(items)
    state = {item.key: store.reusable(item, samples) for item in items}
    pending: list[tuple[Item, str, int]] = [(item, v, i) for item in items for v, ss in state[item.key].items()
                                            for i, s in enumerate(ss) if s is None]
    requests = [CallRequest(item.variants[v], temperature, max_tokens, seed_for(seed, item, v, i),
                            item.prompt.output) for item, v, i in pending]

    progress = Progress(total=len(requests), what="judge calls")

    def done(index: int, result: CallResult) -> None:
        item, variant, i = pending[index]
        sample = state[item.key][variant][i] = sample_from_call(result, item.prompt.output)
        store.put(item, state[item.key], meta)
        progress.update(failed=sample.reason, retries=result.attempts - 1)

    try:
        if requests:
            backend.run(requests, done)
    finally:
        progress.close()
        store.compact()  # also on Ctrl-C or a termination signal: every stored call stays, once
    outcomes = [s for item in items for ss in state[item.key].values() for s in ss]
    failed = [s for s in outcomes if s is not None and not s.ok]
    return Summary(items=len(items), calls=len(outcomes), failed_calls=len(failed),
                   by_reason=dict(Counter(s.reason for s in failed)), new_calls=len(requests),
                   unattempted=sum(s is None for s in outcomes))
