"""benchmarks/pipeline_speed.py end to end at its smoke size on a tiny recipe: both methods train through
`launch.train` on the same batches, and the throughput it reports is what the runs' summaries say."""

from __future__ import annotations

import json
import subprocess

import pytest

from launch_helpers import PYTHON, REPO, build_tiny_llama, child_env, write_recipe, write_records


@pytest.mark.slow  # two real launch.train processes
def test_quick_run_measures_ssh_and_lora_on_the_same_tokens(tmp_path):
    model = build_tiny_llama(tmp_path / "model")
    data = write_records(tmp_path / "data.json")
    recipe = write_recipe(tmp_path / "ssh.yaml", model, data, tmp_path / "unused-run")
    out = tmp_path / "pipeline.json"
    cmd = [PYTHON, "benchmarks/pipeline_speed.py", "--quick", "--recipe", str(recipe), "--bases", "fp32",
           "--json", str(out), "--markdown", str(tmp_path / "pipeline.md")]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert sorted((r["base"], r["method"]) for r in runs) == [("fp32", "lora-r8"), ("fp32", "ssh")]
    # the same recipe, seed and data order: both methods saw the same tokens, step for step
    for base in ("fp32",):  # the NF4 base takes the same path; its figures are in docs/speed.md
        ssh, lora = (next(r for r in runs if r["base"] == base and r["method"] == m) for m in ("ssh", "lora-r8"))
        assert ssh["tokens"] == lora["tokens"] > 0 and ssh["steps"] == lora["steps"] == 2
        ratio = result["summary"][base]["steady_tokens_per_s"]["ratio"]["median"]
        assert abs(ratio - ssh["steady_tokens_per_s"] / lora["steady_tokens_per_s"]) < 1e-9
    assert "SSH / LoRA-r8" in (tmp_path / "pipeline.md").read_text()
