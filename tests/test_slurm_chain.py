"""The whole chain on a real one-node Slurm cluster with the real stages: `python -m slurm.submit` on a tiny CPU
recipe (2 CPU ranks, a random tiny LLaMA, a local OpenAI-compatible judge that always rates [[7]]).

- preemption: USR1 to the training job's batch script → checkpoint, exit 75, requeue, resume; then `scontrol
  requeue` mid-run → resume again; the chain still completes with the recipe's step count and a clean report.
- a failing merge cancels generate and judge, the report job still runs and names merge, and a resubmit of the
  same run directory completes; a live chain is refused without --force.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from launch_helpers import build_tiny_llama, write_records, write_recipe
from slurm_helpers import (RatingJudge, assert_completed, job_logs, slurm_cluster, submit, wait_for,  # noqa: F401
                           wait_until)

from launch.rundir import RunDir
from slurm.chain import job_state

pytestmark = pytest.mark.slow

STEPS = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-chain")
    build_tiny_llama(root / "model")
    write_records(root / "data.json")
    with RatingJudge() as judge:
        yield root, judge


def make_recipe(root: Path, judge: RatingJudge, name: str, max_steps: int, save_steps: int) -> tuple[Path, RunDir]:
    run = RunDir(root / name)
    recipe = write_recipe(
        root / f"{name}.yaml", root / "model", root / "data.json", run.root,
        train={"max_steps": max_steps, "save_steps": save_steps, "save_total_limit": None},
        eval={"judge": judge.spec, "backend": "hf", "max_new_tokens": 8, "judge_max_new_tokens": 16, "limit": 2,
              "max_failure_rate": 0.0},
    )
    return recipe, run


def submit_ok(recipe: Path, procs: int = 2) -> dict[str, int]:
    proc = submit(recipe, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", str(procs))
    assert proc.returncode == 0, f"submit failed:\n{proc.stdout}\n{proc.stderr}"
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(jobs) == ["train", "merge", "generate", "judge", "report"]
    return jobs


def newest_checkpoint(run: RunDir) -> int:
    complete = run.complete_checkpoints()
    return int(complete[-1].name.rsplit("-", 1)[1]) if complete else 0


def assert_outputs(run: RunDir) -> dict:
    for path in (run.adapter / "adapter_config.json", run.merged / "config.json", run.params, run.report_md,
                 run.report_json, run.report_png):
        assert path.is_file(), f"missing {path}"
    assert list(run.answers.glob("*.jsonl")) and list(run.judgments.glob("*_single.jsonl"))
    report = json.loads(run.report_json.read_text())
    assert report["failures"]["total"] == 0, report["failures"]
    assert report["overall"]["all"]["n"] > 0 and report["overall"]["all"]["mean"] == 7.0
    return report


def test_chain_survives_preemption_and_requeue(slurm_cluster, tiny):
    root, judge = tiny
    recipe, run = make_recipe(root, judge, "preempted", max_steps=STEPS, save_steps=2)
    jobs = submit_ok(recipe)
    logs = (run.slurm,)
    train = jobs["train"]

    # 1. Slurm's pre-timeout signal (here sent by hand): checkpoint, exit 75, requeue, resume.
    wait_until("a first complete checkpoint", lambda: newest_checkpoint(run) >= 2, slurm_cluster, logs=logs)
    assert job_state(train).state == "RUNNING"
    subprocess.run(["scancel", "-b", "-s", "USR1", str(train)], check=True, timeout=30)
    wait_until("the training job to be requeued", lambda: job_state(train).restarts >= 1, slurm_cluster, logs=logs)
    first_stop = newest_checkpoint(run)
    assert 2 <= first_stop < STEPS, f"training was not stopped mid-run (newest checkpoint {first_stop})"
    assert job_state(jobs["merge"]).state == "PENDING"  # the later stages keep waiting for the requeued job

    # 2. An admin's `scontrol requeue` mid-run: Slurm sends SIGTERM to every process, training checkpoints again.
    wait_until("training to progress after the resume",
               lambda: newest_checkpoint(run) >= first_stop + 2 and job_state(train).state == "RUNNING",
               slurm_cluster, logs=logs)
    subprocess.run(["scontrol", "requeue", str(train)], check=True, timeout=30)
    wait_until("the second requeue", lambda: job_state(train).restarts >= 2, slurm_cluster, logs=logs)

    report_state = wait_for(slurm_cluster, jobs["report"], timeout_s=600, logs=logs)
    assert report_state.state == "COMPLETED", f"{report_state}\n{job_logs(*logs)}"
    assert_completed(slurm_cluster, jobs, logs=logs)
    assert job_state(train).restarts == 2
    assert_outputs(run)
    summary = json.loads((run.logs / "train_summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["world_size"] == 2
    log = (run.slurm / "logs" / f"train-{train}.out").read_text(errors="replace")  # ranks interleave bytes
    assert log.count("resuming from") == 2, job_logs(*logs)
    assert f"requeueing job {train}" in log and "exiting with 75" in log
    status = json.loads((run.slurm / "chain_status.json").read_text())
    assert status["ok"] is True and status["failed"] == [] and status["stages"]["train"]["restarts"] == 2


def test_failed_merge_cancels_later_stages_then_resubmit_works(slurm_cluster, tiny):
    root, judge = tiny
    recipe, run = make_recipe(root, judge, "failing-merge", max_steps=2, save_steps=2)
    jobs = submit_ok(recipe, procs=1)
    logs = (run.slurm,)
    # Hold the merge so the adapter can be broken between training and merging.
    subprocess.run(["scontrol", "hold", str(jobs["merge"])], check=True, timeout=30)

    refused = submit(recipe, "--nodes", "1", "--gpus-per-node", "0")
    assert refused.returncode == 2 and "live chain" in refused.stderr and "--force" in refused.stderr
    dry = submit(recipe, "--nodes", "1", "--gpus-per-node", "0", "--dry-run")
    assert dry.returncode == 2 and "would overwrite" in dry.stderr  # running jobs read those files

    assert wait_for(slurm_cluster, jobs["train"], logs=logs).state == "COMPLETED", job_logs(*logs)
    weights = run.adapter / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    subprocess.run(["scontrol", "release", str(jobs["merge"])], check=True, timeout=30)

    report_state = wait_for(slurm_cluster, jobs["report"], logs=logs)
    states = {stage: job_state(j).state for stage, j in jobs.items()}
    assert states["merge"] == "FAILED", f"{states}\n{job_logs(*logs)}"
    assert states["generate"] == "CANCELLED" and states["judge"] == "CANCELLED", states
    assert report_state.state == "FAILED"  # the report job ran, and says the chain did not succeed
    status = json.loads((run.slurm / "chain_status.json").read_text())
    assert status["failed"] == ["merge"] and status["cancelled"] == ["generate", "judge"], status
    assert status["report"]["ran"] is False and status["ok"] is False
    assert "FAILED stage(s): merge" in (run.slurm / "logs" / f"report-{jobs['report']}.out").read_text(errors="replace")

    # Fix the cause and resubmit the same run directory: training is already finished (a no-op job), the rest runs.
    weights.write_bytes(good)
    again = submit_ok(recipe, procs=1)
    assert set(again.values()).isdisjoint(jobs.values())
    assert wait_for(slurm_cluster, again["report"], timeout_s=600, logs=logs).state == "COMPLETED", \
        job_logs(*logs)
    assert_completed(slurm_cluster, again, logs=logs)
    assert_outputs(run)
    status = json.loads((run.slurm / "chain_status.json").read_text())
    assert status["ok"] is True and status["stages"]["merge"]["job_id"] == again["merge"]
