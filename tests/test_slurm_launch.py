"""The rendered training job on a real one-node Slurm cluster, with small probe programs in place of the training
stage: node ranks resolved on each node at run time, and the preemption path (signal → ranks → exit 75 →
requeue → resume). The same scripts with the real training stage, and `scontrol requeue`, are exercised in
test_slurm_chain.py."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from slurm_helpers import job_logs, sbatch, slurm_cluster, wait_for, wait_until  # noqa: F401

from launch.recipe import Recipe
from slurm.chain import job_state
from slurm.render import ClusterOptions, render_chain
from slurm.submit import write_scripts

pytestmark = pytest.mark.slow

RANK_PROBE = """
import json, os, sys
from pathlib import Path
import torch.distributed as dist

dist.init_process_group("gloo")
keys = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "MASTER_ADDR")
info = {k: os.environ.get(k) for k in keys}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, (info["RANK"], info["GROUP_RANK"]))  # proves the ranks really talk
info["gathered"] = gathered
info["argv"] = sys.argv[1:]
Path("ranks").mkdir(exist_ok=True)
Path(f"ranks/rank-{dist.get_rank()}.json").write_text(json.dumps(info))
dist.destroy_process_group()
"""

# Stands in for the training stage's preemption contract: on SIGUSR1/SIGTERM save the step and exit 75; on start
# continue from the saved step.
PREEMPT_PROBE = """
import json, os, signal, sys, time
from pathlib import Path

TOTAL = int(os.environ.get("PROBE_STEPS", "40"))
rank = os.environ["RANK"]
ckpt, progress = Path(f"ckpt-{rank}.json"), Path(f"progress-{rank}.txt")
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
step = start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
with open(f"events-{rank}.log", "a") as log:
    log.write(f"start {start} attempt {os.environ.get('SLURM_RESTART_COUNT', '0')}\\n")
    while step < TOTAL:
        if stop:
            ckpt.write_text(json.dumps({"step": step}))
            log.write(f"preempted {step} signal {stop[0]}\\n")
            sys.exit(75)
        time.sleep(0.25)
        step += 1
        progress.write_text(str(step))
    log.write(f"done {step}\\n")
"""


def render_probe(tmp: Path, module: str, source: str, **opts) -> tuple[Path, Path]:
    """Render the training job for a recipe whose rank program is `module`; return (work dir, train.sbatch)."""
    work = tmp / "work"
    work.mkdir()
    (work / f"{module}.py").write_text(textwrap.dedent(source))
    recipe = Recipe(name="probe", run_dir=str(tmp / "run"))
    scripts = render_chain(recipe, ClusterOptions(**opts), train_module=module)
    paths = write_scripts(recipe, recipe.run, scripts)
    return work, paths["train.sbatch"]


def test_two_tasks_on_one_node_get_distinct_node_ranks(slurm_cluster, tmp_path):
    work, script = render_probe(tmp_path, "rank_probe", RANK_PROBE, nodes=2, procs_per_node=2, gpus_per_node=0)
    # The script is rendered for 2 nodes; on this one machine the allocation is one node with 2 tasks, so the
    # two torchruns play the two nodes.
    job = sbatch(script, "--nodes=1", "--ntasks-per-node=2", f"--chdir={work}")
    st = wait_for(slurm_cluster, job, logs=(tmp_path,))
    assert st.state == "COMPLETED", f"{st}\n{job_logs(tmp_path)}"
    infos = [json.loads(p.read_text()) for p in sorted((work / "ranks").glob("rank-*.json"))]
    assert len(infos) == 4, job_logs(tmp_path)
    assert {i["RANK"] for i in infos} == {"0", "1", "2", "3"}
    assert {i["WORLD_SIZE"] for i in infos} == {"4"} and {i["LOCAL_WORLD_SIZE"] for i in infos} == {"2"}
    by_node: dict[str, set[str]] = {}
    for info in infos:
        by_node.setdefault(info["GROUP_RANK"], set()).add(info["SLURM_PROCID"])
    assert set(by_node) == {"0", "1"}, f"node ranks {sorted(by_node)}: every node believes it is the same one"
    # each node rank belongs to exactly one of the two srun tasks, and the two tasks got different node ranks
    assert all(len(procids) == 1 for procids in by_node.values())
    assert by_node["0"] != by_node["1"]
    assert all(i["gathered"] == infos[0]["gathered"] for i in infos)
    assert infos[0]["argv"] == [str(tmp_path / "run" / "slurm" / "recipe.yaml")]
    statuses = sorted((tmp_path / "run" / "slurm" / "status").glob(f"train-{job}-0/rank-*.exit"))
    assert [p.read_text().strip() for p in statuses] == ["0"] * 4


def _progress(work: Path, ranks: int) -> int:
    values = []
    for rank in range(ranks):
        path = work / f"progress-{rank}.txt"
        try:
            values.append(int(path.read_text()))
        except (OSError, ValueError):
            values.append(0)
    return min(values)


def _attempt_statuses(run: Path, job: int, attempt: int) -> list[str]:
    return [p.read_text().strip() for p in sorted((run / "slurm" / "status").glob(f"train-{job}-{attempt}/rank-*.exit"))]


def test_preemption_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    work, script = render_probe(tmp_path, "preempt_probe", PREEMPT_PROBE, nodes=1, procs_per_node=2,
                                gpus_per_node=0, signal_seconds=60)
    job = sbatch(script, f"--chdir={work}")
    wait_until("both ranks past step 4", lambda: _progress(work, 2) >= 4, slurm_cluster, logs=(tmp_path,))
    # What Slurm does before the time limit (--signal=B:USR1@60): the signal goes to the batch script only.
    subprocess.run(["scancel", "-b", "-s", "USR1", str(job)], check=True, timeout=30)
    wait_until("the job to be requeued", lambda: job_state(job).restarts >= 1, slurm_cluster, logs=(tmp_path,))
    st = wait_for(slurm_cluster, job, logs=(tmp_path,))
    assert st.state == "COMPLETED" and st.restarts == 1, f"{st}\n{job_logs(tmp_path)}"
    for rank in range(2):
        events = (work / f"events-{rank}.log").read_text().splitlines()
        assert events[0] == "start 0 attempt 0", events
        assert events[1].startswith("preempted ") and events[1].endswith("signal 10"), events  # SIGUSR1
        saved = int(events[1].split()[1])
        assert 4 <= saved < 40
        assert events[2:] == [f"start {saved} attempt 1", "done 40"], events
    run = tmp_path / "run"
    assert _attempt_statuses(run, job, 0) == ["75", "75"]
    assert _attempt_statuses(run, job, 1) == ["0", "0"]
    log = (run / "slurm" / "logs" / f"train-{job}.out").read_text()
    assert "got SIGUSR1, forwarding it to the ranks" in log and f"requeueing job {job}" in log
