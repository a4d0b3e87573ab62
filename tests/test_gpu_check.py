"""benchmarks/gpu_check.py: the --small CPU run reports every case within its bounds, and the checks can fail."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sspeft
from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
CONFIGS = [gpu_check.LORA, "peft-fourierft", "peft-waveft", "peft-shira", *sspeft.METHODS]


def expected_cases() -> set[tuple[str, str, str, str]]:
    prof = gpu_check.PROFILES["small"]
    return {(layer, method, dtype, path) for layer in prof.layers for method in sspeft.METHODS
            for dtype in gpu_check.DTYPES for path in gpu_check.forced_paths(method)}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--threads", "1", "--time-budget", "800",
           "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"gpu_check --small did not finish in 900 s; output so far:\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_small_run_checks_every_method_path_and_dtype(small_run):
    results, _ = small_run
    cases = results["correctness"]["cases"]
    assert {(c["layer"], c["method"], c["dtype"], c["path"]) for c in cases} == expected_cases()
    assert len(cases) == len(expected_cases())
    for c in cases:
        bound = gpu_check.BOUNDS[c["dtype"]]
        for what in ("output", "input_grad", "coeff_grad"):
            assert isinstance(c[what], float) and math.isfinite(c[what]) and c[what] <= bound, c
        assert c["path_used"] == c["path"] and c["status"] == "PASS", c
    # the library's own validation decides the paths: factorized only for the Fourier-type methods
    assert {c["method"] for c in cases if c["path"] == "factorized"} == {"ssh", "lfma", "fourierft"}
    assert [r["status"] for r in results["correctness"]["inject_on_device"]] == ["PASS"] * len(sspeft.METHODS)
    if "skipped" not in results["quant4"]:
        assert {(c["method"], c["path"]) for c in results["quant4"]["cases"]} == {
            (m, p) for _, m, d, p in expected_cases() if d == "bf16"}
        assert all(c["status"] == "PASS" for c in results["quant4"]["cases"])


@pytest.mark.slow
def test_small_run_times_every_config(small_run):
    results, md = small_run
    loads = [str(t) for t in gpu_check.PROFILES["small"].loads]
    assert list(results["speed"]["loads"]) == loads and not results["speed"]["skipped"]
    for tokens in loads:
        rows = results["speed"]["loads"][tokens]["rows"]
        assert list(rows) == CONFIGS
        for name, row in rows.items():
            assert row["median_s"] > 0 and row["rounds"] == gpu_check.PROFILES["small"].rounds
            # the reported ratio is the median of per-round ratios: recomputed here from the raw step times
            ratios = [a / b for a, b in zip(row["times_s"], rows[gpu_check.LORA]["times_s"])]
            assert row["ratio"] == pytest.approx(statistics.median(ratios))
            assert row["memory"]["total_mib"] >= row["memory"]["resident_mib"]
        assert {p for m in sspeft.METHODS for p in rows[m]["path"].split(",")} <= {"merged", "split", "factorized"}
        sweep = results["paths"]["loads"][tokens]["rows"]
        assert set(sweep) == {gpu_check.LORA} | {f"{m}:{p}" for m in sspeft.METHODS
                                                 for p in gpu_check.forced_paths(m)}
        assert all(row["path"] == name.partition(":")[2] for name, row in sweep.items() if ":" in name)
        inference = results["merged_inference"]["loads"][tokens]["rows"]
        assert list(inference) == ["base", *sspeft.METHODS] and all(r["median_s"] > 0 for r in inference.values())
    targets = {(t["tokens"], t["method"], t["what"]) for t in results["speed"]["targets"]}
    assert {(int(t), m, "time") for t in loads for m in gpu_check.TIME_TARGETS} <= targets
    assert all(r["status"] == "PASS" for r in results["merged_inference"]["merge_checks"])
    quant4 = results["quant4"].get("cases", [])
    checks = len(expected_cases()) + 2 * len(sspeft.METHODS) + len(quant4)  # + device injections, merge checks
    assert results["verdict"].startswith(f"{checks} checks passed, 0 FAILED, 0 not run")
    assert "| FAIL" not in md and all(f"| {name} |" in md for name in CONFIGS)
    assert results["machine"]["torch"] == torch.__version__


# ---------------------------------------------------------------------------------------------------- failing
def test_relative_error_and_judge_fail_loudly():
    b = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert gpu_check.rel_error(b, b) == 0.0
    perturbed = b.clone()
    perturbed[1, 1] += 0.2  # 0.2 / max|b| = 0.05
    assert gpu_check.rel_error(perturbed, b) == pytest.approx(0.05)
    assert gpu_check.judge({"output": 0.05}, gpu_check.BOUNDS["bf16"]) == "FAIL"
    assert gpu_check.judge({"output": 1e-3, "coeff_grad": 2e-3}, gpu_check.BOUNDS["bf16"]) == "PASS"
    nan = b.clone()
    nan[0, 0] = float("nan")
    assert gpu_check.rel_error(nan, b) == math.inf
    assert gpu_check.judge({"output": gpu_check.rel_error(nan, b)}, 1.0) == "FAIL"


def test_a_wrong_path_fails_the_run(tmp_path, monkeypatch):
    """Break the split path (its adapter branch 1.5× too large): exactly its cases FAIL and the exit status is 1."""
    original = sspeft.forward._branch

    def broken(layer, name, path, x, dtype):
        out = original(layer, name, path, x, dtype)
        return out * 1.5 if path == "split" else out

    monkeypatch.setattr(sspeft.forward, "_branch", broken)
    code = gpu_check.main(["--device", "cpu", "--small", "--sections", "correctness", "--time-budget", "3000",
                           "--out", str(tmp_path)])
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    cases = results["correctness"]["cases"]
    assert code == 1 and len(cases) == len(expected_cases())
    assert {c["status"] for c in cases if c["path"] == "split"} == {"FAIL"}
    assert {c["status"] for c in cases if c["path"] != "split"} == {"PASS"}
    assert "| FAIL |" in (tmp_path / "gpu_check.md").read_text()


def test_time_budget_spent_marks_checks_not_run(tmp_path):
    code = gpu_check.main(["--device", "cpu", "--small", "--time-budget", "0.001", "--sections",
                           "correctness,merged_inference", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 3
    assert {c["status"] for c in results["correctness"]["cases"]} == {gpu_check.NOT_RUN}
    assert len(results["correctness"]["cases"]) == len(expected_cases())
    assert results["sections"]["speed"] == "skipped (--sections)"
    assert [c["status"] for c in results["merged_inference"]["merge_checks"]] == [gpu_check.NOT_RUN] * 5
    assert f"0 checks passed, 0 FAILED, {len(expected_cases()) + 5} not run" in results["verdict"]


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--sections", "speed,bogus"], "--sections: unknown ['bogus']"),
    (["--device", "cpu", "--time-budget", "0"], "--time-budget 0.0: must be > 0"),
    (["--device", "cuda"], "--device cuda: torch sees no CUDA device"),
])
def test_bad_arguments_are_refused_before_any_output(tmp_path, capsys, argv, message):
    if argv[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([*argv, "--out", str(out)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_interleaved_rounds_rotate_and_survive_a_failing_config():
    class Fake:
        def __init__(self, name):
            self.name = name

    a, b, c = Fake("a"), Fake("b"), Fake("c")
    order, calls = [], {"b": 0}

    def run(t):
        order.append(t.name)
        if t.name == "b":
            calls["b"] += 1
            if calls["b"] == 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"a": 1.0, "b": 2.0, "c": 3.0}[t.name]

    failures: dict[str, str] = {}
    times = gpu_check.interleaved([a, b, c], run, 3, lambda: 1.0, failures)
    assert order == ["a", "b", "c", "b", "c", "a", "a", "c"]  # rotated each round; b left after raising
    assert times == {"a": [1.0] * 3, "b": [2.0], "c": [3.0] * 3}
    assert failures == {"b": "OutOfMemoryError: CUDA out of memory"}
    rows = gpu_check.summarize(times, "a")
    assert rows["c"]["ratio"] == 3.0 and rows["b"]["rounds"] == 1
    # the deadline stops after the first round
    assert gpu_check.interleaved([a, c], run, 3, lambda: -1.0, {}) == {"a": [1.0], "c": [3.0]}


def test_a_peft_without_a_peer_tuner_is_reported_not_hidden(monkeypatch):
    import peft

    monkeypatch.delattr(peft, "WaveFTConfig")
    found = gpu_check.peers()
    assert found["peft-waveft"] == f"peft {peft.__version__} has no WaveFTConfig"
    assert found[gpu_check.LORA] is peft.LoraConfig
    with pytest.raises(RuntimeError, match="has no WaveFTConfig"):
        gpu_check.adapt("peft-waveft", torch.nn.Linear(4, 4), found)
