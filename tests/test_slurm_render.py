"""Rendering of the Slurm job chain: a 4 nodes × 8 GPUs job compared field by field, hostile values quoted or
rejected, bad options refused before anything is written. The rendered shell is executed for real (bash), with a
probe standing in for the Python interpreter so the exact argv each command receives can be compared."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.process import PREEMPTED_EXIT_CODE
from launch.recipe import load_recipe
from slurm.render import STAGES, ClusterOptions, RenderError, render_chain, time_limit_seconds
from slurm.submit import DEPENDENCY
from slurm.submit import main as submit_main

HOSTILE = "x y'\"; touch PWNED; $(touch PWNED) `touch PWNED` $HOME"


def write_recipe(tmp: Path, **top) -> Path:
    raw = {
        "name": "tiny",
        "run_dir": str(tmp / "run"),
        "model": {"path": str(tmp / "model"), "quantize": "none", "dtype": "fp32"},
        "adapter": {"method": "ssh"},
        "data": {"path": str(tmp / "data.json")},
        "train": {"max_steps": 3},
        "eval": {"judge": "openai:judge@http://127.0.0.1:9/v1", "backend": "hf"},
    }
    raw.update(top)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def argv_probe(tmp: Path) -> tuple[str, Path]:
    """An executable that appends its argv (as JSON) to a file: stands in for the jobs' Python."""
    out = tmp / "argv.jsonl"
    probe = tmp / "python-probe"
    code = "import json,sys; open(sys.argv[1],'a').write(json.dumps(sys.argv[2:])+'\\n')"
    probe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} {shlex.quote(str(out))} "
                     f"\"$@\"\n")
    probe.chmod(0o755)
    return str(probe), out


def sbatch_options(script: str) -> dict[str, str]:
    opts = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            opts[key] = value if _ else "yes"
    return opts


def run_rendered(script: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run(["bash", str(script)], cwd=cwd, env=full, capture_output=True, text=True, timeout=60)


def test_four_nodes_eight_gpus_field_by_field(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    python, argv_file = argv_probe(tmp_path)
    opts = ClusterOptions(nodes=4, gpus_per_node=8, partition="gpu", time="2-00:00:00", account="proj1",
                          cpus_per_task=64, python=python)
    scripts = render_chain(recipe, opts)
    assert set(scripts) == {"train.sbatch", "train_node.sh"} | {f"{s}.sbatch" for s in STAGES[1:]}

    train = sbatch_options(scripts["train.sbatch"])
    run_slurm = str(tmp_path / "run" / "slurm")
    assert train == {
        "job-name": "sspeft-train-tiny", "output": f"{run_slurm}/logs/train-%j.out", "open-mode": "append",
        "kill-on-invalid-dep": "yes", "nodes": "4", "ntasks-per-node": "1", "requeue": "yes",
        "signal": "B:USR1@300", "gpus-per-node": "8", "partition": "gpu", "account": "proj1",
        "time": "2-00:00:00", "cpus-per-task": "64",
    }
    # The rendezvous host is looked up inside the job, never substituted at submission time.
    body = scripts["train.sbatch"]
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in body
    assert 'srun --ntasks="$nodes" --cpus-per-task=64 --kill-on-bad-exit=1' in body
    assert re.search(r"^nodes=4$", body, re.M)
    # the preemption status the batch script requeues on is the training stage's own
    assert re.search(rf"^\s+{PREEMPTED_EXIT_CODE}\) preempted=1 ;;$", body, re.M)
    assert re.search(rf"^\s+exit {PREEMPTED_EXIT_CODE}$", body, re.M)

    # Every later stage waits for the one before; the report waits for the judge whatever its outcome.
    assert [DEPENDENCY[s] for s in STAGES[1:]] == ["afterok", "afterok", "afterok", "afterany"]
    for stage in STAGES[1:]:
        opts_s = sbatch_options(scripts[f"{stage}.sbatch"])
        assert opts_s["kill-on-invalid-dep"] == "yes" and opts_s["nodes"] == "1", stage
        assert opts_s["partition"] == "gpu" and opts_s["time"] == "2-00:00:00", stage
    assert sbatch_options(scripts["generate.sbatch"])["gpus-per-node"] == "1"
    assert "gpus-per-node" not in sbatch_options(scripts["judge.sbatch"])  # an API judge needs no GPU
    assert "gpus-per-node" not in sbatch_options(scripts["merge.sbatch"])

    # Execute the per-node script as each of the 4 nodes would: same endpoint and rendezvous id everywhere, the
    # node index read from that node's own SLURM_PROCID, 8 ranks per node.
    node_script = tmp_path / "train_node.sh"
    node_script.write_text(scripts["train_node.sh"])
    outputs = []
    for procid in range(4):
        env = {"SLURM_PROCID": str(procid), "SSPEFT_RDZV_ENDPOINT": "gpu-a17:29123", "SSPEFT_RDZV_ID": "4242-0",
               "SSPEFT_RANK_STATUS_DIR": "/status dir"}
        proc = run_rendered(node_script, tmp_path, env)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    calls = [json.loads(line) for line in argv_file.read_text().splitlines()]
    assert len(calls) == 4 and all(c == calls[0] for c in calls)
    expected = ["-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                "--rdzv-endpoint=gpu-a17:29123", "--rdzv-id=4242-0", "--rdzv-conf=join_timeout=900",
                "--max-restarts=0", "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                "--shutdown-timeout=270", "-m", "slurm.rank", "/status dir", "--",
                python, "-m", "launch.train", f"{run_slurm}/recipe.yaml"]
    assert calls[0] == expected
    for procid, out in enumerate(outputs):
        assert f"(index {procid} of 4)" in out


def test_cpu_ranks_and_served_judge(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["eval.judge=serve:/models/judge-70b"])
    scripts = render_chain(recipe, ClusterOptions(nodes=2, gpus_per_node=0, procs_per_node=3))
    assert "--nproc-per-node=3" in scripts["train_node.sh"] and "--nnodes=2" in scripts["train_node.sh"]
    assert "gpus-per-node" not in sbatch_options(scripts["train.sbatch"])
    assert "export DS_ACCELERATOR=cpu" in scripts["train.sbatch"]
    scripts = render_chain(recipe, ClusterOptions(nodes=1, gpus_per_node=4))
    # A judge model served by vLLM runs on the judge job's own node, with that node's GPUs.
    assert sbatch_options(scripts["judge.sbatch"])["gpus-per-node"] == "4"
    assert "--nproc-per-node=4" in scripts["train_node.sh"]


def test_hostile_values_stay_literal(tmp_path):
    """A recipe name, judge spec and data path full of shell syntax run nothing and arrive intact."""
    recipe = load_recipe(write_recipe(tmp_path), [f"name={HOSTILE}", f"eval.judge=openai:m@http://h/{HOSTILE}",
                                                  f"data.path=/data/{HOSTILE}"])
    python, argv_file = argv_probe(tmp_path)
    scripts = render_chain(recipe, ClusterOptions(nodes=1, gpus_per_node=0, python=python))
    for name, text in scripts.items():
        if name == "train_node.sh":
            continue
        name_line = next(line for line in text.splitlines() if line.startswith("#SBATCH --job-name="))
        assert re.fullmatch(r"#SBATCH --job-name=sspeft-[a-z]+-[A-Za-z0-9_.+-]+", name_line), name_line
        assert "touch PWNED" not in text.replace(shlex.quote(f"openai:m@http://h/{HOSTILE}"), "")
    work = tmp_path / "work"
    work.mkdir()
    for stage in STAGES[1:]:
        path = tmp_path / f"{stage}.sbatch"
        path.write_text(scripts[f"{stage}.sbatch"])
        proc = run_rendered(path, work, {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"})
        assert proc.returncode == 0, (stage, proc.stderr)
    assert not list(work.iterdir()) and not (tmp_path / "PWNED").exists(), "a hostile value ran a command"
    calls = [json.loads(line) for line in argv_file.read_text().splitlines()]
    run_dir = str(tmp_path / "run")
    assert calls == [["-m", "launch.merge", run_dir], ["-m", "eval.generate", run_dir],
                     ["-m", "eval.judge", run_dir, "--judge", f"openai:m@http://h/{HOSTILE}"],
                     ["-m", "slurm.finish", run_dir]]


@pytest.mark.parametrize("field,value,message", [
    ("run_dir", "/tmp/with space/run", "run_dir"),
    ("run_dir", "/tmp/$(touch PWNED)", "run_dir"),
    ("run_dir", "/tmp/pct%jrun", "run_dir"),
])
def test_unsafe_run_dir_rejected(tmp_path, field, value, message):
    recipe = load_recipe(write_recipe(tmp_path), [f"{field}={value}"])
    with pytest.raises(RenderError, match=message) as info:
        render_chain(recipe, ClusterOptions())
    assert value in str(info.value)


@pytest.mark.parametrize("opts,flag", [
    (dict(nodes=0), "--nodes"),
    (dict(gpus_per_node=-1), "--gpus-per-node"),
    (dict(gpus_per_node=4, procs_per_node=8), "--procs-per-node"),
    (dict(partition="gpu; rm -rf ~"), "--partition"),
    (dict(account="a b"), "--account"),
    (dict(time="two days"), "--time"),
    (dict(time="4:00"), "--time"),  # 4 minutes leaves no room for a 300 s preemption signal
    (dict(mem="lots"), "--mem"),
    (dict(signal="KILL"), "--signal"),
    (dict(python="python3"), "--python"),
])
def test_bad_options_name_the_flag(opts, flag):
    with pytest.raises(RenderError, match=re.escape(flag)):
        ClusterOptions(**opts).validate()


def test_time_limit_formats():
    assert time_limit_seconds("90") == 5400
    assert time_limit_seconds("10:30") == 630
    assert time_limit_seconds("01:00:05") == 3605
    assert time_limit_seconds("2-00") == 172800
    assert time_limit_seconds("1-02:03:04") == 93784


def test_dry_run_writes_scripts_and_submits_nothing(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch/scontrol reachable: nothing may be submitted
    code = submit_main([str(recipe), "--nodes", "2", "train.max_steps=5", "--gpus-per-node", "0", "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    slurm_dir = tmp_path / "run" / "slurm"
    for name in ["train.sbatch", "train_node.sh", *[f"{s}.sbatch" for s in STAGES[1:]], "recipe.yaml"]:
        assert (slurm_dir / name).is_file(), name
        if name != "recipe.yaml":
            assert f"### {slurm_dir / name}" in out.out
    assert not (slurm_dir / "chain.json").exists()
    assert "--dependency=afterany:<judge job id>" in out.out
    resolved = yaml.safe_load((slurm_dir / "recipe.yaml").read_text())
    assert resolved["train"]["max_steps"] == 5 and resolved["run_dir"] == str(tmp_path / "run")
    assert subprocess.run(["/bin/bash", "-n", str(slurm_dir / "train.sbatch")]).returncode == 0


@pytest.mark.parametrize("args,needle", [
    (["--nodes", "2", "--gpus-per-node", "0", "--partition", "a;b"], "--partition"),
    (["--nodes", "1", "--gpus-per-node", "0", "train.max_stepz=3"], "train.max_steps"),
    (["--nodes", "1", "--gpus-per-node", "0", "run_dir=/tmp/a b"], "run_dir"),
    (["--nodes", "1", "--gpus-per-node", "0", "--time", "1:00"], "--signal-seconds"),
])
def test_submit_bad_input_writes_nothing(tmp_path, args, needle, capsys):
    recipe = write_recipe(tmp_path)
    assert submit_main([str(recipe), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert not (tmp_path / "run").exists() and not Path("/tmp/a b").exists()
