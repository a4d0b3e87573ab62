"""The submitted chain of a run directory (RUN_DIR/slurm/chain.json) and the Slurm state of its jobs.

    from slurm.chain import read_chain, job_states, live_jobs
    chain = read_chain(run.slurm)            # {"stages": {"train": 12, ...}, ...} or None
    live_jobs(chain["stages"])               # {"train": "RUNNING"} while anything is pending or running

States come from `scontrol show job`, which works without an accounting database as long as slurmctld still
remembers the job (MinJobAge, 300 s by default, after it ended); a job it has forgotten reads as "GONE".
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAIN_FILE = "chain.json"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                      "DEADLINE", "OUT_OF_MEMORY", "GONE"})
"""States after which a job will not run again (GONE: slurmctld no longer knows the job)."""


class SlurmError(RuntimeError):
    """A Slurm command failed; the message holds the command and its output."""


@dataclass
class JobState:
    """What `scontrol show job` says about one job."""

    job_id: int
    """Slurm job id."""
    state: str
    """JobState, e.g. PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, or GONE when slurmctld forgot the job."""
    exit_code: str = ""
    """ExitCode as status:signal, e.g. 0:0 or 1:0."""
    restarts: int = 0
    """How often the job was requeued."""
    reason: str = ""
    """Reason field, e.g. DependencyNeverSatisfied for a stage cancelled because an earlier one failed."""

    @property
    def live(self) -> bool:
        return self.state not in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "state": self.state, "exit_code": self.exit_code,
                "restarts": self.restarts, "reason": self.reason}


def run_slurm(argv: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command (argv, never a shell line); SlurmError when it is missing or fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as exc:
        raise SlurmError(f"{argv[0]} not found: is this a Slurm login node (slurm-client installed)?") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(argv)} did not answer within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def job_state(job_id: int) -> JobState:
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=60)
    except FileNotFoundError as exc:
        raise SlurmError("scontrol not found: is this a Slurm login node (slurm-client installed)?") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"scontrol show job {job_id} did not answer within 60 s") from exc
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return JobState(job_id, "GONE")
        raise SlurmError(f"scontrol show job {job_id} exited {proc.returncode}: {proc.stderr.strip()}")
    fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
    restarts = fields.get("Restarts", "0")
    return JobState(job_id, fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", ""),
                    int(restarts) if restarts.isdigit() else 0, fields.get("Reason", ""))


def job_states(stages: dict[str, int]) -> dict[str, JobState]:
    return {stage: job_state(job_id) for stage, job_id in stages.items()}


def live_jobs(stages: dict[str, int]) -> dict[str, JobState]:
    """The stages whose jobs may still run."""
    return {stage: st for stage, st in job_states(stages).items() if st.live}


def read_chain(slurm_dir: Path) -> dict[str, Any] | None:
    path = Path(slurm_dir) / CHAIN_FILE
    if not path.is_file():
        return None
    chain = json.loads(path.read_text(encoding="utf-8"))
    chain["stages"] = {stage: int(job_id) for stage, job_id in chain.get("stages", {}).items()}
    return chain


def cancel(job_ids: list[int], timeout_s: float = 120.0) -> None:
    """scancel the jobs and wait until none of them is live any more."""
    if not job_ids:
        return
    run_slurm(["scancel", *[str(j) for j in job_ids]])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(job_state(j).live for j in job_ids):
            return
        time.sleep(1.0)
    raise SlurmError(f"jobs {job_ids} were cancelled but are still live after {timeout_s:.0f} s")
