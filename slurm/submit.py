"""Submit a recipe to Slurm: multi-node training, merge, generation, judging and the report, as one job chain.

    python -m slurm.submit RECIPE.yaml [section.key=value ...] --nodes N --gpus-per-node G [--procs-per-node P]
        [--partition P] [--time T] [--account A] [--cpus-per-task C] [--mem M] [--dry-run] [--force]

Renders the job scripts from the resolved recipe into RUN_DIR/slurm/ (train.sbatch + train_node.sh, merge.sbatch,
generate.sbatch, judge.sbatch, report.sbatch, and recipe.yaml, the resolved recipe every stage reads) and submits
train → merge → generate → judge (each `afterok` on the previous one) → report (`afterany`, so a failed judge is
still reported), every job with `--kill-on-invalid-dep=yes` so a failed stage cancels the stages that needed it.
Prints one JSON line {stage: job_id}. `--dry-run` writes and prints the scripts and submits nothing. A run
directory whose previous chain is still pending or running is refused unless `--force`, which cancels that chain
first. Exit status 2 for bad input (nothing written), 1 when Slurm refuses a submission.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from launch.recipe import Recipe, RecipeError, load_recipe, load_resolved
from launch.rundir import RunDir, atomic_write_json, atomic_write_text
from slurm.chain import CHAIN_FILE, SlurmError, cancel, live_jobs, read_chain, run_slurm
from slurm.render import STAGES, ClusterOptions, RenderError, render_chain

DEPENDENCY = {"merge": "afterok", "generate": "afterok", "judge": "afterok", "report": "afterany"}


class SubmitError(RuntimeError):
    """The chain cannot be submitted as asked; nothing was submitted."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. train.max_steps=100)")
    p.add_argument("--nodes", type=int, required=True, help="nodes for the training job")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per training node; 0 = CPU ranks")
    p.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: GPUs, or 1 on CPU)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit of each job, e.g. 2-00:00:00")
    p.add_argument("--account", default=None)
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node task (set it on GPU clusters)")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 200G (0 = all)")
    p.add_argument("--signal", default="USR1", help="preemption signal sent before the time limit")
    p.add_argument("--signal-seconds", type=int, default=300, help="how long before the time limit it comes")
    p.add_argument("--rdzv-port", type=int, default=None, help="rendezvous port (default: from the job id)")
    p.add_argument("--join-timeout", type=int, default=900, help="seconds torchrun waits for all nodes")
    p.add_argument("--max-requeues", type=int, default=20, help="preemption requeues before giving up")
    p.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes")
    p.add_argument("--dry-run", action="store_true", help="write and print the scripts, submit nothing")
    p.add_argument("--force", action="store_true", help="cancel a live chain of this run directory first")
    return p


def options_from_args(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                          partition=args.partition, time=args.time, account=args.account,
                          cpus_per_task=args.cpus_per_task, mem=args.mem, signal=args.signal,
                          signal_seconds=args.signal_seconds, rdzv_port=args.rdzv_port,
                          join_timeout_s=args.join_timeout, max_requeues=args.max_requeues, python=args.python)


def check_run_dir(recipe: Recipe, run: RunDir) -> None:
    """A run directory made by a different recipe is refused here, before any job waits in the queue."""
    if not run.recipe.is_file():
        return
    differing = load_resolved(run.root).differences(recipe)
    if differing:
        raise SubmitError(f"{run.root} was made by a different recipe (differing keys: {', '.join(differing)}); "
                          f"choose another run_dir or restore those values")


def check_live_chain(run: RunDir, force: bool) -> list[int]:
    """Job ids of a previous chain that may still run; SubmitError unless `force`."""
    chain = read_chain(run.slurm)
    if chain is None:
        return []
    live = live_jobs(chain["stages"])
    if live and not force:
        listing = ", ".join(f"{stage} job {st.job_id} {st.state}" for stage, st in live.items())
        raise SubmitError(f"{run.root} already has a live chain ({listing}); wait for it, scancel it, or pass "
                          f"--force to cancel it and submit anew")
    return [st.job_id for st in live.values()]


def write_scripts(recipe: Recipe, run: RunDir, scripts: dict[str, str]) -> dict[str, Path]:
    (run.slurm / "logs").mkdir(parents=True, exist_ok=True)
    recipe.dump(run.slurm / "recipe.yaml")
    paths = {}
    for name, text in scripts.items():
        path = atomic_write_text(run.slurm / name, text)
        os.chmod(path, 0o755)
        paths[name] = path
    return paths


def sbatch(script: Path, extra: list[str]) -> int:
    proc = run_slurm(["sbatch", "--parsable", *extra, str(script)])
    text = proc.stdout.strip().split(";")[0]
    if not text.isdigit():
        raise SlurmError(f"sbatch {script} printed {proc.stdout!r}, not a job id")
    return int(text)


def submit_chain(run: RunDir) -> dict[str, int]:
    """Submit the five stages; training is held until chain.json names every job, then released."""
    jobs: dict[str, int] = {}
    try:
        for stage in STAGES:
            extra = ["--hold"] if stage == "train" else [f"--dependency={DEPENDENCY[stage]}:{jobs[_previous(stage)]}"]
            jobs[stage] = sbatch(run.slurm / f"{stage}.sbatch", extra)
        atomic_write_json(run.slurm / CHAIN_FILE, {"stages": jobs, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        run_slurm(["scontrol", "release", str(jobs["train"])])
    except SlurmError:
        if jobs:
            run_slurm(["scancel", *[str(j) for j in jobs.values()]])
        raise
    return jobs


def _previous(stage: str) -> str:
    return STAGES[STAGES.index(stage) - 1]


def prepare(args: argparse.Namespace) -> tuple[Recipe, RunDir, dict[str, str]]:
    """Everything that can fail on bad input, done before anything is written or submitted."""
    opts = options_from_args(args)
    recipe = load_recipe(args.recipe, list(args.overrides))
    run = RunDir(recipe.run_dir)
    scripts = render_chain(recipe, opts, recipe_source=str(args.recipe.resolve()))
    check_run_dir(recipe, run)
    return recipe, run, scripts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        recipe, run, scripts = prepare(args)
    except (RecipeError, RenderError, SubmitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            # Running jobs read train_node.sh and recipe.yaml from RUN_DIR/slurm/: never overwrite a live chain's.
            if read_chain(run.slurm) is not None:
                check_live_chain(run, force=False)
        except (SubmitError, SlurmError) as exc:
            print(f"error: --dry-run would overwrite the scripts of the chain in {run.slurm}: {exc}", file=sys.stderr)
            return 2
        paths = write_scripts(recipe, run, scripts)
        for name, path in paths.items():
            print(f"### {path}\n{scripts[name]}")
        print("### would submit (train held until the chain is recorded):")
        for stage in STAGES:
            dep = "--hold" if stage == "train" else f"--dependency={DEPENDENCY[stage]}:<{_previous(stage)} job id>"
            print(shlex.join(["sbatch", "--parsable", dep, str(run.slurm / f"{stage}.sbatch")]))
        return 0
    def submit() -> dict:
        cancel(check_live_chain(run, args.force))
        write_scripts(recipe, run, scripts)
        return submit_chain(run)

    return report_submission(submit)


def report_submission(submit) -> int:
    """Run `submit()` and print the job ids it returns as JSON; exit 2 on bad input, 1 when Slurm refuses."""
    try:
        jobs = submit()
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
