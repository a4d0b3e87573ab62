"""Alpaca records → prompt/answer through one chat template: exact Alpaca header, two-turn rule, response-only
labels, the model's own chat template, and record validation with the failing index."""

from __future__ import annotations

import json

import pytest

from launch.data import (ALPACA_HEADER, ALPACA_HEADER_WITH_INPUT, DataError, Example, apply_template,
                         build_template, load_records, split_prompt_completion, tokenize_records)
from launch_helpers import build_tokenizer

STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_alpaca_prompt_is_the_stanford_format(tok):
    template = build_template("alpaca", tok)
    prompt, answer = split_prompt_completion(tok, template, Example("Add the numbers.", "2 and 3", "5"), "alpaca")
    assert prompt == STANFORD_INPUT.format(instruction="Add the numbers.", input="2 and 3")
    assert answer == "5" + tok.eos_token
    prompt, _ = split_prompt_completion(tok, template, Example("Say hi.", "", "hi"), "alpaca")
    assert prompt == STANFORD_NO_INPUT.format(instruction="Say hi.")
    assert STANFORD_NO_INPUT.startswith(ALPACA_HEADER) and STANFORD_INPUT.startswith(ALPACA_HEADER_WITH_INPUT)


def test_two_turn_rule_and_system_turn(tok):
    template = build_template("alpaca", tok)
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}]
    text = apply_template(tok, template, messages, generation_prompt=True)
    assert text == (STANFORD_NO_INPUT.format(instruction="q1") + "a1" + tok.eos_token
                    + "\n\n### Instruction:\nq2\n\n### Response:\n")
    assert text.count("Below is an instruction") == 1
    with pytest.raises(Exception, match="no system turn"):
        apply_template(tok, template, [{"role": "system", "content": "s"}] + messages, generation_prompt=True)


def test_labels_cover_only_the_response(tok):
    template = build_template("alpaca", tok)
    examples = [Example("Name the colour of the sky.", "", "The sky is blue.")]
    rows, dropped = tokenize_records(examples, tok, template, "alpaca", max_length=512)
    assert dropped == 0
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    answer = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tok.decode(answer) == "The sky is blue." + tok.eos_token
    first = next(i for i, lab in enumerate(labels) if lab != -100)
    assert all(lab == -100 for lab in labels[:first]) and labels[first:] == ids[first:]
    # truncation keeps the prompt and cuts the answer; a prompt that fills max_length is dropped
    short, _ = tokenize_records(examples, tok, template, "alpaca", max_length=first + 2)
    assert len(short[0]["input_ids"]) == first + 2
    with pytest.raises(DataError, match="raise data.max_length"):
        tokenize_records(examples, tok, template, "alpaca", max_length=first)


def test_chat_mode_uses_the_models_template(tok):
    template = build_template("chat", tok)
    assert template == tok.chat_template
    prompt, answer = split_prompt_completion(tok, template, Example("Add.", "2 and 3", "5"), "chat")
    assert prompt == "<|user|>\nAdd.\n\n2 and 3</s>\n<|assistant|>\n" and answer == "5</s>\n"


def test_chat_mode_without_a_template(tok):
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(DataError, match="data.template=alpaca"):
            build_template("chat", tok)
    finally:
        tok.chat_template = saved


def test_records_are_validated_with_their_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": 3, "output": "d"}]))
    with pytest.raises(DataError, match=r"record 1: field 'input' is 3, expected a string"):
        load_records(str(path))
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, "text"]))
    with pytest.raises(DataError, match="record 1 is a str"):
        load_records(str(path))
    path.write_text(json.dumps({"instruction": "a"}))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(str(path))
    path.write_text(json.dumps([{"instruction": "a", "output": "b", "input": None}] * 3))
    records = load_records(str(path), limit=2)
    assert len(records) == 2 and records[0] == Example("a", "", "b")


def test_shared_alpaca_sample_loads(shared_dir):
    records = load_records(str(shared_dir / "data/alpaca/alpaca_en_demo.json"))
    assert len(records) > 100 and all(r.instruction and r.output for r in records)


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataError, match="not a local file and loading it as a datasets hub id failed"):
        load_records("some-org/no-such-dataset")
