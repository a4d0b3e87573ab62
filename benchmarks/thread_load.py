"""Training-step time of the demo's model under a background CPU load, with torch's default threading ("before")
against `launch.threads.configure_threads` ("after"), and the slowdown each suffers from the load.

    python benchmarks/thread_load.py --json benchmarks/speed-results/thread_load.json    # the table in docs/speed.md
    python benchmarks/thread_load.py --quick                                             # a smoke run

A benchmark, not a test. Model: a LlamaForCausalLM shaped like SmolLM2-135M (30 layers, hidden 576; seeded random
weights), SSH n = 200 on q_proj and v_proj, AdamW, 4 × 128 tokens per step, fp32: the demo's training step. Each
setting runs in a process of its own (the OpenMP runtime reads its environment once, at start), one warm-up step then
`--steps` timed steps. The background load is `--load` processes that each spin a pure-Python busy loop, started
before a block of measurements and stopped after it; load and no-load blocks alternate, and within a block the
settings run in a rotated order per round, so drift in the other users of a shared machine hits all alike. Reported:
median step time per setting with and without the load (min–max), the slowdown (loaded / idle median), and the
median of the per-round ratios after / before (with their interquartile range). The load average and the cores are
recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    # torch's own choice: threads = the CPUs OpenMP sees, GNU OpenMP's default spin-then-sleep wait
    "before": {},
    # launch.threads: threads from affinity and cgroup quota, passive wait
    "after": {"THREAD_LOAD_CONFIGURE": "1"},
    # one thread, default wait: no barrier to wait at (the diagnosis: is it the waiting or the count?)
    "one-thread": {"OMP_NUM_THREADS": "1"},
}
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     num_hidden_layers=30, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "SSPEFT_THREADS", "GOMP_SPINCOUNT")


def worker(steps: int, layers: int) -> dict:
    """One setting's step times, in this process (the environment is already the setting's; nothing of `launch`
    is imported before torch except by the `after` setting, since importing `launch` sets the wait policy)."""
    if os.environ.get("THREAD_LOAD_CONFIGURE"):
        from launch.threads import configure_threads

        configure_threads()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import sspeft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(SMOLLM2_SHAPE, num_hidden_layers=layers)))
    model = sspeft.inject(model, sspeft.SpectralConfig(method="ssh", n=200, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(SMOLLM2_SHAPE["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "step_s": times[1:]}


def run_setting(name: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS} | SETTINGS[name]
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--layers", str(args.layers)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"setting {name!r} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spin(parent: int) -> None:
    while os.getppid() == parent:  # a busy loop that ends when the benchmark does, however it ends
        pass


class BusyLoad:
    """`n` processes spinning a busy loop while the block runs; stopped (each by its own handle) when it ends."""

    def __init__(self, n: int) -> None:
        self.procs = [multiprocessing.Process(target=_spin, args=(os.getpid(),), daemon=True) for _ in range(n)]

    def __enter__(self) -> "BusyLoad":
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
            p.join(timeout=10)


def measure(args) -> dict:
    names = args.settings
    samples: dict[str, dict[str, list]] = {"idle": {n: [] for n in names}, "load": {n: [] for n in names}}
    loads = []
    for r in range(args.rounds):
        for block in ("idle", "load") if r % 2 == 0 else ("load", "idle"):
            with BusyLoad(args.load if block == "load" else 0):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    res = run_setting(name, args)
                    samples[block][name].append(res)
                    loads.append(os.getloadavg()[0])
                    _save(args, {"partial": True, "samples": samples})  # a killed run keeps what it measured
                    print(f"round {r} {block:>4} {name:>6}: threads {res['threads']}, median step "
                          f"{statistics.median(res['step_s']):.3f} s", flush=True)
    return {"samples": samples, "load_average_seen": [min(loads), max(loads)]}


def _save(args, result: dict) -> None:
    if args.json:
        from launch.rundir import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")


def summarise(samples: dict) -> dict:
    """Per setting and block: median of the per-process median step times (min–max); slowdown; after/before."""
    from timing import quartiles  # benchmarks/ is on sys.path when this file runs

    med = {b: {n: [statistics.median(s["step_s"]) for s in runs] for n, runs in by.items()}
           for b, by in samples.items()}
    table = {}
    for name in med["idle"]:
        idle, load = med["idle"][name], med["load"][name]
        table[name] = {"threads": samples["idle"][name][0]["threads"],
                       "idle_s": statistics.median(idle), "idle_range": [min(idle), max(idle)],
                       "load_s": statistics.median(load), "load_range": [min(load), max(load)],
                       "slowdown": statistics.median(load) / statistics.median(idle)}
    ratios = {}
    for block in ("idle", "load"):
        per_round = [a / b for a, b in zip(med[block]["after"], med[block]["before"])]
        ratios[block] = {"median": statistics.median(per_round), "iqr": list(quartiles(per_round)),
                         "rounds": per_round}
    return {"settings": table, "after_over_before": ratios}


def markdown(result: dict) -> str:
    s, r = result["summary"]["settings"], result["summary"]["after_over_before"]
    m = result["machine"]
    lines = [f"Machine: {m['cores']} cores (affinity {m['affinity']}), background load {result['load']} busy-loop "
             f"processes; load average seen {m['load_average_seen'][0]:.1f}–{m['load_average_seen'][1]:.1f} "
             f"(other users of the machine included); {result['rounds']} rounds × {result['steps']} steps.", "",
             "| setting | threads | idle step (median, min–max) | loaded step (median, min–max) | slowdown |",
             "|---|---|---|---|---|"]
    for name, row in s.items():
        lines.append(f"| {name} | {row['threads']} | {row['idle_s']:.2f} s ({row['idle_range'][0]:.2f}–"
                     f"{row['idle_range'][1]:.2f}) | {row['load_s']:.2f} s ({row['load_range'][0]:.2f}–"
                     f"{row['load_range'][1]:.2f}) | {row['slowdown']:.2f}× |")
    lines += ["", "after / before step time, median of per-round ratios [IQR]: "
              f"idle {r['idle']['median']:.3f} [{r['idle']['iqr'][0]:.3f}, {r['idle']['iqr'][1]:.3f}], "
              f"loaded {r['load']['median']:.3f} [{r['load']['iqr'][0]:.3f}, {r['load']['iqr'][1]:.3f}]"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2 has 30)")
    p.add_argument("--settings", default="before,after", help=f"comma-separated, the first two compared: "
                   f"{', '.join(SETTINGS)}")
    p.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy-loop processes in the loaded blocks")
    p.add_argument("--timeout", type=int, default=600, help="seconds one setting's process may take")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 1 step, 2 layers")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.layers = 1, 1, 2
    args.settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    bad = [x for x in args.settings if x not in SETTINGS]
    if bad or args.settings[:2] != ["before", "after"]:
        p.error(f"--settings is {args.settings}; expected before,after then any of {', '.join(SETTINGS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.steps, args.layers)))
        return 0
    from launch.threads import affinity_cores

    measured = measure(args)
    result = {"command": " ".join(sys.argv), "rounds": args.rounds, "steps": args.steps, "layers": args.layers,
              "load": args.load, "machine": {"cores": os.cpu_count(), "affinity": affinity_cores(),
                                             "load_average_seen": measured["load_average_seen"]},
              "samples": measured["samples"], "summary": summarise(measured["samples"])}
    print(markdown(result))
    _save(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
