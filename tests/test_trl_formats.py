"""The record formats TRL users have (Alpaca, prompt/completion, conversational messages) from JSON, JSONL, Parquet
and save_to_disk directories; assistant-only labels measured against TRL's own dataset preparation; and clear
errors for bytes that are not UTF-8 and for directories that are not datasets."""

from __future__ import annotations

import json

import pytest

from launch.data import DataError, Example, build_template, load_records, tokenize_records
from launch_helpers import RECORDS, build_tiny_llama, build_tokenizer

CONVERSATION = [
    {"role": "user", "content": "Name the colour of the sky."}, {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And at night?"}, {"role": "assistant", "content": "Dark, with stars."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _write(path, rows, container):
    if container == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows))
    elif container == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif container == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train": ds}) if container == "dict" else ds).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("container", ["json", "jsonl", "parquet", "saved", "dict"])
def test_every_format_from_every_container(tmp_path, container):
    alpaca = load_records(_write(tmp_path / "a", RECORDS, container))
    assert alpaca == [Example(r["instruction"], r["input"], r["output"]) for r in RECORDS]
    plain = [{"prompt": r["instruction"], "completion": r["output"]} for r in RECORDS]
    assert load_records(_write(tmp_path / "p", plain, container)) == [
        Example(r["instruction"], "", r["output"]) for r in RECORDS]
    chats = [{"messages": CONVERSATION, "id": 1}, {"messages": CONVERSATION[:2], "id": 2}]
    loaded = load_records(_write(tmp_path / "m", chats, container))
    assert [e.messages for e in loaded] == [CONVERSATION, CONVERSATION[:2]]
    assert all(e.prompt_turns == 0 for e in loaded)
    split = [{"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]}]
    (record,) = load_records(_write(tmp_path / "c", split, container))
    assert record.messages == CONVERSATION and record.prompt_turns == 3


def _trained_text(tok, row):
    """The decoded label runs of one row, one string per contiguous trained span."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return [tok.decode(s) for s in spans + ([current] if current else [])]


@pytest.mark.parametrize("kind", ["alpaca", "chat"])
def test_labels_cover_every_assistant_turn_and_only_those(tok, kind):
    template = build_template(kind, tok)
    end = tok.eos_token if kind == "alpaca" else "</s>\n"
    rows, _ = tokenize_records([Example("", "", "", messages=CONVERSATION)], tok, template, kind, 512)
    assert _trained_text(tok, rows[0]) == ["The sky is blue." + end, "Dark, with stars." + end]
    assert tok.decode(rows[0]["input_ids"]) == tok.apply_chat_template(CONVERSATION, chat_template=template,
                                                                       tokenize=False)
    # a conversational prompt/completion record trains on the completion only
    rows, _ = tokenize_records([Example("", "", "", messages=CONVERSATION, prompt_turns=3)], tok, template, kind, 512)
    assert _trained_text(tok, rows[0]) == ["Dark, with stars." + end]


def test_alpaca_template_refuses_a_system_turn_with_the_record_index(tok):
    records = [Example("a", "", "b"), Example("", "", "", messages=[{"role": "system", "content": "s"}]
                                              + CONVERSATION)]
    with pytest.raises(DataError, match="record 1: the chat template refused a record: .*no system turn"):
        tokenize_records(records, tok, build_template("alpaca", tok), "alpaca", 512)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path_factory.mktemp("tiny"))
    return AutoModelForCausalLM.from_pretrained(path)


def _trl_prepared(model, tok, template, rows, tmp_path, **args):
    """TRL's own preparation of `rows` (tokenization, completion/assistant masks → labels, truncation)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok.chat_template = template
    args = {"max_length": 512, **args}
    config = SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, dataset_num_proc=None, **args)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]


@pytest.mark.parametrize("kind, max_length", [("alpaca", 512), ("chat", 512), ("alpaca", 100)])
def test_single_turn_labels_equal_trls_completion_only_loss(tok, tiny_model, tmp_path, kind, max_length):
    """TRL's prompt/completion preparation of sft_rows gives the same ids and labels as tokenize_records, and drops
    the records sft_rows counts as dropped (at 100 tokens the Alpaca prompts with an input fill it)."""
    from launch.data import sft_rows

    template = build_template(kind, tok)
    saved = tok.chat_template
    try:
        examples = load_records(_write(tmp_path / "a", RECORDS, "json"))
        ours, dropped = tokenize_records(examples, tok, template, kind, max_length)
        rows, counted = sft_rows(examples, tok, template, kind, max_length)
        assert all(set(r) == {"prompt", "completion"} for r in rows)  # handed to TRL, not tokenized here
        theirs = _trl_prepared(tiny_model, tok, template, rows, tmp_path, max_length=max_length)
    finally:
        tok.chat_template = saved
    assert theirs == ours and counted == dropped == len(examples) - len(theirs)
    assert (0 < dropped < len(examples)) == (max_length == 100)


def test_multi_turn_rows_are_tokenized_here(tok):
    from launch.data import sft_rows

    template = build_template("chat", tok)
    records = [Example("a", "", "b"), Example("", "", "", messages=CONVERSATION)]
    assert sft_rows(records, tok, template, "chat", 512) == tokenize_records(records, tok, template, "chat", 512)


def test_trls_assistant_only_loss_needs_generation_markers(tok, tiny_model, tmp_path):
    """Why multi-turn records are tokenized by launch.data: TRL's assistant-only loss refuses templates without
    `{% generation %}` markers (it patches in a few known model families only), which the model's own templates
    and the saved template.jinja lack."""
    saved = tok.chat_template
    try:
        with pytest.raises((ValueError, RuntimeError), match="generation"):
            _trl_prepared(tiny_model, tok, build_template("chat", tok), [{"messages": CONVERSATION}], tmp_path,
                          assistant_only_loss=True)
    finally:
        tok.chat_template = saved


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(RECORDS[0]).encode() + b"\n"
    path.write_bytes(good * 2 + b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=rf"{path}: line 3 is not UTF-8 \(byte 0xe9"):
        load_records(str(path))


def test_a_directory_is_reported_as_what_it_is(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError, match="is a directory, expected a JSON/JSONL/Parquet file or a "
                                        "datasets.save_to_disk directory"):
        load_records(str(tmp_path / "notes"))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.json"))
    saved = _write(tmp_path / "dd", RECORDS, "dict")
    with pytest.raises(DataError, match=r"data.split = 'test' is not a split of .*\['train'\]"):
        load_records(saved, split="test")


@pytest.mark.parametrize("rows, needle", [
    ([{"text": "hi"}], "record 0 has fields ['text']; expected an Alpaca record"),
    ([{"messages": CONVERSATION}, {"instruction": "a", "output": "b"}], "record 1 is a alpaca record but record 0 "
                                                                       "is a messages record"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], "message 0 has role 'bot'"),
    ([{"messages": CONVERSATION[:1]}], "has no assistant turn"),
    ([{"prompt": "q", "completion": ""}], "field 'completion' is missing or empty"),
    ([{"prompt": CONVERSATION[:1], "completion": CONVERSATION[:1]}], "field 'completion' has no assistant turn"),
])
def test_malformed_records_name_index_and_field(tmp_path, rows, needle):
    with pytest.raises(DataError) as err:
        load_records(_write(tmp_path / "x", rows, "jsonl"))
    assert needle in str(err.value)


# A TRL user's SFTConfig fields as they would paste them (TRL 1.16 / transformers 5 names), adapted to a CPU:
# bf16 off (with model.dtype fp32), two steps.
TRL_USER_SFTCONFIG = """
learning_rate: 1.0e-2
num_train_epochs: 1
max_steps: 2
per_device_train_batch_size: 2
per_device_eval_batch_size: 2
gradient_accumulation_steps: 1
gradient_checkpointing: true
lr_scheduler_type: cosine
warmup_steps: 0.1
weight_decay: 0.01
adam_beta2: 0.95
max_grad_norm: 1.0
optim: adamw_torch
logging_strategy: steps
logging_steps: 1
log_level: info
max_length: 128
packing: false
save_strategy: steps
save_steps: 2
save_total_limit: 1
seed: 42
bf16: false
report_to:
- tensorboard
"""


def test_a_trl_users_sftconfig_and_messages_train_through_sspeft_train(tmp_path, monkeypatch):
    import sys

    import torch
    import yaml

    import sspeft_cli
    from launch.rundir import RunDir

    model = build_tiny_llama(tmp_path / "model")
    data = tmp_path / "chats.jsonl"
    chats = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:2]}] * 4
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    recipe = {"name": "trl-user", "run_dir": str(tmp_path / "run"),
              "model": {"path": str(model), "quantize": "none", "dtype": "fp32"},
              "adapter": {"method": "ssh", "n": 16, "target_modules": ["q_proj", "v_proj"]},
              "data": {"path": str(data), "template": "chat"},
              "train": yaml.safe_load(TRL_USER_SFTCONFIG)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.setattr(sys, "argv", ["sspeft-train", str(path)])
    assert sspeft_cli.train() == 0
    run = RunDir(tmp_path / "run")
    summary = json.loads((run.logs / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["dropped_records"] == 0
    assert (run.adapter / "adapter_model.safetensors").is_file() and list((run.logs / "tensorboard").rglob("*"))
    # the trainer ran with the user's values (read back from the checkpoint's own arguments)
    (checkpoint,) = run.checkpoints.glob("checkpoint-*")
    args = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert (args.adam_beta2, args.weight_decay, args.seed, args.data_seed) == (0.95, 0.01, 42, 42)
    assert args.lr_scheduler_type == "cosine" and args.max_length == 128 and args.output_dir == str(run.checkpoints)
