"""Training-step time and peak memory of sspeft's adapters against PEFT's LoRA-r8 and PEFT's spectral tuners.

    python benchmarks/adapter_speed.py                                   # the CPU tables of docs/speed.md
    python benchmarks/adapter_speed.py --device cuda --dtype bf16 --shape 8b   # on a GPU: 8B-shaped layers
    python benchmarks/adapter_speed.py --quick                           # a smoke run (few steps, small loads)

A benchmark, not a test. Model: LlamaForCausalLM with random weights (seeded, identical for every method), q_proj and
v_proj adapted, AdamW, `--threads` CPU threads. Per token load and gradient-checkpointing setting, every method gets
`--warmup` untimed steps, then `--steps` timed steps with the methods interleaved (one step each per round, the
order rotated every round), so load drift on a shared machine hits all methods alike. Reported: median step time,
min–max, and the median of the per-round ratios to LoRA-r8 (with their interquartile range), in wall time and in
process CPU time (less sensitive to other processes on a shared machine). Peak memory above the
loaded model is measured per method in a process of its own (ru_maxrss never falls inside one process; on CUDA the
allocator's peak). Results go to a JSON file (`--json`) and, with `--markdown`, to a Markdown report.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from launch.rundir import atomic_write_text
from sspeft import METHODS as SSPEFT_METHODS
from timing import quartiles  # benchmarks/ is on sys.path when this file runs

SHAPES = {
    # the CPU benchmark model: hidden 2048, 2 layers, MHA, small vocabulary
    "bench": dict(hidden_size=2048, intermediate_size=5504, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=2048, num_hidden_layers=2),
    # LLaMA-3-8B layer shapes (q 4096×4096, v 1024×4096 with 8 KV heads), a short stack
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=2048, num_hidden_layers=4),
}
# tokens per step → (batch, sequence length)
LOADS = {2048: (4, 512), 512: (2, 256), 8192: (8, 1024), 128: (2, 64)}
TARGETS = ["q_proj", "v_proj"]
METHODS = ["lora-r8", *SSPEFT_METHODS, "peft-fourierft", "peft-waveft", "peft-shira"]
EXTRA_METHODS = ["waveft-periodic"]  # accepted by --methods, not run by default
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------- models
def build_base(shape: str, dtype: torch.dtype, device: str, seed: int, quant4: bool = False, layers=None):
    """The seeded random LLaMA (or its NF4-quantised copy, saved and reloaded through bitsandbytes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cpu" if quant4 else device):  # build on the GPU directly: 8B-shaped layers init fast there
        model = LlamaForCausalLM(config).to(dtype)
    if not quant4:
        return model
    from transformers import BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                   bnb_4bit_quant_storage=torch.uint8)
        model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype,
                                                 device_map=device if device != "cpu" else "cpu")
    import sspeft

    sspeft.prepare_4bit(model)
    return model


def adapt(model, method: str, n: int):
    """Attach ``method``'s adapter to q_proj and v_proj; returns the trainable model."""
    import peft
    import sspeft

    if method == "lora-r8":
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
        return peft.get_peft_model(model, cfg)
    if method == "peft-fourierft":
        return peft.get_peft_model(model, peft.FourierFTConfig(n_frequency=n, scaling=300.0, target_modules=TARGETS))
    if method == "peft-waveft":
        return peft.get_peft_model(model, peft.WaveFTConfig(n_frequency=n, target_modules=TARGETS))
    if method == "peft-shira":
        return peft.get_peft_model(model, peft.ShiraConfig(r=8, target_modules=TARGETS))
    name, _, path = method.partition(":")  # e.g. "ssh:reference" forces an execution path
    extra = {"path": path} if path else {}
    if name == "waveft-periodic":  # the periodised construction (sspeft/wavelets.py)
        name, extra = "waveft", dict(extra, construction="periodic")
    if name == "shira":
        cfg = sspeft.SpectralConfig(method="shira", r=8, target_modules=TARGETS, **extra)
    else:
        cfg = sspeft.SpectralConfig(method=name, n=n, target_modules=TARGETS, **extra)
    return sspeft.inject(model, cfg)


class Bench:
    """One method's model, optimizer and batch."""

    def __init__(self, method: str, args, tokens: int, checkpointing: bool, quant4: bool = False) -> None:
        self.method = method
        self.device = args.device
        dtype = DTYPES[args.dtype]
        model = build_base(args.shape, dtype, args.device, args.seed, quant4, args.layers)
        self.model = adapt(model, method, args.n_for(method))
        self.model.train()
        if checkpointing:
            self.model.gradient_checkpointing_enable()  # transformers' default (non-reentrant), as TRL runs it
            self.model.enable_input_require_grads()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        batch, seq = LOADS[tokens]
        g = torch.Generator().manual_seed(args.seed + tokens)
        vocab = SHAPES[args.shape]["vocab_size"]
        self.ids = torch.randint(vocab, (batch, seq), generator=g).to(args.device)

    def step(self) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one optimizer step."""
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.method}: non-finite loss {loss.item()}")
        return time.perf_counter() - start, time.process_time() - cpu_start


# ---------------------------------------------------------------------------------------------------- timing
def time_methods(methods: list[str], args, tokens: int, checkpointing: bool, quant4: bool = False) -> dict:
    """Interleaved timing of ``methods`` (the first is the reference for the ratios)."""
    benches = []
    failures = {}
    for method in methods:
        try:
            benches.append(Bench(method, args, tokens, checkpointing, quant4))
        except Exception as exc:  # an unsupported peer (e.g. a PEFT tuner on a 4-bit base) is reported, not hidden
            failures[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            print(f"  {method}: not run ({failures[method]})", flush=True)
    for bench in benches:
        for _ in range(args.warmup):
            bench.step()
    times: dict[str, list[float]] = {b.method: [] for b in benches}
    cpu: dict[str, list[float]] = {b.method: [] for b in benches}
    for round_ in range(args.steps):
        shift = round_ % len(benches)
        for bench in benches[shift:] + benches[:shift]:
            wall, used = bench.step()
            times[bench.method].append(wall)
            cpu[bench.method].append(used)
        print(f"  round {round_ + 1}/{args.steps}: " + ", ".join(f"{m} {t[-1]:.2f}s" for m, t in times.items()),
              flush=True)
    rows = {}
    for bench in benches:
        t = times[bench.method]
        row = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "trainable": bench.trainable,
               "wall_s": t, "cpu_s": cpu[bench.method]}
        if methods[0] in times:
            # paired per round: a step is compared with the reference's step of the same round
            ratios = [a / b for a, b in zip(t, times[methods[0]])]
            row["ratio"] = statistics.median(ratios)
            row["ratio_q1"], row["ratio_q3"] = quartiles(ratios)
            cpu_ratios = [a / b for a, b in zip(cpu[bench.method], cpu[methods[0]])]
            row["cpu_ratio"] = statistics.median(cpu_ratios)
            row["cpu_ratio_q1"], row["cpu_ratio_q3"] = quartiles(cpu_ratios)
        row["paths"] = _paths_used(bench.model)
        rows[bench.method] = row
    del benches
    gc.collect()
    return {"rows": rows, "failures": failures}


def _paths_used(model) -> str:
    import sspeft
    from sspeft import forward

    used = sorted({p for layer in sspeft.adapted_layers(model).values() for p in forward.last_paths(layer).values()})
    return ",".join(used)


# ---------------------------------------------------------------------------------------------------- memory
def probe(args) -> dict:
    """Run in a fresh process: peak memory of a few steps above the loaded, adapted model."""
    tokens, checkpointing = args.probe_tokens, args.probe_checkpointing == "on"
    if args.device == "cuda":
        bench = Bench(args.probe, args, tokens, checkpointing, args.probe_quant4)
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # the first step allocates AdamW's state; the second is steady
            bench.step()
        return {"loaded_mb": loaded / 2**20, "above_mb": (torch.cuda.max_memory_allocated() - loaded) / 2**20}
    bench = Bench(args.probe, args, tokens, checkpointing, args.probe_quant4)
    gc.collect()
    _malloc_trim()
    loaded = _status_kib("VmRSS") * 1024
    # Building the model peaks far above a training step; reset the high-water mark (VmHWM, which ru_maxrss reads
    # too) so the peak below belongs to the steps alone.
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(2):  # the first step allocates AdamW's state; the second is steady
        bench.step()
    peak = _status_kib("VmHWM") * 1024
    return {"loaded_mb": loaded / 2**20, "above_mb": (peak - loaded) / 2**20,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS so the loaded RSS is not inflated by construction garbage."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_memory(methods: list[str], args, tokens: int, checkpointing: bool, quant4: bool = False) -> dict:
    out = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--probe", method, "--probe-tokens", str(tokens),
               "--probe-checkpointing", "on" if checkpointing else "off", "--device", args.device,
               "--dtype", args.dtype, "--shape", args.shape, "--threads", str(args.threads), "--seed", str(args.seed),
               "--n", str(args.n)] + (["--probe-quant4"] if quant4 else [])
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        if args.n_ssh is not None:
            cmd += ["--n-ssh", str(args.n_ssh)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            out[method] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        else:
            out[method] = json.loads(lines[-1])
        print(f"  memory {method}: {out[method]}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- report
def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": _cpu_name(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("transformers", "peft", "bitsandbytes"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(results: dict) -> str:
    lines = []
    for table in results["tables"]:
        title = table["title"]
        lines += [f"### {title}", "", "| method | path | step time (median, min–max) | × LoRA-r8 wall (median, IQR) | "
                  "× LoRA-r8 CPU time (median, IQR) | peak memory above model |", "|---|---|---|---|---|---|"]
        mem = table.get("memory", {})
        rows = table.get("rows", {})
        for method in list(rows) + [m for m in mem if m not in rows]:
            row = rows.get(method, {"median_s": float("nan"), "min_s": float("nan"), "max_s": float("nan"), "paths": "–"})
            m = mem.get(method, {})
            mem_s = f"{m['above_mb']:.0f} MiB" if "above_mb" in m else m.get("error", "–")
            ratio = f"{row['ratio']:.3f} ({row['ratio_q1']:.3f}–{row['ratio_q3']:.3f})" if "ratio" in row else "–"
            cpu = (f"{row['cpu_ratio']:.3f} ({row['cpu_ratio_q1']:.3f}–{row['cpu_ratio_q3']:.3f})"
                   if "cpu_ratio" in row else "–")
            lines.append(f"| {method} | {row['paths'] or 'peft'} | {row['median_s']:.2f} s ({row['min_s']:.2f}–"
                         f"{row['max_s']:.2f}) | {ratio} | {cpu} | {mem_s} |")
        for method, why in table.get("failures", {}).items():
            lines.append(f"| {method} | not run: {why} | | | | |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    p.add_argument("--tokens", default=None, help="comma-separated tokens per step (default 2048,512; 8b: 8192,2048)")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to time")
    p.add_argument("--methods", default=",".join(METHODS), help="first one is the ratio reference")
    p.add_argument("--memory-methods", default=None, help="methods whose peak memory is probed (default: all)")
    p.add_argument("--memory-tokens", type=int, default=None, help="token load of the memory probes (default: max)")
    p.add_argument("--quant4-methods", default="lora-r8,ssh,lfma,fourierft,waveft,shira,peft-fourierft")
    p.add_argument("--quant4-tokens", type=int, default=512)
    p.add_argument("--no-quant4", action="store_true", help="skip the 4-bit table")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--only-memory", action="store_true", help="run the memory probes of the chosen loads, no timing")
    p.add_argument("--n", type=int, default=1000, help="positions per layer (ssh, lfma, fourierft, waveft, PEFT peers)")
    p.add_argument("--n-ssh", type=int, default=None, help="SSH's n if different (8b shape: 750)")
    p.add_argument("--layers", type=int, default=None, help="override the shape's number of decoder layers")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 steps, 1 warm-up, 128 tokens, no memory or 4-bit table")
    p.add_argument("--json", default="benchmarks/adapter_speed.json")
    p.add_argument("--markdown", default=None, help="also write the tables to this Markdown file")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-tokens", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--probe-checkpointing", default="off", help=argparse.SUPPRESS)
    p.add_argument("--probe-quant4", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.tokens, args.no_memory, args.no_quant4 = 2, 1, "128", True, True
    if args.tokens is None:
        args.tokens = "8192,2048" if args.shape == "8b" else "2048,512"
    if args.n_ssh is None and args.shape == "8b":
        args.n_ssh = 750
    for t in args.tokens.split(","):
        if int(t) not in LOADS:
            p.error(f"--tokens {t}: known loads are {sorted(LOADS)} (batch × sequence in LOADS)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    unknown = [m for m in args.methods.split(",") if m.partition(":")[0] not in METHODS + EXTRA_METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {METHODS + EXTRA_METHODS} (sspeft methods accept ':path', e.g. ssh:reference)")
    args.n_for = lambda method: args.n_ssh if (method.startswith("ssh") and args.n_ssh) else args.n
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(args)), flush=True)
        return 0
    methods = args.methods.split(",")
    results = {"machine": machine(), "command": " ".join([Path(sys.executable).name] + sys.argv),
               "settings": {k: v for k, v in vars(args).items() if k != "n_for"}, "tables": []}
    started = time.time()
    loads = [int(t) for t in args.tokens.split(",")]
    for checkpointing in [c == "on" for c in args.checkpointing.split(",")]:
        for tokens in loads:
            title = (f"{tokens} tokens/step ({LOADS[tokens][0]}×{LOADS[tokens][1]}), {args.dtype}, gradient "
                     f"checkpointing {'on' if checkpointing else 'off'}")
            print(f"== {title}", flush=True)
            table = {"title": title, "tokens": tokens, "checkpointing": checkpointing, "quant4": False}
            if not args.only_memory:
                table.update(time_methods(methods, args, tokens, checkpointing))
            if not args.no_memory and tokens == (args.memory_tokens or max(loads)):
                mem_methods = (args.memory_methods or args.methods).split(",")
                table["memory"] = measure_memory(mem_methods, args, tokens, checkpointing)
            results["tables"].append(table)
            _write(results, args)
    if not args.no_quant4 and args.device == "cpu":
        q_methods = args.quant4_methods.split(",")
        title = f"NF4 4-bit base, {args.quant4_tokens} tokens/step, gradient checkpointing off"
        print(f"== {title}", flush=True)
        table = {"title": title, "tokens": args.quant4_tokens, "checkpointing": False, "quant4": True}
        table.update(time_methods(q_methods, args, args.quant4_tokens, False, quant4=True))
        results["tables"].append(table)
    results["elapsed_s"] = time.time() - started
    _write(results, args)
    print(markdown(results))
    return 0


def _write(results: dict, args) -> None:
    atomic_write_text(args.json, json.dumps(results, indent=2, default=str))
    if args.markdown:
        atomic_write_text(args.markdown, markdown(results))


if __name__ == "__main__":
    sys.exit(main())
