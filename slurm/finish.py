"""The report job of a Slurm chain: says how every stage ended, then runs the report if there is anything to report.

    python -m slurm.finish RUN_DIR

It runs after the judge job whatever happened before (`afterany`). It reads the job ids from
RUN_DIR/slurm/chain.json, asks Slurm how each stage ended, writes RUN_DIR/slurm/chain_status.json
(`stages`, `failed`, `cancelled`, `report`, `ok`), prints which stage failed and which were cancelled because of
it, and runs `python -m eval.report RUN_DIR` when the judge wrote judgments (a judge that exceeded its failure
budget still gets its report). Exit status 0 only when every stage completed and the report was written.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from launch.rundir import RunDir, atomic_write_json
from slurm.chain import JobState, job_states, read_chain
from slurm.render import STAGES

STATUS_FILE = "chain_status.json"


def summarize(states: dict[str, JobState]) -> dict[str, Any]:
    """Failed stages (ended badly on their own) and cancelled ones (never ran because an earlier stage failed)."""
    failed, cancelled = [], []
    for stage in STAGES:
        st = states.get(stage)
        if st is None or st.state == "COMPLETED":
            continue
        if st.state == "CANCELLED" and "Dependency" in st.reason:
            cancelled.append(stage)
        else:
            failed.append(stage)
    return {"stages": {stage: st.to_dict() for stage, st in states.items()}, "failed": failed,
            "cancelled": cancelled}


def has_judgments(run: RunDir) -> bool:
    return run.judgments.is_dir() and any(run.judgments.glob("*_single.jsonl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.finish", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--python", default=sys.executable, help="interpreter for eval.report")
    args = parser.parse_args(argv)
    run = RunDir(args.run_dir)
    chain = read_chain(run.slurm)
    before = {s: j for s, j in (chain or {}).get("stages", {}).items() if s != "report"}
    summary = summarize(job_states(before))
    for stage, st in summary["stages"].items():
        print(f"sspeft: stage {stage} (job {st['job_id']}): {st['state']} exit {st['exit_code']}"
              f"{' after ' + str(st['restarts']) + ' requeue(s)' if st['restarts'] else ''}")
    if summary["failed"]:
        print(f"sspeft: FAILED stage(s): {', '.join(summary['failed'])}; see {run.slurm / 'logs'}", file=sys.stderr)
    if summary["cancelled"]:
        print(f"sspeft: cancelled because an earlier stage failed: {', '.join(summary['cancelled'])}",
              file=sys.stderr)

    report: dict[str, Any] = {"ran": False, "exit_code": None, "reason": ""}
    if has_judgments(run):
        proc = subprocess.run([args.python, "-m", "eval.report", str(run.root)])
        report.update(ran=True, exit_code=proc.returncode)
        if proc.returncode != 0:
            print(f"sspeft: eval.report exited {proc.returncode}", file=sys.stderr)
    else:
        report["reason"] = f"no judgments in {run.judgments}: the judge stage did not run"
        print(f"sspeft: no report: {report['reason']}", file=sys.stderr)
    summary["report"] = report
    summary["ok"] = not summary["failed"] and not summary["cancelled"] and report["exit_code"] == 0
    atomic_write_json(run.slurm / STATUS_FILE, summary)
    print(f"sspeft: chain status written to {run.slurm / STATUS_FILE}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
