"""The in-process transformers judge, constrained through `generate` with a prefix-constrained logits processor:
its greedy choice equals the allowed string an explicit step-by-step argmax over the allowed tokens picks."""

from __future__ import annotations

import pytest
import torch

from eval.answers.chat_template import tokenize_chat
from eval.judging.calls import CallRequest
from eval.judging.verdicts import RATING_CHOICES, VERDICT_CHOICES
from eval_helpers import make_tiny_llama

PROMPTS = ["Rate the answer: the quick brown fox.", "Which is better, one or two?", "seven eight nine ten"]


def _oracle(model, tokenizer, ids: list[int], choices: list[str]) -> str:
    """Greedy walk: at each step the highest-logit token among those that keep a prefix of an allowed string."""
    spelled = {c: tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices}
    prefix: list[int] = []
    while prefix not in spelled.values():
        allowed = sorted({t[len(prefix)] for t in spelled.values() if t[:len(prefix)] == prefix})
        with torch.no_grad():
            logits = model(torch.tensor([ids + prefix])).logits[0, -1]
        prefix.append(allowed[int(logits[allowed].argmax())])
    return next(c for c, t in spelled.items() if t == prefix)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from eval.answers.generators import HFGenerator
    from eval.judging.local import LocalBackend

    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-judge"))
    engine = HFGenerator(model_dir, "fp32")
    return engine, LocalBackend(model_dir, "hf", "fp32", True, 0, generator=engine)


@pytest.mark.parametrize("output", ["rating", "verdict"])
def test_constrained_choice_matches_a_greedy_walk(judge, output):
    engine, backend = judge
    choices = RATING_CHOICES if output == "rating" else VERDICT_CHOICES
    requests = [CallRequest([{"role": "user", "content": p}], 0.0, 16, 0, output) for p in PROMPTS]
    texts: dict[int, str] = {}
    backend.run(requests, lambda i, result: texts.__setitem__(i, result.text))
    for i, r in enumerate(requests):
        assert texts[i] == _oracle(engine.model, backend.tokenizer, tokenize_chat(backend.tokenizer, r.messages), list(choices))
    # sampled: always one of the allowed strings, reproducible for a seed
    hot = [CallRequest(r.messages, 1.5, 16, seed, output) for r in requests[:2] for seed in (1, 2)]
    first: dict[int, str] = {}
    again: dict[int, str] = {}
    backend.run(hot, lambda i, result: first.__setitem__(i, result.text))
    backend.run(hot, lambda i, result: again.__setitem__(i, result.text))
    assert first == again and set(first.values()) <= set(choices)
