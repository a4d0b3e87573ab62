"""Alpaca records → token ids with labels on the response only, through one chat template saved as template.jinja.

    records = load_records(recipe.data)                   # validated before any model is loaded
    template = build_template(recipe.data.template, tokenizer)
    dataset = tokenize_records(records, tokenizer, template, max_length=512)

Records are `{instruction, input, output}` (input may be missing or empty). Every record becomes a conversation
over `messages`, rendered by a transformers chat template, so training and evaluation format prompts identically:

* template `alpaca`: the Alpaca prompt (exact header below). A record is one user turn
  `{"role": "user", "content": instruction, "input": input}` and one assistant turn `{"role": "assistant",
  "content": output}`. Two-turn rule (MT-Bench): the header appears once; each later user turn is rendered as
  `\\n\\n### Instruction:\\n…\\n\\n### Response:\\n` after the previous answer and its end-of-sequence token.
  A system message is an error (the Alpaca format has none).
* template `chat`: the model's own chat template; a record's user turn is the instruction, followed by a blank
  line and the input when there is one.

The loss covers the assistant's tokens (its answer and end token) only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_HEADER_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n")
"""The Stanford Alpaca prompt header; reproduced exactly because users' tools and checkpoints expect it."""

_ALPACA_TEMPLATE = """{#- sspeft Alpaca chat template: one header, then ### Instruction / ### Input / ### Response turns -#}
{%- set first_user = messages | selectattr('role', 'equalto', 'user') | first -%}
{{- bos_prefix -}}
{%- if first_user is defined and first_user.get('input') -%}
{{- header_with_input -}}
{%- else -%}
{{- header -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{- raise_exception('The Alpaca template has no system turn; drop the system message') -}}
{%- elif message['role'] == 'user' -%}
{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}
{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}
{%- if message.get('input') %}{{ '### Input:\\n' + message['input'] + '\\n\\n' }}{% endif -%}
{{- '### Response:\\n' -}}
{%- elif message['role'] == 'assistant' -%}
{{- message['content'] + eos_token -}}
{%- else -%}
{{- raise_exception('Unknown role ' + message['role'] + ' for the Alpaca template') -}}
{%- endif -%}
{%- endfor -%}
"""


class DataError(ValueError):
    """Training data is missing or malformed; the message names the file, the record index and the field."""


@dataclass
class Example:
    """One validated Alpaca record."""

    instruction: str
    input: str
    output: str


def load_records(path: str, split: str = "train", limit: int | None = None) -> list[Example]:
    """Read and validate Alpaca records from a .json/.jsonl file or a datasets hub id."""
    if not path:
        raise DataError("data.path is empty; give an Alpaca-format .json/.jsonl file or a datasets hub id")
    local = Path(path)
    if local.suffix in (".json", ".jsonl") or local.is_absolute() or local.exists():
        if not local.is_file():
            raise DataError(f"data.path = {path!r} does not exist")
        raw = _read_local(local)
    else:
        raw = _read_hub(path, split)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise DataError(f"data.path = {path!r} holds no records")
    return [_validate(i, record, path) for i, record in enumerate(raw)]


def _read_local(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no} is not valid JSON: {e}") from e
        return rows
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _read_hub(repo_id: str, split: str) -> list[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except Exception as e:  # offline, missing or private: one clear message
        raise DataError(f"data.path = {repo_id!r} is not a local file and loading it as a datasets hub id "
                        f"failed ({type(e).__name__}: {e})") from e
    return list(ds)


def _validate(index: int, record: Any, source: str) -> Example:
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, expected an object with instruction/input/output")
    values = {}
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = record.get(key)
        if value is None and not required:
            value = ""
        if required and (value is None or (isinstance(value, str) and not value.strip())):
            raise DataError(f"{where}: field {key!r} is missing or empty")
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} is {value!r}, expected a string")
        values[key] = value
    return Example(**values)


def build_template(kind: str, tokenizer: Any) -> str:
    """The chat template (Jinja source) training uses and template.jinja records."""
    if kind == "chat":
        template = getattr(tokenizer, "chat_template", None)
        if not template or not isinstance(template, str):
            raise DataError("data.template = 'chat' but the model's tokenizer has no chat template; use "
                            "data.template=alpaca")
        return template
    if kind != "alpaca":
        raise DataError(f"data.template = {kind!r}; expected 'alpaca' or 'chat'")
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has no eos_token; the Alpaca template ends each answer with it")
    # a tokenizer that prepends BOS to plain text expects it before a chat too (chat templates tokenize without
    # special tokens), so the template writes it itself
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    bos = "{{- bos_token -}}" if adds_bos else ""
    return (_ALPACA_TEMPLATE.replace("{{- bos_prefix -}}", bos)
            .replace("{{- header_with_input -}}", "{{- " + json.dumps(ALPACA_HEADER_WITH_INPUT) + " -}}")
            .replace("{{- header -}}", "{{- " + json.dumps(ALPACA_HEADER) + " -}}"))


def messages_for(example: Example, kind: str) -> list[dict[str, str]]:
    """The conversation an Alpaca record becomes (see the module docstring)."""
    if kind == "alpaca":
        user = {"role": "user", "content": example.instruction}
        if example.input:
            user["input"] = example.input
    else:
        content = example.instruction + (f"\n\n{example.input}" if example.input else "")
        user = {"role": "user", "content": content}
    return [user, {"role": "assistant", "content": example.output}]


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def split_prompt_completion(tokenizer: Any, template: str, example: Example, kind: str) -> tuple[str, str]:
    """(prompt text, completion text) with prompt + completion == the rendered conversation."""
    messages = messages_for(example, kind)
    prompt = render(tokenizer, template, messages[:1], generation_prompt=True)
    full = render(tokenizer, template, messages, generation_prompt=False)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the user turn differently with and without the answer, so "
                        "the response cannot be separated for response-only loss; use data.template=alpaca")
    return prompt, full[len(prompt):]


def tokenize_records(records: list[Example], tokenizer: Any, template: str, kind: str, max_length: int,
                     ) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and labels (-100 on the prompt) per record, truncated to max_length.

    Returns the rows and how many records were dropped because their prompt alone fills max_length.
    """
    rows, dropped = [], 0
    for example in records:
        prompt, completion = split_prompt_completion(tokenizer, template, example, kind)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
        ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
        if all(label == -100 for label in labels):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise DataError(f"every record's prompt fills data.max_length = {max_length} tokens, leaving no response "
                        f"to train on; raise data.max_length")
    return rows, dropped
