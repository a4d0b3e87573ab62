"""The bad-input table: one row per hostile or mistaken input to a command line (recipe, training data, adapter
files, eval inputs, Slurm arguments). Every row asserts exit status 2, a message naming the field or file and what
was expected, and that no file was created or changed. The commands run in-process (main(argv)); a command that
would go on to expensive work after accepting the input fails the row instead of doing it."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from cli_table import run_main, snapshot
from eval_helpers import FakeJudgeServer, make_answers, make_questions, make_run
from launch_helpers import build_tiny_llama, write_recipe, write_records



@dataclass
class Row:
    id: str
    cli: str
    """train | merge | generate | judge | report | submit"""
    args: Callable[["World", Path], list[str]]
    expect: tuple[str, ...]
    """Regexes that must all appear in the error output: the field or file, and the expected value."""
    xfail: str = ""


@dataclass
class World:
    """Shared read-only inputs: a tiny LLaMA, training records, a trained-shaped adapter run directory."""

    root: Path
    model: Path
    data: Path
    adapter: Path
    judge_url: str = ""


class AcceptedInput(AssertionError):
    """The command accepted a bad input and was about to start the expensive work."""


@pytest.fixture(scope="module")
def world(tmp_path_factory, session_tmp):
    from peft import get_peft_model

    import sspeft
    from transformers import AutoModelForCausalLM

    model = session_tmp / "tiny-llama"
    if not (model / "config.json").is_file():
        build_tiny_llama(model)
    root = tmp_path_factory.mktemp("bad-inputs-world")
    data = write_records(root / "data" / "alpaca.json")
    adapter = root / "adapter"
    cfg = sspeft.SpectralConfig(method="ssh", n=8, target_modules=["q_proj", "v_proj"], init="normal")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)), sspeft.peft_config(cfg))
    peft_model.save_pretrained(str(adapter))
    with FakeJudgeServer() as server:
        yield World(root, model, data, adapter, f"openai:{server.model}@{server.base_url}")
        assert server.chat_requests() == [], "a bad input reached the judge"


# ---------------------------------------------------------------- helpers that build a row's inputs
def _recipe(w: World, d: Path, data: Path | None = None, run_dir: Path | None = None, **sections) -> Path:
    return write_recipe(d / "recipe.yaml", w.model, data or w.data, run_dir or d / "run", **sections)


def _train(*overrides: str, data: Callable[[World, Path], Path] | None = None, run_dir=None, **sections):
    def args(w: World, d: Path) -> list[str]:
        recipe = _recipe(w, d, data(w, d) if data else None, run_dir(w, d) if run_dir else None, **sections)
        return [str(recipe), *overrides]
    return args


def _edit_recipe(fn: Callable[[dict], None]):
    def args(w: World, d: Path) -> list[str]:
        path = _recipe(w, d)
        raw = yaml.safe_load(path.read_text())
        fn(raw)
        path.write_text(yaml.safe_dump(raw))
        return [str(path)]
    return args


def _data_file(content: bytes | str, name: str = "data.jsonl"):
    def make(w: World, d: Path) -> Path:
        path = d / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return make


def _merge_run(w: World, d: Path, corrupt: Callable[[Path], None] | None = None) -> Path:
    """A run directory as launch.train leaves it (resolved recipe, template, adapter), with a corrupted adapter."""
    from launch.recipe import load_recipe

    run = d / "run"
    recipe = load_recipe(_recipe(w, d, run_dir=run), [])
    run.mkdir()
    recipe.dump(run / "recipe.yaml")
    (run / "template.jinja").write_text("{{ messages }}")
    shutil.copytree(w.adapter, run / "adapter")
    if corrupt:
        corrupt(run / "adapter")
    (d / "recipe.yaml").unlink()
    return run


def _tensors(fn: Callable[[dict], None]):
    def corrupt(adapter: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        fn(tensors)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return corrupt


def _adapter_json(fn: Callable[[dict], None]):
    def corrupt(adapter: Path) -> None:
        data = json.loads((adapter / "adapter_config.json").read_text())
        fn(data)
        (adapter / "adapter_config.json").write_text(json.dumps(data))
    return corrupt


def _merge(corrupt=None):
    def args(w: World, d: Path) -> list[str]:
        return [str(_merge_run(w, d, corrupt))]
    return args


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _pos(fn):
    def edit(t):
        t = t.clone()
        fn(t)
        return t
    return _tensors(lambda ts: ts.__setitem__(f"{Q0}.sspeft_positions", edit(ts[f"{Q0}.sspeft_positions"])))


def _coeff(fn):
    def edit(t):
        t = t.clone()
        fn(t)
        return t
    return _tensors(lambda ts: ts.__setitem__(f"{Q0}.sspeft_coefficients", edit(ts[f"{Q0}.sspeft_coefficients"])))


def _set_item(t, index, value):
    t[index] = value


def _eval_run(d: Path, questions=None, **kw) -> Path:
    qs = questions if questions is not None else make_questions()
    return make_run(d / "evalrun", questions=qs, **kw)


def _judge(*extra: str, setup_run: Callable[[Path], list[str]] | None = None, questions=None):
    """eval.judge on a run folder with a live fake judge: bad input must stop it before any call."""
    def args(w: World, d: Path) -> list[str]:
        root = _eval_run(d, questions)
        more = setup_run(root) if setup_run else []
        return [str(root), "--judge", w.judge_url, "--questions",
                str(root / "questions.jsonl"), *extra, *more]
    return args


def _generate(*extra: str, questions: Callable[[Path], Path] | None = None):
    def args(w: World, d: Path) -> list[str]:
        q = questions(d) if questions else None
        return [str(w.model), "--out", str(d / "out"), "--backend", "hf", *(["--questions", str(q)] if q else []),
                *extra]
    return args


def _write(name: str, content: bytes | str):
    def make(d: Path) -> Path:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return make


LATIN1_QUESTION = ('{"question_id": 1, "category": "writing", "turns": ["Caf\u00e9 au lait?"]}\n').encode("latin-1")
GOOD_QUESTION = '{"question_id": 1, "category": "writing", "turns": ["Hello?"]}\n'


def _submit(*extra: str, overrides: tuple[str, ...] = (), nodes: str = "1"):
    def args(w: World, d: Path) -> list[str]:
        return [str(_recipe(w, d)), *overrides, "--nodes", nodes, "--gpus-per-node", "0", "--dry-run", *extra]
    return args


def _first_answers(root: Path) -> Path:
    return root / "answers" / "tuned.jsonl"


def _replace_answers(transform: Callable[[Path], None]):
    def setup(root: Path) -> list[str]:
        transform(_first_answers(root))
        return []
    return setup


# ---------------------------------------------------------------- the table
ROWS: list[Row] = [
    # recipe
    Row("recipe file missing", "train", lambda w, d: [str(d / "nowhere.yaml")], (r"recipe file .*nowhere.yaml",
                                                                                 "does not exist")),
    Row("recipe not YAML", "train", lambda w, d: [str(_write("r.yaml", "model: [unclosed")(d))],
        (r"r.yaml", "not valid YAML")),
    Row("recipe top level a list", "train", lambda w, d: [str(_write("r.yaml", "- a\n- b\n")(d))],
        (r"r.yaml", "must be a mapping of sections")),
    Row("recipe unknown section", "train", _edit_recipe(lambda r: r.__setitem__("trainer", {"lr": 1})),
        (r"'trainer'", "top-level key")),
    Row("recipe unknown train key", "train", _train("train.learnig_rate=0.1"), (r"learnig_rate", "learning_rate")),
    Row("override without =", "train", _train("train.max_steps"), (r"train.max_steps", r"section\.key=value")),
    Row("override unknown section", "train", _train("trian.max_steps=3"), (r"trian", "train")),
    Row("adapter.method unknown", "train", _train("adapter.method=sshh"), (r"adapter.method", "expected one of")),
    Row("adapter.n zero", "train", _train("adapter.n=0"), (r"\bn\b.*0", "positive integer")),
    Row("adapter.n a string", "train", _train("adapter.n=many"), (r"\bn\b.*many", "expected|positive integer")),
    Row("adapter.delta above 1", "train", _train("adapter.delta=1.5"), (r"delta.*1.5", r"\[0, 1\]")),
    Row("adapter.dht unknown", "train", _train("adapter.dht=fast"), (r"dht.*fast", "standard, separable")),
    Row("adapter.wavelet unknown", "train", _train("adapter.method=waveft", "adapter.wavelet=morlet"),
        (r"wavelet.*morlet", "expected one of")),
    Row("adapter.n larger than a layer", "train", _train("adapter.n=100000"), (r"100000", r"n ≤|choose n")),
    Row("adapter.target_modules match nothing", "train", _train("adapter.target_modules=[k_projj]"),
        (r"target_modules", "k_projj")),
    Row("model.quantize unknown", "train", _train("model.quantize=int3"), (r"model.quantize", "nf4")),
    Row("model.path missing", "train", _train("model.path=/nonexistent/model"), (r"model.path", "does not exist")),
    Row("train.learning_rate negative", "train", _train("train.learning_rate=-1"),
        (r"train.learning_rate", "> 0")),
    Row("train.max_steps zero", "train", _train("train.max_steps=0"), (r"train.max_steps", "positive or -1")),
    Row("train.warmup_ratio (a key SFTConfig lacks)", "train", _train("train.warmup_ratio=0.1"),
        (r"warmup_ratio", r"warmup_steps")),
    Row("train.per_device_batch_size (the old name)", "train", _train("train.per_device_batch_size=4"),
        (r"per_device_batch_size", "per_device_train_batch_size")),
    Row("train.per_device_train_batch_size a string", "train", _train("train.per_device_train_batch_size=four"),
        (r"per_device_train_batch_size", "four")),
    Row("train.resume unknown", "train", _train("train.resume=sometimes"), (r"train.resume", "auto|never")),
    Row("data.max_length zero", "train", _train("data.max_length=0"), (r"data.max_length", "positive")),
    Row("data.max_length beyond the model's context", "train", _train("data.max_length=100000"),
        (r"data.max_length", r"256")),
    Row("name with a slash", "train", _train("name=a/b"), (r"name", "without '/'")),
    Row("run_dir not ours", "train", _train(run_dir=lambda w, d: _write("theirs/notes.txt", "keep me")(d).parent),
        (r"run_dir = .*theirs", "notes.txt", "never overwritten")),
    Row("run_dir the filesystem root", "train", _train("run_dir=/"), (r"run_dir", "root")),
    # training data
    Row("data.path missing", "train", _train("data.path=/nonexistent/alpaca.json"), (r"data.path", "does not exist")),
    Row("data.path a directory", "train", _train(data=lambda w, d: (d / "adir").mkdir() or d / "adir"),
        (r"data.path", "directory"), ),
    Row("data not UTF-8", "train", _train(data=_data_file(
        '{"instruction": "Caf\u00e9", "input": "", "output": "x"}\n'.encode("latin-1"))),
        (r"data.jsonl", "line 1", "UTF-8"), ),
    Row("data line not JSON", "train", _train(data=_data_file('{"instruction": "a", "input": "", "output": "b"}\n{oops\n')),
        (r"data.jsonl: line 2", "not valid JSON")),
    Row("data record without output", "train", _train(data=_data_file('{"instruction": "a", "input": ""}\n')),
        (r"data.jsonl", r"'output'", "missing or empty")),
    Row("data field a number", "train", _train(data=_data_file('{"instruction": 3, "input": "", "output": "b"}\n')),
        (r"'instruction'", "expected a string")),
    Row("data record a list", "train", _train(data=_data_file('[["a", "b"]]')), (r"expected an object",)),
    Row("data empty", "train", _train(data=_data_file("[]", "data.json")), (r"data.path", "holds no records")),
    # adapter files (through launch.merge, which loads through PEFT)
    Row("adapter negative position", "merge", _merge(_pos(lambda t: _set_item(t, (1, 0), -1))),
        (r"adapter_model.safetensors", r"positions outside", r"cols in 0\.\.63")),
    Row("adapter row out of range", "merge", _merge(_pos(lambda t: _set_item(t, (0, 0), 64))),
        (r"adapter_model.safetensors", r"rows in 0\.\.63")),
    Row("adapter duplicate position", "merge", _merge(_pos(lambda t: t[:, 1].copy_(t[:, 0]))),
        (r"adapter_model.safetensors", "distinct positions")),
    Row("adapter NaN coefficient", "merge", _merge(_coeff(lambda t: _set_item(t, 0, float("nan")))),
        (r"adapter_model.safetensors", "non-finite", "expected finite")),
    Row("adapter missing coefficients", "merge", _merge(_tensors(lambda ts: ts.pop(f"{Q0}.sspeft_coefficients"))),
        (r"adapter_model.safetensors", r"lacks tensor .*q_proj.sspeft_coefficients")),
    Row("adapter coefficients of another n", "merge", _merge(_tensors(lambda ts: ts.__setitem__(
        f"{Q0}.sspeft_coefficients", ts[f"{Q0}.sspeft_coefficients"][:4].clone()))),
        (r"adapter_model.safetensors", r"expected \(8,\) coefficients")),
    Row("adapter layer without shape", "merge",
        _merge(_adapter_json(lambda c: next(iter(c["layers"].values())).pop("shape"))),
        (r"adapter_config.json", r"\.shape is None", r"\[out_features, in_features\]")),
    Row("adapter layers a list", "merge", _merge(_adapter_json(lambda c: c.__setitem__("layers", ["q_proj"]))),
        (r"adapter_config.json", r"'layers' is a list", "expected an object")),
    Row("adapter n a string", "merge", _merge(_adapter_json(lambda c: c.__setitem__("n", "8"))),
        (r"adapter_config.json", r"field 'n' is '8'", "expected int")),
    Row("adapter config not JSON", "merge", _merge(lambda a: (a / "adapter_config.json").write_text("{oops")),
        (r"adapter_config.json", "not valid JSON")),
    Row("adapter weights truncated", "merge", _merge(lambda a: (a / "adapter_model.safetensors").write_bytes(
        (a / "adapter_model.safetensors").read_bytes()[:100])),
        (r"adapter_model.safetensors", "not a readable safetensors")),
    Row("adapter weights missing", "merge", _merge(lambda a: (a / "adapter_model.safetensors").unlink()),
        (r"adapter_model.safetensors", "does not exist")),
    # eval: generate
    Row("generate questions not UTF-8", "generate", _generate(questions=_write("q.jsonl", LATIN1_QUESTION)),
        (r"questions file .*q.jsonl line 1", "not UTF-8", "expected UTF-8")),
    Row("generate questions a directory", "generate", _generate(questions=lambda d: (d / "qd").mkdir() or d / "qd"),
        (r"questions file .*qd", "is a directory", "expected a JSONL file")),
    Row("generate questions missing", "generate", _generate(questions=lambda d: d / "none.jsonl"),
        (r"questions file .*none.jsonl", "does not exist")),
    Row("generate question without turns", "generate",
        _generate(questions=_write("q.jsonl", '{"question_id": 1, "category": "writing"}\n')),
        (r"q.jsonl line 1", r"'turns'", "expected a list of 1 or 2")),
    Row("generate three turns", "generate", _generate(questions=_write(
        "q.jsonl", '{"question_id": 1, "category": "writing", "turns": ["a", "b", "c"]}\n')),
        (r"q.jsonl line 1", r"'turns'", "1 or 2")),
    Row("generate question_id a boolean", "generate", _generate(questions=_write(
        "q.jsonl", '{"question_id": true, "category": "writing", "turns": ["a"]}\n')),
        (r"'question_id' is True", "integer or a non-empty string")),
    Row("generate repeated question_id", "generate", _generate(questions=_write("q.jsonl", GOOD_QUESTION * 2)),
        (r"q.jsonl line 2", "repeats line 1")),
    Row("generate --limit 0", "generate", _generate("--limit", "0", questions=_write("q.jsonl", GOOD_QUESTION)),
        (r"--limit is 0", "positive number")),
    Row("generate --max-new-tokens 0", "generate",
        _generate("--max-new-tokens", "0", questions=_write("q.jsonl", GOOD_QUESTION)),
        (r"--max-new-tokens is 0", "positive integer")),
    Row("generate --temperature negative", "generate",
        _generate("--temperature", "-1", questions=_write("q.jsonl", GOOD_QUESTION)),
        (r"--temperature is -1", ">= 0")),
    # eval: judge
    Row("judge questions not UTF-8", "judge",
        _judge(setup_run=lambda r: ((r / "questions.jsonl").write_bytes(LATIN1_QUESTION), [])[1]),
        (r"questions file .*questions.jsonl line 1", "not UTF-8")),
    Row("judge answers not UTF-8", "judge", _judge(setup_run=_replace_answers(lambda p: p.write_bytes(
        p.read_bytes() + '{"question_id": 9, "note": "\u00e9"}\n'.encode("latin-1")))),
        (r"answers file .*tuned.jsonl line 5", "not UTF-8")),
    Row("judge references not UTF-8", "judge", _judge(setup_run=lambda r: ["--references", str(_write(
        "refs.jsonl", '{"question_id": 2, "x": "\u00e9"}\n'.encode("latin-1"))(r))]),
        (r"references file .*refs.jsonl line 1", "not UTF-8")),
    Row("judge answers beyond the limit", "judge", _judge("--limit", "2"),
        (r"tuned.jsonl holds answers to 2 question\(s\) \[3, 4\]", "--limit 4")),
    Row("judge answers for an unknown question", "judge", _judge(setup_run=_replace_answers(
        lambda p: p.write_text(p.read_text() + json.dumps(make_answers("tuned", [dict(make_questions()[0],
                                                                                      question_id=77)])[0]) + "\n"))),
        (r"\[77\]", "questions file lacks", "--questions")),
    Row("judge answer without choices", "judge", _judge(setup_run=_replace_answers(
        lambda p: p.write_text('{"question_id": 1, "choices": []}\n'))),
        (r"tuned.jsonl line 1", r"'choices'", "non-empty list")),
    Row("judge missing reference", "judge", _judge(questions=[dict(q, reference=None) for q in make_questions()]),
        (r"question 2 \(math\) turn 1: no reference answer", "--references")),
    Row("judge --samples 0", "judge", _judge("--samples", "0"), (r"--samples is 0", "positive integer")),
    Row("judge --samples 3 at temperature 0", "judge", _judge("--samples", "3"),
        (r"--samples 3", "--judge-temperature above 0")),
    Row("judge --max-failure-rate 1.5", "judge", _judge("--max-failure-rate", "1.5"),
        (r"--max-failure-rate is 1.5", "between 0 and 1")),
    Row("judge --concurrency 0", "judge", _judge("--concurrency", "0"), (r"--concurrency", ">= 1")),
    Row("judge spec without a model", "judge", lambda w, d: [str(_eval_run(d)), "--judge", "http://127.0.0.1:9/v1"],
        (r"needs a model name",)),
    Row("judge --against missing", "judge", _judge("--against", "/nonexistent/base.jsonl"),
        (r"--against file '/nonexistent/base.jsonl'", "does not exist")),
    Row("judge --limit 0", "judge", _judge("--limit", "0"), (r"--limit is 0", "positive number")),
    Row("judge --model-id without answers", "judge", _judge("--model-id", "other"),
        (r"answers file .*other.jsonl does not exist", r"answers there: \['tuned'\]")),
    Row("judge judgments not UTF-8", "judge", _judge(setup_run=lambda r: [] if _write(
        "judgments/fake-judge_single.jsonl", '{"model": "\u00e9"}\n'.encode("latin-1"))(r) else []),
        (r"judgments file .*fake-judge_single.jsonl line 1", "not UTF-8")),
    # Slurm arguments
    Row("submit --nodes 0", "submit", _submit(nodes="0"), (r"--nodes", "positive integer")),
    Row("submit --gpus-per-node negative", "submit", _submit("--gpus-per-node", "-1"),
        (r"--gpus-per-node = -1", "0 \\(CPU ranks\\) or more")),
    Row("submit --procs-per-node above GPUs", "submit", _submit("--gpus-per-node", "2", "--procs-per-node", "4"),
        (r"--procs-per-node = 4", "--gpus-per-node = 2")),
    Row("submit --mem not a size", "submit", _submit("--mem", "lots"), (r"--mem = 'lots'", "memory size")),
    Row("submit --signal unknown", "submit", _submit("--signal", "KILL"), (r"--signal = 'KILL'", "expected one of")),
    Row("submit --time not a limit", "submit", _submit("--time", "forever"), (r"--time = 'forever'", "time limit")),
    Row("submit --rdzv-port privileged", "submit", _submit("--rdzv-port", "80"), (r"--rdzv-port = 80", "1024")),
    Row("submit --max-requeues negative", "submit", _submit("--max-requeues", "-1"),
        (r"--max-requeues = -1", "0 or more")),
    Row("submit --python relative", "submit", _submit("--python", "python3"), (r"--python = 'python3'", "absolute")),
    Row("submit --partition with a shell character", "submit", _submit("--partition", "gpu;rm -rf"),
        (r"--partition", "letters, digits")),
    Row("submit --cpus-per-task 0", "submit", _submit("--cpus-per-task", "0"),
        (r"--cpus-per-task = 0", "positive integer")),
    Row("submit recipe override invalid", "submit", _submit(overrides=("train.max_steps=0",)),
        (r"train.max_steps", "positive or -1")),
]


def _main(cli: str):
    if cli == "train":
        from launch.train import main
    elif cli == "merge":
        from launch.merge import main
    elif cli == "generate":
        from eval.generate import main
    elif cli == "judge":
        from eval.judge import main
    else:
        from slurm.submit import main
    return main


def _refuse_expensive_work(monkeypatch) -> None:
    """Accepted input would start training, a model load or a judge call: fail the row at that point instead."""
    import launch.train as train_mod

    def accepted(*_a, **_k):
        raise AcceptedInput("the command accepted the input and went on to train")

    monkeypatch.setattr(train_mod.distributed, "init", accepted)
    monkeypatch.setattr(train_mod, "train", accepted)


def _run(cli: str, argv: list[str]) -> tuple[int, str]:
    return run_main(_main(cli), argv)


@pytest.mark.parametrize(
    "row", [pytest.param(r, id=r.id, marks=pytest.mark.xfail(strict=True, reason=r.xfail) if r.xfail else ())
            for r in ROWS])
def test_bad_input(row: Row, world: World, tmp_path, monkeypatch):
    _refuse_expensive_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "case"
    d.mkdir()
    # build the row's inputs first, then snapshot: the command itself must create or change nothing
    argv = row.args(world, d)
    before = snapshot(tmp_path, world.root, world.model)
    rc, text = _run(row.cli, argv)
    after = snapshot(tmp_path, world.root, world.model)
    assert rc == 2, f"exit status {rc}; output:\n{text[-2000:]}"
    for pattern in row.expect:
        assert re.search(pattern, text), f"{pattern!r} not in the message:\n{text[-2000:]}"
    changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
    assert not changed, f"files created or changed: {changed[:10]}"


def test_the_table_is_large_enough():
    kinds = {r.cli for r in ROWS}
    assert len(ROWS) >= 60 and kinds == {"train", "merge", "generate", "judge", "submit"}
