"""Submit a sweep to Slurm: N training jobs (one per recipe), one generation job after all of them, and each run's
judge and report.

    python -m slurm.sweep RECIPE_A.yaml RECIPE_B.yaml ... --sweep-dir DIR --nodes N --gpus-per-node G
        [--max-rank R] [--max-error E] [the cluster flags of slurm.submit] [--dry-run] [--force]

Each recipe's training job is rendered exactly as `slurm.submit` renders it. The generation job (`afterok` on every
training job) exports each run as an exact LoRA (`launch.export RUN --to lora`) and answers for every run and its
baseline from one vLLM engine (`eval.generate RUN... --backend vllm --adapters lora`): no merged checkpoint per
run, one engine start for the sweep. Then per run: judge (`afterok` on the generation job) and report
(`afterany`). The recipes must share model.path, model.quantize and model.dtype (one engine serves one base).
Writes DIR/generate.sbatch, DIR/sweep.json (all job ids) and each run's slurm/chain.json (its own stages, with the
shared generation job), so `slurm.finish` reports each run as usual. Prints one JSON line {run: {stage: id}}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from launch.recipe import RecipeError, load_recipe
from launch.rundir import RunDir, atomic_write_json, atomic_write_text
from slurm.chain import CHAIN_FILE, SlurmError, cancel, read_chain, run_slurm
from slurm.render import RenderError, render_chain, render_sweep_generate
from slurm.submit import (SubmitError, build_parser as submit_parser, check_live_chain, check_run_dir,
                          options_from_args, report_submission, sbatch, write_scripts)

RUN_FILES = ("train.sbatch", "train_node.sh", "judge.sbatch", "report.sbatch")
SWEEP_FILE = "sweep.json"


def build_parser() -> argparse.ArgumentParser:
    """slurm.submit's cluster flags; every positional is a recipe file."""
    p = submit_parser()
    p.prog, p.description = "python -m slurm.sweep", __doc__.split("\n\n")[0]
    for action in p._actions:
        if action.dest == "overrides":
            action.help, action.metavar = "further recipe files of the sweep", "RECIPE"
    p.add_argument("--sweep-dir", type=Path, required=True, help="where the generation job's script and logs go")
    p.add_argument("--max-rank", type=int, default=None, help="launch.export --max-rank (default: its own)")
    p.add_argument("--max-error", type=float, default=None, help="launch.export --max-error")
    return p


def prepare(args: argparse.Namespace):
    """Recipes, runs and every script, checked before anything is written or submitted."""
    opts = options_from_args(args)
    paths = [args.recipe, *(Path(p) for p in args.overrides)]
    recipes = [load_recipe(p) for p in paths]
    runs = [RunDir(r.run_dir) for r in recipes]
    if len(set(runs)) != len(runs):
        raise SubmitError("two recipes of the sweep share a run_dir; give each run its own")
    bases = {(r.model.path, r.model.quantize, r.model.dtype) for r in recipes}
    if len(bases) != 1:
        raise SubmitError(f"the recipes use different bases {sorted(bases)}; one generation engine serves one base "
                          f"(model.path, model.quantize, model.dtype must agree)")
    lora_runs = [r.name for r in recipes if r.adapter.method == "lora"]
    if lora_runs:
        raise SubmitError(f"recipes {lora_runs} train LoRA; the sweep exports spectral adapters to LoRA")
    if args.max_rank is not None and not 1 <= args.max_rank <= 512:
        raise SubmitError(f"--max-rank is {args.max_rank}; expected 1..512")
    scripts = []
    for recipe, path in zip(recipes, paths):
        rendered = render_chain(recipe, opts, recipe_source=str(path.resolve()))
        scripts.append({name: rendered[name] for name in RUN_FILES})
    for recipe, run in zip(recipes, runs):
        check_run_dir(recipe, run)
    sweep_dir = args.sweep_dir.expanduser().resolve()
    generate = render_sweep_generate(recipes, opts, sweep_dir, args.max_rank, args.max_error)
    return recipes, runs, scripts, sweep_dir, generate


def submit_sweep(runs: list[RunDir], sweep_dir: Path) -> dict[str, dict[str, int]]:
    """Training jobs held until every chain file is written; the generation job waits for all of them."""
    jobs: dict[str, dict[str, int]] = {str(run.root): {} for run in runs}
    submitted: list[int] = []
    try:
        for run in runs:
            jobs[str(run.root)]["train"] = sbatch(run.slurm / "train.sbatch", ["--hold"])
            submitted.append(jobs[str(run.root)]["train"])
        trains = ":".join(str(j["train"]) for j in jobs.values())
        generate = sbatch(sweep_dir / "generate.sbatch", [f"--dependency=afterok:{trains}"])
        submitted.append(generate)
        for run in runs:
            mine = jobs[str(run.root)]
            mine["generate"] = generate
            mine["judge"] = sbatch(run.slurm / "judge.sbatch", [f"--dependency=afterok:{generate}"])
            submitted.append(mine["judge"])
            mine["report"] = sbatch(run.slurm / "report.sbatch", [f"--dependency=afterany:{mine['judge']}"])
            submitted.append(mine["report"])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for run in runs:
            atomic_write_json(run.slurm / CHAIN_FILE, {"stages": jobs[str(run.root)], "submitted": stamp,
                                                       "sweep": str(sweep_dir)})
        atomic_write_json(sweep_dir / SWEEP_FILE, {"runs": jobs, "generate": generate, "submitted": stamp})
        run_slurm(["scontrol", "release", *[str(j["train"]) for j in jobs.values()]])
    except SlurmError:
        if submitted:
            run_slurm(["scancel", *[str(j) for j in submitted]])
        raise
    return jobs


def _write(recipes, runs, scripts, sweep_dir: Path, generate: str) -> None:
    for recipe, run, files in zip(recipes, runs, scripts):
        write_scripts(recipe, run, files)
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "generate.sbatch", generate).chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        recipes, runs, scripts, sweep_dir, generate = prepare(args)
    except (RecipeError, RenderError, SubmitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            # running jobs read their scripts from RUN_DIR/slurm/: never overwrite a live chain's
            for run in runs:
                if read_chain(run.slurm) is not None:
                    check_live_chain(run, force=False)
        except (SubmitError, SlurmError) as exc:
            print(f"error: --dry-run would overwrite the scripts of a live chain: {exc}", file=sys.stderr)
            return 2
        _write(recipes, runs, scripts, sweep_dir, generate)
        print(f"### {sweep_dir / 'generate.sbatch'}\n{generate}")
        print("### would submit (training held until the chains are recorded):")
        for run in runs:
            print(shlex.join(["sbatch", "--parsable", "--hold", str(run.slurm / "train.sbatch")]))
        print(shlex.join(["sbatch", "--parsable", "--dependency=afterok:<every train job id>",
                          str(sweep_dir / "generate.sbatch")]))
        for run in runs:
            print(shlex.join(["sbatch", "--parsable", "--dependency=afterok:<generate job id>",
                              str(run.slurm / "judge.sbatch")]))
            print(shlex.join(["sbatch", "--parsable", "--dependency=afterany:<judge job id>",
                              str(run.slurm / "report.sbatch")]))
        return 0
    def submit() -> dict:
        cancel([job for run in runs for job in check_live_chain(run, args.force)])
        _write(recipes, runs, scripts, sweep_dir, generate)
        return submit_sweep(runs, sweep_dir)

    return report_submission(submit)


if __name__ == "__main__":
    sys.exit(main())
