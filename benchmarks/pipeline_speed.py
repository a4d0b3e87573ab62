"""Training throughput of the real pipeline (`python -m launch.train`: TRL's SFTTrainer, data collation, the base
as loaded, checkpointing) for SSH against PEFT's LoRA-r8 on one recipe, on an fp32 and an NF4 base.

    python benchmarks/pipeline_speed.py --json benchmarks/speed-results/pipeline.json \\
        --markdown benchmarks/speed-results/pipeline.md          # the pipeline table of docs/speed.md
    python benchmarks/pipeline_speed.py --quick                   # a smoke run (1 round, 2 steps)
    python benchmarks/pipeline_speed.py --recipe RECIPE.yaml      # another recipe (its adapter is the SSH side)

A benchmark, not a test. The recipe (default: the demo's, SmolLM2-135M-Instruct, SSH n = 200 on q_proj and v_proj,
4 × ≤128 tokens per step) is run as it is for SSH, and with its adapter section replaced by PEFT LoRA r = 8
(α = 16, no dropout, the same targets) for LoRA; `model.quantize` is `none` (fp32) or `nf4`. Every run is a fresh
`launch.train` process into a new run directory with `--steps` steps, one log entry per step and a checkpoint at
the end. Runs are interleaved: per round every base and method once, the order rotated every round, so load drift
on a shared machine hits all alike. Read from each run's logs/train_summary.json: tokens/s over the steady steps
(every step after the first; tokens from TRL's `num_tokens`, step times from the pipeline's step timer), and
tokens/s of the whole training loop (TRL's `train_runtime`: the first step, collation between steps and the
checkpoint included). Reported per base: the median of the per-round ratios SSH / LoRA-r8 of both, with their
interquartile range, and the machine's load average before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from timing import quartiles  # benchmarks/ is on sys.path when this file runs
from launch.recipe import load_recipe
from launch.rundir import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "demo" / "smollm2_ssh.yaml"
LORA_R8 = {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
           "init_lora_weights": True}
METHODS = ("ssh", "lora-r8")
BASES = ("fp32", "nf4")


def variant(recipe_path: str, method: str, base: str, steps: int, run_dir: Path) -> dict:
    """The recipe for one run: the SSH recipe as it is, or with LoRA-r8 on the same targets; the base as asked."""
    recipe = load_recipe(recipe_path).to_dict()  # paths resolved: the variant may live anywhere
    if method == "lora-r8":
        recipe["adapter"] = LORA_R8 | {"target_modules": recipe["adapter"]["target_modules"]}
    recipe["model"]["quantize"] = "none" if base == "fp32" else "nf4"
    recipe["train"].update(max_steps=steps, save_steps=steps, logging_steps=1, report_to="none")
    recipe["run_dir"] = str(run_dir)
    recipe["name"] = f"pipeline-speed-{method}-{base}"
    return recipe


def run_once(args, method: str, base: str, work: Path, index: int) -> dict:
    run_dir = work / f"run-{index:03d}-{method}-{base}"
    path = work / f"recipe-{index:03d}.yaml"
    path.write_text(yaml.safe_dump(variant(args.recipe, method, base, args.steps, run_dir), sort_keys=False))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "launch.train", str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=args.timeout)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{method} on {base}: launch.train exited {out.returncode}:\n{out.stderr[-4000:]}")
    summary = json.loads((run_dir / "logs" / "train_summary.json").read_text())
    return {"method": method, "base": base, "process_wall_s": wall,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]} | throughput(summary)


def throughput(summary: dict) -> dict:
    """Tokens/s over the steady steps (after the first) and over the whole training loop."""
    steps = {e["step"]: e["num_tokens"] for e in summary["log"] if "num_tokens" in e}
    runtime = next(e["train_runtime"] for e in summary["log"] if "train_runtime" in e)
    times = summary["step_times_s"]
    if len(times) < 2 or len(steps) != len(times):
        raise RuntimeError(f"need one num_tokens log entry per step and at least 2 steps; got {len(steps)} "
                           f"entries for {len(times)} steps")
    total = steps[max(steps)]
    steady_tokens = total - steps[min(steps)]
    return {"steps": len(times), "tokens": total, "step_times_s": times,
            "steady_tokens_per_s": steady_tokens / sum(times[1:]), "loop_tokens_per_s": total / runtime}


def measure(args) -> list[dict]:
    combos = [(b, m) for b in args.bases for m in METHODS]
    runs = []
    with tempfile.TemporaryDirectory(prefix="pipeline-speed-") as tmp:
        for r in range(args.rounds):
            k = r % len(combos)
            for base, method in combos[k:] + combos[:k]:
                res = run_once(args, method, base, Path(tmp), len(runs)) | {"round": r}
                runs.append(res)
                print(f"round {r} {base:>4} {method:>7}: {res['steady_tokens_per_s']:.1f} tok/s steady, "
                      f"{res['loop_tokens_per_s']:.1f} tok/s loop (load {res['load_average']})", flush=True)
    return runs


def summarise(runs: list[dict], bases) -> dict:
    out = {}
    for base in bases:
        row = {}
        for metric in ("steady_tokens_per_s", "loop_tokens_per_s"):
            by_round: dict[int, dict[str, float]] = {}
            for r in runs:
                if r["base"] == base:
                    by_round.setdefault(r["round"], {})[r["method"]] = r[metric]
            ratios = [v["ssh"] / v["lora-r8"] for v in by_round.values() if len(v) == 2]
            row[metric] = {m: statistics.median([v[m] for v in by_round.values() if m in v]) for m in METHODS}
            row[metric]["ratio"] = {"median": statistics.median(ratios), "iqr": list(quartiles(ratios)),
                                    "rounds": ratios}
        out[base] = row
    return out


def shown_path(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (results name no checkout), else absolute."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Recipe `{result['recipe']}`, {result['rounds']} rounds × {result['steps']} steps per run; "
             f"{m['cpu_count']} cores, {m['threads']} threads; load average {m['load_average_seen'][0]:.1f}–"
             f"{m['load_average_seen'][1]:.1f} during the runs.", "",
             "| base | measure | SSH tok/s (median) | LoRA-r8 tok/s (median) | SSH / LoRA-r8 (median of rounds, IQR) |",
             "|---|---|---|---|---|"]
    for base, row in result["summary"].items():
        for metric, label in (("steady_tokens_per_s", "steady steps"), ("loop_tokens_per_s", "training loop")):
            x = row[metric]
            lo, hi = x["ratio"]["iqr"]
            lines.append(f"| {base} | {label} | {x['ssh']:.1f} | {x['lora-r8']:.1f} | "
                         f"{x['ratio']['median']:.3f} ({lo:.3f}–{hi:.3f}) |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(DEMO_RECIPE), help="the SSH recipe (default: the demo's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not steady)")
    p.add_argument("--bases", default=",".join(BASES), help="comma-separated: fp32, nf4")
    p.add_argument("--timeout", type=int, default=1200, help="seconds one launch.train run may take")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 2 steps")
    p.add_argument("--json", help="write every run and the summary here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    args.bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    bad = [b for b in args.bases if b not in BASES]
    if bad or not args.bases:
        p.error(f"--bases has {bad or args.bases}; expected a comma-separated subset of {', '.join(BASES)}")
    if args.quick:
        args.rounds, args.steps = 1, 2
    if args.steps < 2:
        p.error(f"--steps is {args.steps}; expected at least 2 (the first step is not steady)")
    load_recipe(args.recipe)  # a bad recipe fails here, before any run
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from launch.threads import thread_plan

    runs = measure(args)
    loads = [x for r in runs for x in r["load_average"]]
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "recipe": shown_path(args.recipe),
              "rounds": args.rounds, "steps": args.steps,
              "machine": {"cpu_count": os.cpu_count(), "threads": thread_plan()["threads"],
                          "load_average_seen": [min(loads), max(loads)]},
              "runs": runs, "summary": summarise(runs, args.bases)}
    text = markdown(result)
    print(text)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")
    if args.markdown:
        atomic_write_text(Path(args.markdown), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
