"""A conversation as prompt token ids through the run's chat template (template.jinja, the one training used).

    tok = load_tokenizer(model_dir, chat_template_text)
    ids = tokenize_chat(tok, [{"role": "user", "content": "Hi"}])

Every generator receives these ids, so the prompt a model is evaluated with is the one it was trained with,
whichever engine generates; the local judge tokenises its prompts the same way through the judge's own template.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from eval.common import EvalError


def load_tokenizer(model_dir: Path, chat_template: Optional[str] = None):
    """The checkpoint's tokenizer, with `chat_template` (the run's template.jinja) replacing its own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if chat_template is not None:
        tok.chat_template = chat_template
    if not tok.chat_template:
        raise EvalError(f"{model_dir} has no chat template and none was given; evaluation applies one to every "
                        f"conversation (the run directory's template.jinja)")
    return tok


def template_sha256(tokenizer) -> str:
    """The SHA-256 (hex) of the chat template `tokenizer` applies (of "" when it has none), recorded beside answers
    so that answers made through different templates are told apart."""
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()


def tokenize_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation through the tokenizer's chat template, plus the assistant's generation prompt
    (no extra special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
