"""The embedded default, end to end on a laptop CPU (`make demo`).

    python -m launch.demo                                    # recipes/demo/smollm2_ssh.yaml → runs/demo
    python -m launch.demo --steps 2 --questions 2 --max-new-tokens 8 --run-dir /tmp/demo    # a quick smoke run
    python -m launch.demo train.learning_rate=5e-3           # any recipe override

Stages: train SSH on q_proj/v_proj of SmolLM2-135M-Instruct on a 4-bit NF4 base with a small Alpaca-format set
written by this project (a fifth held out) → merge (dequantized base + ΔW, in the narrowest dtype that keeps ΔW,
checked at the logits) → baseline (the same base without ΔW, in the same dtype) → answer questions with both →
grade both with a local SmolLM2 judge → report comparing tuned against baseline, with both checkpoints' response
loss on the held-out records next to the scores. Each stage is the same command a user runs by hand (printed as it
starts), and a rerun continues where an interrupted one stopped: training resumes from its newest complete
checkpoint (a finished run is a no-op), each merge is skipped when its checkpoint exists, generation and judging add
only the answers and judgments still missing, and the report is written again. The scores
exercise the pipeline; a 135M judge is not a quality measure, the held-out loss is the measured effect.

Every stage uses the thread count of launch/threads.py (`--threads N` or SSPEFT_THREADS to set it). The run's
logs/demo_timings.json holds each stage's seconds (`stages_s`), `total_s`, the thread plan, the machine's load
average, cores and CPU affinity at the start and the end, and whether a model conversion ran (`model_conversion`:
the first run on a machine dequantizes the GGUF once).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launch.models import SOURCE_FILE, shared_cache
from launch.recipe import load_recipe
from launch.rundir import RunDir, atomic_write_json
from launch.threads import ThreadSettingError, configure_threads, cgroup_quota

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "demo" / "smollm2_ssh.yaml"
TIMINGS_FILE = "demo_timings.json"


class DemoError(RuntimeError):
    """A stage failed; the message names it and where its log is."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value")
    p.add_argument("--recipe", default=str(DEMO_RECIPE), help="recipe to run (default: the demo recipe)")
    p.add_argument("--run-dir", help="run directory (default: the recipe's, runs/demo)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    p.add_argument("--questions", type=int, help="questions to answer and judge (default: the recipe's eval.limit)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per answer and per judgment")
    p.add_argument("--threads", type=int, help="CPU threads per stage (default: $SSPEFT_THREADS, else "
                   "$OMP_NUM_THREADS, else the cores this process may use; see launch/threads.py)")
    return p.parse_args(argv)


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.run_dir:
        out.append(f"run_dir={Path(args.run_dir).resolve()}")
    if args.steps is not None:
        out += [f"train.max_steps={args.steps}", f"train.save_steps={max(args.steps, 1)}"]
    if args.questions is not None:
        out.append(f"eval.limit={args.questions}")
    if args.max_new_tokens is not None:
        out += [f"eval.max_new_tokens={args.max_new_tokens}", f"eval.judge_max_new_tokens={args.max_new_tokens}"]
    return out


def run_stage(name: str, argv: list[str], log_dir: Path, timings: dict) -> None:
    """Run one stage's CLI: launch.* in this process (no second start-up), eval.* as `python -m` processes whose
    output is shown and kept in logs/demo-NAME.log (they start vLLM/judge engines of their own)."""
    print(f"\n==> {name}: python -m {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    if argv[0].startswith("launch."):
        module = importlib.import_module(argv[0])
        code = module.main(argv[1:])
        where = "the output above"
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"demo-{name}.log"
        with log.open("w") as sink, subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # progress bars and messages stay visible
                sys.stdout.write(line)
                sink.write(line)
            code = proc.wait()
        where = str(log)
    timings["stages_s"][name] = round(time.perf_counter() - start, 1)
    if code != 0:
        raise DemoError(f"stage {name!r} failed with exit status {code}; see {where}")


def eval_available() -> list[str]:
    return [m for m in ("eval.generate", "eval.judge", "eval.report") if importlib.util.find_spec(m) is None]


def conversion_markers(run: RunDir) -> dict[tuple[int, int], str]:
    """{(inode, mtime): path} of every GGUF-conversion marker in the shared model cache and the run's base/: an
    identity not seen before means a conversion ran (a run's hard-linked copy of the cache keeps the cache's inode)."""
    found = {}
    for marker in [*shared_cache().glob(f"*/{SOURCE_FILE}"), *run.base.glob(f"*/{SOURCE_FILE}")]:
        st = marker.stat()
        found.setdefault((st.st_ino, st.st_mtime_ns), str(marker))
    return found


def machine_state() -> dict:
    """What the timings ran on: load averages (1, 5, 15 min), cores, the CPUs this process may use, the quota."""
    return {"load_average": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)), "cgroup_quota_cpus": cgroup_quota()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = recipe_overrides(args)
    recipe = load_recipe(args.recipe, overrides)  # fails here, before anything runs, on a bad override
    try:  # before any stage imports torch: the OpenMP runtime reads its settings once, at load
        threads = configure_threads(args.threads)
    except ThreadSettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = RunDir(recipe.run_dir)
    baseline = run.baseline_run()
    markers = conversion_markers(run)
    timings: dict = {"stages_s": {}, "threads": threads, "machine_start": machine_state()}
    started = time.perf_counter()
    try:
        run_stage("train", ["launch.train", args.recipe, *overrides], run.logs, timings)
        if not (run.merged / "config.json").is_file():
            run_stage("merge", ["launch.merge", str(run.root)], run.logs, timings)
        if not (baseline.merged / "config.json").is_file():
            run_stage("baseline", ["launch.merge", str(run.root), "--no-adapter"], run.logs, timings)
        missing = eval_available()
        if missing:
            print(f"\nThe evaluation stages are not installed ({', '.join(missing)} missing): stopping after the "
                  f"merge. Outputs: {run.root}")
            return 0
        for target, label in ((run.root, "tuned"), (baseline.root, "baseline")):
            run_stage(f"generate-{label}", ["eval.generate", str(target)], run.logs, timings)
            # a 135M judge answers in a few tokens: transformers starts faster than a vLLM engine here
            run_stage(f"judge-{label}", ["eval.judge", str(target), "--local-backend", "hf"], run.logs, timings)
        run_stage("report", ["eval.report", str(baseline.root), str(run.root)], run.logs, timings)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        timings["total_s"] = round(time.perf_counter() - started, 1)
        timings["machine_end"] = machine_state()
        converted = sorted(path for key, path in conversion_markers(run).items() if key not in markers)
        timings["model_conversion"] = {"ran": bool(converted), "markers": converted}
        if run.root.is_dir():
            atomic_write_json(run.logs / TIMINGS_FILE, timings)
    print_outputs(run, timings)
    return 0


def print_outputs(run: RunDir, timings: dict) -> None:
    baseline = run.baseline_run()
    lines = [
        "", "Demo finished. Outputs:",
        f"  run directory     {run.root}",
        f"  adapter           {run.adapter}",
        f"  merged model      {run.merged}",
        f"  baseline model    {baseline.merged}",
        f"  answers           {run.answers}  and  {baseline.answers}",
        f"  judgments         {run.judgments}  and  {baseline.judgments}",
        f"  reports           {run.report_md}  and  {baseline.report_md}",
        f"  comparison        {run.comparison}",
        f"  timings (s)       {json.dumps(timings['stages_s'])}, total {timings['total_s']}; "
        f"model conversion {'ran' if timings['model_conversion']['ran'] else 'not needed'}; load average "
        f"{timings['machine_start']['load_average'][0]} at the start, {timings['machine_end']['load_average'][0]} "
        f"at the end on {timings['machine_start']['cpu_count']} cores ({run.logs / TIMINGS_FILE})",
        *checkpoint_lines(run),
        "The scores exercise the pipeline; a 135M judge is not a quality measure.",
    ]
    print("\n".join(lines))


def checkpoint_lines(run: RunDir) -> list[str]:
    """What the merge reports say: the dtype, the ΔW kept, the logits probe and the held-out losses."""
    from launch.merge import REPORT_FILE

    lines = []
    for label, folder in (("tuned", run.merged), ("baseline", run.baseline_run().merged)):
        path = folder / REPORT_FILE
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        held = report.get("heldout") or {}
        loss = "n/a" if held.get("loss") is None else f"{held['loss']:.4f} ({held['records']} records)"
        text = f"  {label:<18}{report['dtype']}, held-out response loss {loss}"
        probe = report.get("probe") or {}
        if report.get("adapter") and probe.get("cosine") is not None:
            text += (f"; ΔW lost to rounding {100 * report['delta_lost_worst_layer']:.2f}% (worst layer), "
                     f"logit-shift cosine {probe['cosine']:.4f}, residual {probe['residual']:.4f}")
        lines.append(text)
    return lines


if __name__ == "__main__":
    sys.exit(main())
