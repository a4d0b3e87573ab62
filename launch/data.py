"""Training records → token ids with labels on the assistant's turns only, through one chat template saved as
template.jinja.

    records = load_records(recipe.data.path)              # validated before any model is loaded
    template = build_template(recipe.data.template, tokenizer)
    rows, dropped = sft_rows(records, tokenizer, template, recipe.data.template, max_length=512)  # for TRL

`data.path` is a .json / .jsonl / .parquet file, a `datasets.save_to_disk` directory or a datasets hub id holding
one of the record formats TRL's SFTTrainer reads (one format per dataset):

* Alpaca `{instruction, input, output}` (input may be missing or empty): one user turn and one assistant turn,
  the way TRL's prompt/completion format reads it;
* prompt/completion `{prompt, completion}`: strings (a user turn and an assistant turn) or lists of messages
  (the loss covers the completion only);
* conversational `{messages: [{role, content}, ...]}` with system/user/assistant roles (the loss covers every
  assistant turn).

Every record becomes a conversation rendered by a transformers chat template, so training and evaluation format
prompts identically:

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
from typing import Any, Optional

from launch.recipe import shown

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
    """One validated record: an Alpaca-style single turn, or a conversation in `messages`."""

    instruction: str
    input: str
    output: str
    messages: Optional[list[dict[str, str]]] = None
    """A conversation (messages or conversational prompt/completion records); the fields above are then empty."""
    prompt_turns: int = 0
    """Leading messages that are never trained on (the prompt of a conversational prompt/completion record)."""


FORMATS = ("alpaca", "prompt/completion", "messages")
ROLES = ("system", "user", "assistant")
_SUFFIXES = (".json", ".jsonl", ".parquet")


def load_records(path: str, split: str = "train", limit: int | None = None) -> list[Example]:
    """Read and validate records (see the module docstring) from a file, a save_to_disk directory or a hub id."""
    if not path:
        raise DataError("data.path is empty; give a .json/.jsonl/.parquet file, a datasets.save_to_disk directory "
                        "or a datasets hub id")
    local = Path(path)
    if local.is_dir():
        raw = _read_saved(local, split)
    elif local.suffix in _SUFFIXES or local.is_absolute() or local.exists():
        if not local.exists():
            raise DataError(f"data.path = {path!r} does not exist")
        if local.suffix not in _SUFFIXES:
            raise DataError(f"data.path = {path!r} is a {local.suffix or 'suffix-less'} file; expected a "
                            f"JSON/JSONL/Parquet file or a datasets.save_to_disk directory")
        raw = _read_local(local)
    else:
        raw = _read_hub(path, split)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise DataError(f"data.path = {path!r} holds no records")
    kind = record_format(raw[0], f"{path}: record 0")
    return [_validate(i, record, path, kind) for i, record in enumerate(raw)]


def _read_local(path: Path) -> list[Any]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    text = _decode(path)
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


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                        f"re-encode the file as UTF-8") from e


def _read_saved(path: Path, split: str) -> list[Any]:
    """A datasets.save_to_disk directory: a Dataset, or a DatasetDict from which `split` is read."""
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"data.path = {str(path)!r} is a directory, expected a JSON/JSONL/Parquet file or a "
                        f"datasets.save_to_disk directory")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"data.split = {split!r} is not a split of {path}; it has {sorted(loaded)}")
        loaded = loaded[split]
    return list(loaded)


def _read_hub(repo_id: str, split: str) -> list[Any]:
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except Exception as e:  # offline, missing or private: one clear message
        raise DataError(f"data.path = {repo_id!r} is not a local file and loading it as a datasets hub id "
                        f"failed ({type(e).__name__}: {e})") from e
    return list(ds)


def record_format(record: Any, where: str) -> str:
    """Which of FORMATS a record is in (by its fields, as TRL tells them apart)."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, expected an object (Alpaca, prompt/completion or "
                        f"messages record)")
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt/completion"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise DataError(f"{where} has fields {sorted(record)}; expected an Alpaca record (instruction, input, output), "
                    f"a prompt/completion record or a conversational messages record")


def _validate(index: int, record: Any, source: str, kind: str) -> Example:
    where = f"{source}: record {index}"
    found = record_format(record, where)
    if found != kind:
        raise DataError(f"{where} is a {found} record but record 0 is a {kind} record; use one format per dataset")
    if kind == "messages":
        messages = _messages(record["messages"], f"{where}: field 'messages'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: field 'messages' has no assistant turn to train on")
        return Example("", "", "", messages=messages)
    if kind == "prompt/completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Example(**_strings(record, where, (("prompt", True), ("completion", True))))
        prompt_turns = _messages(prompt, f"{where}: field 'prompt'")
        completion_turns = _messages(completion, f"{where}: field 'completion'")
        if not any(m["role"] == "assistant" for m in completion_turns):
            raise DataError(f"{where}: field 'completion' has no assistant turn to train on")
        return Example("", "", "", messages=prompt_turns + completion_turns, prompt_turns=len(prompt_turns))
    return Example(**_strings(record, where, (("instruction", True), ("input", False), ("output", True))))


def _strings(record: dict, where: str, keys: tuple[tuple[str, bool], ...]) -> dict[str, str]:
    """Alpaca / string prompt-completion fields → Example's instruction, input and output."""
    names = {"prompt": "instruction", "completion": "output"}
    values = {"input": ""}
    for key, required in keys:
        value = record.get(key)
        if value is None and not required:
            value = ""
        if required and (value is None or (isinstance(value, str) and not value.strip())):
            raise DataError(f"{where}: field {key!r} is missing or empty")
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} is {shown(value)}, expected a string")
        values[names.get(key, key)] = value
    return values


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} is {shown(value)}, expected a non-empty list of {{role, content}} messages")
    out = []
    for turn, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {turn} is {shown(message)}, expected an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {turn} has role {shown(role)}, expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {turn} has content {shown(content)}, expected a string")
        out.append({"role": role, "content": content})
    return out


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
    """The conversation a record becomes (see the module docstring)."""
    if example.messages is not None:
        return [dict(m) for m in example.messages]
    if kind == "alpaca":
        user = {"role": "user", "content": example.instruction}
        if example.input:
            user["input"] = example.input
    else:
        content = example.instruction + (f"\n\n{example.input}" if example.input else "")
        user = {"role": "user", "content": content}
    return [user, {"role": "assistant", "content": example.output}]


def apply_template(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The messages as text through the chat template (the tokenizer's apply_chat_template, untokenized)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def split_prompt_completion(tokenizer: Any, template: str, example: Example, kind: str) -> tuple[str, str]:
    """(prompt text, completion text) of a single-turn record, with prompt + completion == the rendered record."""
    segments = text_segments(tokenizer, template, example, kind)
    if len(segments) != 2:
        raise DataError("split_prompt_completion takes a record with one assistant turn after its prompt")
    return segments[0][0], segments[1][0]


def text_segments(tokenizer: Any, template: str, example: Example, kind: str) -> list[tuple[str, bool]]:
    """The rendered record cut into (text, trained) pieces; the pieces concatenate to the rendered conversation.

    Each trained assistant turn is the text its rendering adds after the generation prompt of the conversation
    before it, so training sees exactly the prompt text that generation will see.
    """
    messages = messages_for(example, kind)
    full = _render_checked(tokenizer, template, messages, False)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < example.prompt_turns:
            continue
        prompt = _render_checked(tokenizer, template, messages[:i], True)
        upto = _render_checked(tokenizer, template, messages[:i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= done):
            raise DataError("the chat template renders a conversation's earlier turns differently once later turns "
                            "follow, so the assistant's turns cannot be separated for assistant-only loss; use "
                            "data.template=alpaca")
        segments += [(prompt[done:], False), (upto[len(prompt):], True)]
        done = len(upto)
    if done < len(full):
        segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text or trained]


def _render_checked(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return apply_template(tokenizer, template, messages, generation_prompt)
    except Exception as e:  # jinja raise_exception (e.g. a system turn under the Alpaca template)
        raise DataError(f"the chat template refused a record: {e}") from e


def tokenize_records(records: list[Example], tokenizer: Any, template: str, kind: str, max_length: int,
                     ) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and labels (-100 outside the assistant's turns) per record, truncated to max_length.

    Returns the rows and how many records were dropped because their prompt alone fills max_length.
    Multi-turn records are tokenized here rather than by TRL: TRL's assistant-only loss needs `{% generation %}`
    markers in the chat template, which the model's own templates and the saved template.jinja (read by vLLM)
    do not have. Each piece is tokenized on its own so the prompt tokens are those generation will see.
    """
    rows, dropped = [], 0
    for index, example in enumerate(records):
        try:
            segments = text_segments(tokenizer, template, example, kind)
        except DataError as e:
            raise DataError(f"record {index}: {e}") from e
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in segments:
            piece = tokenizer(text, add_special_tokens=False).input_ids
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == -100 for label in labels):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if not rows:
        raise DataError(f"every record's prompt fills data.max_length = {max_length} tokens, leaving no response "
                        f"to train on; raise data.max_length")
    return rows, dropped


def sft_rows(records: list[Example], tokenizer: Any, template: str, kind: str, max_length: int,
             ) -> tuple[list[dict[str, Any]], int]:
    """Rows for TRL's SFTTrainer and how many records will be dropped because their prompt fills max_length.

    Single-turn records go to TRL as conversational prompt/completion rows: its completion-only loss gives the
    same ids and labels as tokenize_records (tests/test_trl_formats.py measures it). Conversations with several
    trained turns are tokenized by tokenize_records (see its docstring for why TRL cannot).
    """
    conversations = [messages_for(e, kind) for e in records]
    single = all(e.messages is None or _trained_turns(e) == [len(e.messages) - 1] for e in records)
    if not single:
        return tokenize_records(records, tokenizer, template, kind, max_length)
    rows, dropped = [], 0
    for index, (example, messages) in enumerate(zip(records, conversations)):
        # TRL drops such records silently; they are counted here so the run reports them
        try:
            prompt = text_segments(tokenizer, template, example, kind)[0][0]
        except DataError as e:
            raise DataError(f"record {index}: {e}") from e
        if len(tokenizer(prompt, add_special_tokens=False).input_ids) >= max_length:
            dropped += 1
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    if dropped == len(rows):
        raise DataError(f"every record's prompt fills data.max_length = {max_length} tokens, leaving no response "
                        f"to train on; raise data.max_length")
    return rows, dropped


def _trained_turns(example: Example) -> list[int]:
    messages = example.messages or []
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example.prompt_turns]
