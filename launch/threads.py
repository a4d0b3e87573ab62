"""How many CPU threads a stage's torch/OpenMP pool uses, and how its idle threads wait; standard library only.

    python -m launch.threads            # prints what a stage would use here, and why

torch sizes its intra-op pool from the CPUs the OpenMP runtime sees, which ignores a container's CPU quota
(cgroup `cpu.max`): a job given 2 CPUs of a 64-core node starts 64 threads, each waiting at every barrier for the
slowest. On a shared machine the second cost is the wait itself: GNU OpenMP (torch's CPU wheels) lets a thread
that reaches a barrier early spin for a while before it sleeps (GOMP_SPINCOUNT), so on cores that other processes
also want, the spinners take time slices the working threads need (OMP_WAIT_POLICY=passive makes them sleep at once).

A stage calls `configure_threads()` first thing. The count, in order of precedence:
1. `SSPEFT_THREADS=N` (or a stage's `--threads N`): this many threads;
2. `OMP_NUM_THREADS` set by the user: respected as it is (torch reads it itself);
3. otherwise the cores this process may run on: its CPU affinity (`os.sched_getaffinity`), capped by the cgroup
   CPU quota (`/sys/fs/cgroup/cpu.max`, or cgroup v1's `cpu.cfs_quota_us`/`cpu.cfs_period_us`), rounded up, and
   shared among the ranks a launcher started on this node (LOCAL_WORLD_SIZE).
The count goes to torch in this process and, through `OMP_NUM_THREADS`, to the processes a stage starts.
`OMP_WAIT_POLICY` is set to `passive` unless the user set it. The OpenMP runtime reads it once, when torch loads it,
so importing the `launch` package sets it (`default_wait_policy`), before any stage module imports torch.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, MutableMapping, Optional

THREADS_ENV = "SSPEFT_THREADS"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class ThreadSettingError(ValueError):
    """SSPEFT_THREADS or --threads is not a positive integer."""


def affinity_cores() -> int:
    """CPUs this process may be scheduled on (taskset, Slurm's --cpus-per-task binding, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_quota(root: Path = CGROUP_ROOT) -> Optional[float]:
    """CPUs' worth of time the cgroup quota allows (e.g. 1.5), or None when there is no quota."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            fields = v2.read_text().split()  # "max 100000" or "150000 100000"
            return None if fields[0] == "max" else int(fields[0]) / int(fields[1] if len(fields) > 1 else 100000)
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else quota_us / int(period_file.read_text())
    except (OSError, ValueError):
        return None  # unreadable or malformed: no quota known, the affinity alone decides
    return None


def available_cores(root: Path = CGROUP_ROOT) -> int:
    """The affinity's CPU count, capped by the cgroup quota rounded up; at least 1."""
    cores = affinity_cores()
    quota = cgroup_quota(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def parse_threads(value: str, name: str) -> int:
    """`value` as a positive thread count; a clear error naming `name` otherwise."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ThreadSettingError(f"{name} is {value!r}; expected a positive integer number of threads")
    return n


def thread_plan(explicit: Optional[int] = None, env: Optional[MutableMapping[str, str]] = None,
                root: Path = CGROUP_ROOT) -> dict[str, Any]:
    """The count and where it came from (`explicit`, SSPEFT_THREADS, OMP_NUM_THREADS or `cores`), with the
    affinity and quota it was derived from."""
    env = os.environ if env is None else env
    plan: dict[str, Any] = {"affinity": affinity_cores(), "cgroup_quota": cgroup_quota(root)}
    if explicit is not None:
        plan |= {"threads": parse_threads(str(explicit), "--threads"), "source": "explicit"}
    elif env.get(THREADS_ENV):
        plan |= {"threads": parse_threads(env[THREADS_ENV], THREADS_ENV), "source": THREADS_ENV}
    elif env.get("OMP_NUM_THREADS"):
        plan |= {"threads": parse_threads(env["OMP_NUM_THREADS"].split(",")[0], "OMP_NUM_THREADS"),
                 "source": "OMP_NUM_THREADS"}
    else:
        ranks = parse_threads(env.get("LOCAL_WORLD_SIZE") or "1", "LOCAL_WORLD_SIZE")
        plan |= {"threads": max(available_cores(root) // ranks, 1), "source": "cores", "local_ranks": ranks}
    return plan


def default_wait_policy(env: Optional[MutableMapping[str, str]] = None) -> None:
    """OMP_WAIT_POLICY=passive unless already set: idle OpenMP threads sleep instead of spinning on shared cores."""
    (os.environ if env is None else env).setdefault("OMP_WAIT_POLICY", "passive")


def configure_threads(explicit: Optional[int] = None, env: Optional[MutableMapping[str, str]] = None,
                      root: Path = CGROUP_ROOT) -> dict[str, Any]:
    """Apply `thread_plan` to torch in this process (when torch is imported) and to `env` for the processes it
    starts; returns the plan with the wait policy used. Idempotent."""
    env = os.environ if env is None else env
    plan = thread_plan(explicit, env, root)
    if plan["source"] != "OMP_NUM_THREADS":
        env["OMP_NUM_THREADS"] = str(plan["threads"])
    default_wait_policy(env)
    plan["wait_policy"] = env["OMP_WAIT_POLICY"]
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != plan["threads"]:
        torch.set_num_threads(plan["threads"])
    return plan


if __name__ == "__main__":
    print(json.dumps(thread_plan() | {"load_average": os.getloadavg()}, indent=2))
