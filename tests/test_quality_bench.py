"""Smoke test of the quality benchmark's machinery (benchmarks/quality.py) on a tiny random LLaMA with a word-level
tokenizer and the real Alpaca sample: runs, result files, resume, report and plots, stem-cache exactness."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks import quality, quality_lib, quality_plan  # noqa: E402


def _tiny_model_dir(root: Path, records: list[dict]) -> Path:
    """A 2-layer LLaMA (GQA like SmolLM2) and a whitespace word-level tokenizer over the data's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for r in records for field in ("instruction", "input", "output")
                    for w in (quality_lib.prompt_of(r) + " " + r[field]).split()})
    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]",
                                                pad_token="[PAD]")
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, eos_token_id=1, pad_token_id=2,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    out = root / "tiny-llama"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory, shared_dir):
    data = shared_dir / "data" / "alpaca" / "alpaca_en_demo.json"
    root = tmp_path_factory.mktemp("quality")
    model_dir = _tiny_model_dir(root, quality_lib.load_records(data)[:200])
    return {"root": root, "data": data, "model": model_dir}


def _argv(env, *extra, in_process=True):
    root = env["root"]
    return [*(["--in-process"] if in_process else []), "--profile", "smoke", "--model", str(env["model"]), "--data", str(env["data"]),
            "--results", str(root / "results"), "--docs", str(root / "docs"), "--work-dir", str(root / "work"),
            *extra]


def test_smoke_run_writes_results_report_and_resumes(bench_env, capsys):
    assert quality.main(_argv(bench_env)) == 0
    results = bench_env["root"] / "results"
    plan = quality_plan.build_plan(quality_plan.PROFILES["smoke"], {})
    files = {s.name: results / f"{s.name}.json" for s in plan}
    assert all(p.is_file() for p in files.values()), sorted(p.name for p in results.iterdir())
    records = {n: json.loads(p.read_text()) for n, p in files.items()}
    for name, r in records.items():
        assert math.isfinite(r["heldout_loss"]) and r["heldout_loss"] > 0, name
    lora = next(r for r in records.values() if r["spec"]["method"] == "lora")
    ssh = next(r for r in records.values() if r["spec"]["method"] == "ssh")
    # smoke adapts q,v of layer 1 only: LoRA r=1 = (32+32) + (32+16); SSH = 2 modules × 16 positions
    assert lora["trainable"] == 112
    assert ssh["trainable"] == 32
    assert len(ssh["train_losses"]) == 2 and ssh["delta"]["rank_max"] >= 1
    assert lora["delta"]["rank_max"] == 1  # a rank-1 LoRA update
    report = (bench_env["root"] / "docs" / "results.md").read_text()
    assert "| SSH |" in report and "## Profile `smoke`" in report and "python -m benchmarks.quality --profile smoke" \
        in report
    assert (bench_env["root"] / "docs" / "plots" / "quality_smoke_loss_vs_params.png").stat().st_size > 1000
    assert (bench_env["root"] / "docs" / "plots" / "quality_smoke_delta_spectra.png").is_file()

    # resume: nothing is re-run while every result stands; a deleted one is re-made alone
    stamps = {n: p.stat().st_mtime_ns for n, p in files.items()}
    capsys.readouterr()
    assert quality.main(_argv(bench_env, "--no-report")) == 0
    assert "0 to run" in capsys.readouterr().out
    assert {n: p.stat().st_mtime_ns for n, p in files.items()} == stamps
    files[ssh["spec"]["name"]].unlink()
    # this time in a worker process, as the real benchmark runs (per-run peak memory)
    assert quality.main(_argv(bench_env, "--no-report", in_process=False)) == 0
    assert "1 to run" in capsys.readouterr().out
    after = {n: p.stat().st_mtime_ns for n, p in files.items()}
    assert after[lora["spec"]["name"]] == stamps[lora["spec"]["name"]]
    redone = json.loads(files[ssh["spec"]["name"]].read_text())
    assert "in_process" not in redone and redone["trainable"] == 32
    assert redone["heldout_loss"] == pytest.approx(ssh["heldout_loss"], rel=1e-4)  # seeded: same numbers


def _bench(env, first_layer: int) -> quality_lib.BenchConfig:
    return quality_lib.BenchConfig(model_dir=str(env["model"]), data=str(env["data"]), n_train=8, n_eval=4,
                                   max_length=96, threads=1, first_layer=first_layer)


def test_stem_cache_is_exact(bench_env):
    cache = bench_env["root"] / "cache-exact"
    base = quality_lib.RunSpec(name="base", method="base", steps=0)
    full = quality_lib.run_one(base, _bench(bench_env, 0), cache, progress=lambda _: None)
    cached = quality_lib.run_one(base, _bench(bench_env, 1), cache, progress=lambda _: None)
    assert list(cache.glob("stems-*.pt")), "first_layer=1 must cache the frozen layer's outputs"
    assert cached["heldout_loss"] == pytest.approx(full["heldout_loss"], rel=1e-5)


@pytest.mark.parametrize("method,options", [
    ("lfma", {"n": 8, "half_spectrum": True}),
    ("waveft", {"n": 16, "wavelet": "db2"}),
    ("shira", {"r": 1}),
    ("peft-fourierft", {"n_frequency": 16}),
    ("peft-waveft", {"n_frequency": 16}),
    ("peft-shira", {"r": 1}),
])
def test_every_adapter_kind_trains_and_reports_its_delta(bench_env, method, options):
    spec = quality_lib.RunSpec(name=method, method=method, lr=1e-2, steps=1, options=options)
    r = quality_lib.run_one(spec, _bench(bench_env, 1), bench_env["root"] / "cache-kinds", progress=lambda _: None)
    assert r["trainable"] > 0 and math.isfinite(r["heldout_loss"])
    assert set(r["delta"]["ranks"]) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert r["delta"]["rank_max"] >= 1


def test_bad_inputs_fail_before_work(tmp_path, bench_env):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": 3}]))
    with pytest.raises(ValueError, match="record 0"):
        quality.main(_argv(bench_env, "--data", str(bad)))
    with pytest.raises(ValueError, match="RunSpec.method='dora'"):
        quality_lib.RunSpec(name="x", method="dora", lr=1e-3)
    with pytest.raises(ValueError, match="n_train=900"):
        quality_lib.split_records([{}] * 10, 900, 4, 0)
