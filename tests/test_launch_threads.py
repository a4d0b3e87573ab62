"""launch.threads: the thread count from affinity, cgroup quota, launcher ranks and the user's settings, and what a
stage process really runs with."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from launch.threads import ThreadSettingError, available_cores, cgroup_quota, configure_threads, thread_plan
from launch_helpers import PYTHON, REPO, child_env


def _cgroup(tmp_path, cpu_max=None, v1=None):
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    if cpu_max is not None:
        (root / "cpu.max").write_text(cpu_max + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return root


def test_quota_caps_the_affinity(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert cgroup_quota(_cgroup(tmp_path / "a", "max 100000")) is None
    assert cgroup_quota(_cgroup(tmp_path / "b", "150000 100000")) == 1.5
    assert cgroup_quota(_cgroup(tmp_path / "c", v1=(50000, 100000))) == 0.5
    assert cgroup_quota(_cgroup(tmp_path / "d", v1=(-1, 100000))) is None
    assert cgroup_quota(_cgroup(tmp_path / "e", "garbage")) is None  # unreadable: the affinity alone decides
    assert available_cores(_cgroup(tmp_path / "f", "max 100000")) == cores
    assert available_cores(_cgroup(tmp_path / "g", "50000 100000")) == 1  # half a CPU: one thread
    assert available_cores(_cgroup(tmp_path / "h", f"{100000 * (cores + 8)} 100000")) == cores


def test_precedence_and_ranks(tmp_path):
    root = _cgroup(tmp_path, "max 100000")
    cores = len(os.sched_getaffinity(0))
    assert thread_plan(env={}, root=root) == {"affinity": cores, "cgroup_quota": None, "threads": cores,
                                                  "source": "cores", "local_ranks": 1}
    assert thread_plan(env={"LOCAL_WORLD_SIZE": str(cores * 4)}, root=root)["threads"] == 1
    assert thread_plan(env={"OMP_NUM_THREADS": "3"}, root=root)["threads"] == 3
    plan = thread_plan(env={"OMP_NUM_THREADS": "3", "SSPEFT_THREADS": "5"}, root=root)
    assert (plan["threads"], plan["source"]) == (5, "SSPEFT_THREADS")
    assert thread_plan(7, env={"SSPEFT_THREADS": "5"}, root=root)["source"] == "explicit"
    with pytest.raises(ThreadSettingError, match=r"SSPEFT_THREADS is 'two'; expected a positive integer"):
        thread_plan(env={"SSPEFT_THREADS": "two"}, root=root)
    with pytest.raises(ThreadSettingError, match=r"--threads is '0'"):
        thread_plan(0, env={}, root=root)


def test_configure_keeps_the_users_choices(tmp_path):
    root = _cgroup(tmp_path, "max 100000")
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "active"}
    plan = configure_threads(env=env, root=root)
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "active"} and plan["wait_policy"] == "active"
    env = {"SSPEFT_THREADS": "1"}
    configure_threads(env=env, root=root)
    assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "passive"


def test_a_stage_process_runs_with_the_plan():
    """In a fresh process: importing `launch` sets the passive wait before torch loads, and the count reaches torch
    (and OpenMP, which reads OMP_NUM_THREADS at load)."""
    code = ("import json, os, launch, torch; from launch.threads import configure_threads; "
            "plan = configure_threads(); print(json.dumps([torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], "
            "plan['source']]))")
    env = child_env(SSPEFT_THREADS="1")
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, "passive", "SSPEFT_THREADS"]


def test_bad_thread_setting_stops_a_stage_before_work(tmp_path, monkeypatch, capsys):
    from launch.merge import main as merge_main

    monkeypatch.setenv("SSPEFT_THREADS", "-2")
    assert merge_main([str(tmp_path / "run")]) == 2
    assert "SSPEFT_THREADS is '-2'; expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
