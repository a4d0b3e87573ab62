"""Judge prompts: this project's own MT-Bench-style wording, or FastChat's judge_prompts.jsonl from a user path.

Eight kinds: single-answer grading (1–10, `[[rating]]`) and pairwise comparison (`[[A]]`/`[[B]]`/`[[C]]`), each
general or reference-guided (math, reasoning, coding), each for turn 1 or for turn 2 given turn 1. Templates use
FastChat's template field names, so `--judge-prompts question_judge_prompts.jsonl` drops in for scores comparable with
published MT-Bench numbers.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from eval.common import EvalError, read_jsonl

Output = Literal["rating", "verdict"]

# our kind → FastChat's prompt name
FASTCHAT_NAMES = {
    "single": "single-v1", "single-ref": "single-math-v1",
    "single-multi": "single-v1-multi-turn", "single-ref-multi": "single-math-v1-multi-turn",
    "pair": "pair-v2", "pair-ref": "pair-math-v1",
    "pair-multi": "pair-v2-multi-turn", "pair-ref-multi": "pair-math-v1-multi-turn",
}

# template fields each kind may use (FastChat's names)
_FIELDS = {
    "single": {"question", "answer"},
    "single-ref": {"question", "answer", "ref_answer_1"},
    "single-multi": {"question_1", "answer_1", "question_2", "answer_2"},
    "single-ref-multi": {"question_1", "answer_1", "question_2", "answer_2", "ref_answer_1", "ref_answer_2"},
    "pair": {"question", "answer_a", "answer_b"},
    "pair-ref": {"question", "answer_a", "answer_b", "ref_answer_1"},
    "pair-multi": {"question_1", "question_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2"},
    "pair-ref-multi": {"question_1", "question_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2",
                       "ref_answer_1", "ref_answer_2"},
}


@dataclass(frozen=True)
class JudgePrompt:
    """One judge prompt: a system message and a user-message template."""

    kind: str
    """One of the eight kinds (single, single-ref, single-multi, ..., pair-ref-multi)."""
    name: str
    """The prompt's name where it came from (ours, or FastChat's e.g. 'single-math-v1')."""
    system: str
    """System message."""
    template: str
    """User message with {template fields}."""

    @property
    def output(self) -> Output:
        return "verdict" if self.kind.startswith("pair") else "rating"

    def messages(self, **fields: str) -> list[dict[str, str]]:
        """Chat messages for the judge; every template field of the template must be given."""
        missing = self.fields_used() - fields.keys()
        if missing:
            raise EvalError(f"judge prompt {self.name!r} needs {sorted(missing)}")
        user = self.template.format_map({k: v for k, v in fields.items()})
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}]

    def fields_used(self) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(self.template) if f}


def kind_for(pairwise: bool, reference: bool, turn: int) -> str:
    """The prompt kind for one grading task."""
    return ("pair" if pairwise else "single") + ("-ref" if reference else "") + ("-multi" if turn == 2 else "")


_SCORE_RULE = ('After your explanation, give a score from 1 (very poor) to 10 (excellent), written exactly in the '
               'form "[[rating]]", for example "Score: [[6]]".')
_VERDICT_RULE = ('After your explanation, state your decision written exactly as "[[A]]" if assistant A answered '
                 'better, "[[B]]" if assistant B answered better, or "[[C]]" if they are equally good.')
_FAIR = ("Do not let the order in which the two replies appear, their length, or the assistants' names sway you. "
         "Stay objective.")

_SYSTEM = {
    "single": ("You are a strict and impartial evaluator of replies written by an AI assistant. Judge the reply to "
               "the user's question below for how helpful, relevant and accurate it is, how deep it goes, whether it "
               "is creative where creativity fits, and whether its level of detail suits the question. Start with "
               "a short, objective explanation. " + _SCORE_RULE),
    "single-ref": ("You are a strict and impartial evaluator of replies written by an AI assistant. The question "
                   "below has a correct answer: you get a reference answer and the assistant's reply. Judge "
                   "correctness first, then helpfulness. Compare the reply with the reference, name every mistake "
                   "and correct it, in a short, objective explanation. " + _SCORE_RULE),
    "single-multi": ("You are a strict and impartial evaluator of replies written by an AI assistant. Below is a "
                     "conversation of two user questions and the assistant's two replies. Judge only the "
                     "assistant's reply to the second question, using the first exchange as context: how helpful, "
                     "relevant and accurate it is, how deep it goes, its creativity and its level of detail. Start "
                     "with a short, objective explanation. " + _SCORE_RULE),
    "single-ref-multi": ("You are a strict and impartial evaluator of replies written by an AI assistant. Below "
                         "are reference answers to two user questions, followed by the assistant's conversation "
                         "with the user. Judge only the assistant's reply to the second question, for correctness "
                         "first and helpfulness second. Compare it with the reference, name every mistake and "
                         "correct it, in a short, objective explanation. " + _SCORE_RULE),
    "pair": ("You are an impartial evaluator comparing the replies of two AI assistants, A and B, to the user "
             "question below. Decide which reply follows the instructions and answers the question better, "
             "weighing helpfulness, relevance, accuracy, depth, creativity and level of detail. Compare the two "
             "in a short explanation. " + _FAIR + " " + _VERDICT_RULE),
    "pair-ref": ("You are an impartial evaluator comparing the replies of two AI assistants, A and B, to a question "
                 "that has a correct answer. You get a reference answer and both replies. Judge correctness first, "
                 "then helpfulness: compare each reply with the reference and name its mistakes in a short "
                 "explanation. " + _FAIR + " " + _VERDICT_RULE),
    "pair-multi": ("You are an impartial evaluator comparing two AI assistants, A and B, each in a two-question "
                   "conversation with the same user. Decide whose reply to the second question is better, weighing "
                   "helpfulness, relevance, accuracy, depth, creativity and level of detail, with the first exchange "
                   "as context. Compare the two in a short explanation. " + _FAIR + " " + _VERDICT_RULE),
    "pair-ref-multi": ("You are an impartial evaluator comparing two AI assistants, A and B, each in a "
                       "two-question conversation with the same user. You get reference answers to both questions. "
                       "Decide whose reply to the second question is more correct, then more helpful: compare each "
                       "with the reference and name its mistakes in a short explanation. " + _FAIR + " "
                       + _VERDICT_RULE),
}


def _block(title: str, body: str) -> str:
    return f"=== {title} ===\n{body}\n=== End of {title} ==="


def _conversation(who: str, a1: str, a2: str) -> str:
    return _block(f"Conversation with {who}",
                  f"USER: {{question_1}}\n\n{who.upper()}: {{{a1}}}\n\nUSER: {{question_2}}\n\n{who.upper()}: {{{a2}}}")


_REF_CONVERSATION = _block("Reference answers", "USER: {question_1}\n\nREFERENCE: {ref_answer_1}\n\n"
                                                "USER: {question_2}\n\nREFERENCE: {ref_answer_2}")
_TEMPLATE = {
    "single": "QUESTION:\n{question}\n\n" + _block("Assistant's reply", "{answer}"),
    "single-ref": ("QUESTION:\n{question}\n\n" + _block("Reference answer", "{ref_answer_1}") + "\n\n"
                   + _block("Assistant's reply", "{answer}")),
    "single-multi": _conversation("Assistant", "answer_1", "answer_2"),
    "single-ref-multi": _REF_CONVERSATION + "\n\n" + _conversation("Assistant", "answer_1", "answer_2"),
    "pair": ("QUESTION:\n{question}\n\n" + _block("Reply of assistant A", "{answer_a}") + "\n\n"
             + _block("Reply of assistant B", "{answer_b}")),
    "pair-ref": ("QUESTION:\n{question}\n\n" + _block("Reference answer", "{ref_answer_1}") + "\n\n"
                 + _block("Reply of assistant A", "{answer_a}") + "\n\n" + _block("Reply of assistant B", "{answer_b}")),
    "pair-multi": _conversation("Assistant A", "answer_a_1", "answer_a_2") + "\n\n"
                  + _conversation("Assistant B", "answer_b_1", "answer_b_2"),
    "pair-ref-multi": _REF_CONVERSATION + "\n\n" + _conversation("Assistant A", "answer_a_1", "answer_a_2") + "\n\n"
                      + _conversation("Assistant B", "answer_b_1", "answer_b_2"),
}


@dataclass(frozen=True)
class PromptSet:
    """The eight judge prompts and where they came from."""

    prompts: dict[str, JudgePrompt]
    """kind → prompt."""
    source: str
    """'builtin' or the path of the FastChat judge prompt file."""

    def __getitem__(self, kind: str) -> JudgePrompt:
        return self.prompts[kind]


def builtin_prompts() -> PromptSet:
    prompts = {kind: JudgePrompt(kind, f"sspeft-{kind}", _SYSTEM[kind], _TEMPLATE[kind]) for kind in _FIELDS}
    for p in prompts.values():
        _check_fields(p, "built-in prompts")
    return PromptSet(prompts, "builtin")


def load_prompt_set(path: str | Path | None) -> PromptSet:
    """Our prompts (path None) or FastChat's judge_prompts.jsonl, every kind present and well-formed."""
    if path is None:
        return builtin_prompts()
    path = Path(path)
    by_name = {}
    for lineno, record in read_jsonl(path, "judge prompts"):
        name = record.get("name")
        for key in ("name", "system_prompt", "prompt_template"):
            if not isinstance(record.get(key), str):
                raise EvalError(f"judge prompts file {path} line {lineno}: field {key!r} is {record.get(key)!r}; "
                                f"expected a string")
        by_name[name] = record
    prompts = {}
    for kind, name in FASTCHAT_NAMES.items():
        if name not in by_name:
            raise EvalError(f"judge prompts file {path} has no prompt named {name!r} (needed for {kind} grading); "
                            f"it holds {sorted(by_name)}")
        record = by_name[name]
        prompt = JudgePrompt(kind, name, record["system_prompt"], record["prompt_template"])
        _check_fields(prompt, f"judge prompts file {path}")
        prompts[kind] = prompt
    return PromptSet(prompts, str(path.resolve()))


def _check_fields(prompt: JudgePrompt, where: str) -> None:
    try:
        used = prompt.fields_used()
    except ValueError as e:
        raise EvalError(f"{where}: prompt {prompt.name!r} has a malformed template ({e})") from e
    unknown = used - _FIELDS[prompt.kind]
    if unknown:
        raise EvalError(f"{where}: prompt {prompt.name!r} uses template fields {sorted(unknown)}; a {prompt.kind} "
                        f"prompt may use {sorted(_FIELDS[prompt.kind])}")
