"""One command that says whether sspeft works on a device and how fast it trains there.

    python benchmarks/gpu_check.py --device cuda --out DIR     # LLaMA-8B-shaped layers, within --time-budget 300 s
    python benchmarks/gpu_check.py --device cpu --small --out DIR   # the same code paths at small shapes (< 1 min)

On a lent GPU machine (nothing but torch, transformers, peft, safetensors and this repository needed; imports and
start-up come on top of the budget, so allow the command about 7 minutes):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --device cuda --out $OUT --time-budget 300

Sections, in order of priority, each with a share of ``--time-budget`` (a case that finds its section's time spent
is recorded as "not run: time budget" and the run goes on):

1. correctness: every method × every execution path (sspeft.config.PATHS, forced through ``SpectralConfig.path``)
   against the reference path, fp32 and bf16, on the q (4096×4096) and v (1024×4096) layers of LLaMA-3-8B: max
   relative error (max |a − b| / max |b|) of the output, the input gradient and the coefficient gradient. Above
   ``BOUNDS[dtype]`` a case FAILs. Also: injecting directly on the device works and picks the positions the CPU
   picks, and a merged model (sspeft.merge_and_unload) gives the adapted model's logits.
2. speed: training-step time (forward + backward + AdamW) of a 2-decoder-layer LLaMA-8B-shaped model (vocabulary
   reduced to 2048: the real 128k-token head would dilute every adapter's overhead), bf16, q_proj and v_proj adapted,
   at 2048 and 8192 tokens/step: PEFT LoRA-r8 (the reference), PEFT's FourierFT, WaveFT and SHiRA, and sspeft's five
   methods at their default budgets (path chosen by the cost model). Configs run in interleaved rounds (one step
   each per round, order rotated); reported: median of the per-round ratios to LoRA-r8 with IQR and min–max, and
   the peak memory of one step (resident model + optimizer + plans, and the step's peak above that).
3. merged inference: forward time of each merged sspeft model against the base model, interleaved.
4. paths: the step time of every sspeft method on every forced path (the data behind the cost model's constants).
5. 4-bit: the correctness table on NF4 bitsandbytes bases (skipped, and said so, without bitsandbytes).

Writes DIR/gpu_check.json (machine, versions, settings, every figure, every raw step time) and DIR/gpu_check.md
(the tables, benchmarks/gpu_check_report.py) after every section, so an interrupted run still leaves its figures. Exit status: 1 when a correctness
check FAILs or a section raises, 3 when checks were left unrun by the time budget, 0 when every check ran and
passed. Speed targets are reported as PASS/MISS and do not change the exit status.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: the repository's own sspeft, not an installed copy
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sspeft  # noqa: E402
from benchmarks.gpu_check_report import markdown  # noqa: E402
from benchmarks.timing import quartiles  # noqa: E402
from launch.rundir import atomic_write_json, atomic_write_text  # noqa: E402
from sspeft import forward as sspeft_forward  # noqa: E402
from sspeft.config import METHOD_DEFAULTS, METHODS, PATHS  # noqa: E402

# Max relative error against the reference path. fp32: both sides round in fp32 (FFTs of up to 4096 points,
# 4096-long dot products); bf16: the reference rounds base(x) + x·ΔWᵀ, the merged path rounds W0 + ΔW once, each to
# a few bf16 ulps (2⁻⁸) of the largest value.
BOUNDS = {"fp32": 1e-4, "bf16": 3e-2}
# Logits of a merged model against the adapted one: two decoder layers and a head compound the rounding.
MERGE_BOUNDS = {"fp32": 1e-4, "bf16": 5e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = ["q_proj", "v_proj"]
LORA = "lora-r8"
# speed targets: step time ≤ ratio × LoRA-r8 (median of per-round ratios); memory ≤ LoRA-r8 + 5 %
TIME_TARGETS = {"ssh": 1.10, "lfma": 1.10, "fourierft": 1.10, "waveft": 1.05, "shira": 1.05}
MEMORY_TARGET = 1.05
INFERENCE_TARGET = 1.05  # merged forward ≤ 1.05 × the base model's (the same kernels: spread only)
# Section shares of --time-budget, in running order; unused time passes on to the next section.
SHARES = {"correctness": 0.30, "speed": 0.30, "merged_inference": 0.13, "paths": 0.17, "quant4": 0.10}


@dataclass
class Profile:
    """Shapes and repetition counts of one run."""

    layers: dict[str, tuple[int, int]]  # correctness layers, (out, in)
    tokens: int  # tokens per correctness forward
    model: dict  # LlamaConfig fields of the speed model
    loads: dict[int, tuple[int, int]]  # tokens/step → (batch, sequence)
    warmup: int
    rounds: int
    sweep_rounds: int
    infer_rounds: int


PROFILES = {
    "full": Profile(
        layers={"q_proj": (4096, 4096), "v_proj": (1024, 4096)}, tokens=1024,
        model=dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=2048, num_hidden_layers=2),
        loads={2048: (4, 512), 8192: (8, 1024)}, warmup=3, rounds=20, sweep_rounds=8, infer_rounds=20),
    # the same structure at small sizes (kv heads ¼ of the heads, v 4× narrower than q), for CPUs and tests
    "small": Profile(
        layers={"q_proj": (128, 128), "v_proj": (32, 128)}, tokens=16,
        model=dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=1,
                   vocab_size=128, num_hidden_layers=2),
        loads={64: (2, 32), 256: (4, 64)}, warmup=1, rounds=2, sweep_rounds=1, infer_rounds=2),
}


# ---------------------------------------------------------------------------------------------------- device helpers
class Device:
    """Timing and memory on CUDA (events, the caching allocator's counters) or on CPU (wall clock, process RSS)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cuda = name == "cuda"

    def timed(self, fn) -> float:
        """Seconds ``fn()`` takes on the device (CUDA events around it, after draining earlier work)."""
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def allocated(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        return _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


class Budget:
    """Cumulative section deadlines: section i must end by start + (share₀ + … + shareᵢ) × total."""

    def __init__(self, total_s: float) -> None:
        self.start = time.monotonic()
        self.ends, acc = {}, 0.0
        for name, share in SHARES.items():
            acc += share
            self.ends[name] = acc * total_s

    def left(self, section: str) -> float:
        return self.start + self.ends[section] - time.monotonic()


NOT_RUN = "not run: time budget"


# ---------------------------------------------------------------------------------------------------- comparison
def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, in fp32 (inf for a non-finite value on either side)."""
    a, b = actual.detach().float(), expected.detach().float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def judge(errors: dict[str, float], bound: float) -> str:
    """PASS when every error is finite and within ``bound``; FAIL otherwise (never a quiet pass on NaN)."""
    ok = all(math.isfinite(e) and e <= bound for e in errors.values())
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------------- adapters
def budget_config(method: str, **extra) -> sspeft.SpectralConfig:
    """sspeft's config at the papers' budgets: the library defaults (SSH n=750, LFMA n=500, FourierFT and WaveFT
    n=1000), SHiRA at r=8, LoRA-r8's parameter count."""
    size = {"r": 8} if method == "shira" else {"n": METHOD_DEFAULTS[method]["n"]}
    return sspeft.SpectralConfig(method=method, target_modules=list(extra.pop("targets", TARGETS)), seed=0,
                                 **size, **extra)


def forced_paths(method: str) -> list[str]:
    """The paths a method can be forced onto, as the library's own config validation decides."""
    out = []
    for path in PATHS:
        if path in ("auto", "reference"):
            continue
        try:
            sspeft.SpectralConfig(method=method, path=path)
        except ValueError:
            continue
        out.append(path)
    return out


def set_path(model: nn.Module, path: str) -> None:
    for layer in sspeft.adapted_layers(model).values():
        for cfg in layer.sspeft_config.values():
            cfg.path = path


def used_paths(model: nn.Module) -> str:
    seen = {p for layer in sspeft.adapted_layers(model).values() for p in sspeft_forward.last_paths(layer).values()}
    return ",".join(sorted(seen))


def randomize(layer, seed: int, size: float = 0.5) -> None:
    """Random coefficients scaled so ‖ΔW‖ = size · ‖W0‖ (ΔW is linear in them): the adapter's share of every
    output is large enough for a wrong path to show."""
    with torch.no_grad():
        coeff = layer.coefficients
        g = torch.Generator().manual_seed(seed)
        coeff.copy_(torch.randn(coeff.shape, generator=g).to(coeff.device))
        base = sspeft.weights.dense_weight(layer.base_layer).norm()
        coeff.mul_(size * base / layer.delta_weight().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------- 1. correctness
class One(nn.Module):
    """A single named Linear, so an adapter config's target_modules finds it."""

    def __init__(self, name: str, out_features: int, in_features: int, device=None) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, nn.Linear(in_features, out_features, bias=False, device=device))

    def forward(self, x):
        return getattr(self, self.name)(x)


def adapted_layer(name: str, shape: tuple[int, int], method: str, seed: int, device=None):
    torch.manual_seed(seed)
    module = One(name, *shape, device=device)
    sspeft.inject(module, budget_config(method, targets=[name]))
    return module, sspeft.adapted_layers(module)[name]


def run_path(module, layer, path: str, x: torch.Tensor, g: torch.Tensor):
    """(output, input grad, coefficient grad, path used) of one forward/backward on ``path``."""
    set_path(module, path)
    x = x.detach().clone().requires_grad_(True)
    layer.coefficients.grad = None
    y = module(x)
    (y.float() * g).sum().backward()
    return y.detach(), x.grad.detach(), layer.coefficients.grad.detach().clone(), used_paths(module)


def compare_paths(module, layer, x, g, methods_paths: list[str], bound: float) -> list[dict]:
    """Every path of ``methods_paths`` against the reference on one adapted layer and one input."""
    ref = run_path(module, layer, "reference", x, g)
    rows = []
    for path in methods_paths:
        got = run_path(module, layer, path, x, g)
        errors = {what: rel_error(a, b) for what, a, b in
                  zip(("output", "input_grad", "coeff_grad"), got[:3], ref[:3])}
        status = judge(errors, bound)
        if got[3] != path:
            status = "FAIL"  # the forced path was not taken: nothing about it was checked
        rows.append(dict(path=path, path_used=got[3], **errors, bound=bound, status=status))
    return rows


def correctness(ctx) -> None:
    out = ctx.results.setdefault("correctness", {"cases": [], "inject_on_device": []})
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 (no TF32) for the bound above
    for layer_name, shape in ctx.profile.layers.items():
        for method in METHODS:
            head = dict(layer=layer_name, shape=list(shape), method=method)
            cases = [dict(head, dtype=dt, path=p) for dt in DTYPES for p in forced_paths(method)]
            if ctx.budget.left("correctness") <= 0:
                out["cases"] += [dict(c, status=NOT_RUN) for c in cases]
                continue
            try:
                cpu_layer = check_method(ctx, layer_name, shape, method, out["cases"])
            except Exception as exc:  # recorded against every case of the method that has no row yet
                done = {(c["dtype"], c["path"]) for c in out["cases"] if c["layer"] == layer_name and
                        c["method"] == method}
                out["cases"] += [dict(c, status="FAIL", error=_one_line(exc)) for c in cases
                                 if (c["dtype"], c["path"]) not in done]
                continue
            if layer_name == "v_proj":
                out["inject_on_device"].append(inject_on_device(ctx, layer_name, shape, method, cpu_layer))
            ctx.write()
            mine = [c for c in out["cases"] if c["layer"] == layer_name and c["method"] == method]
            print(f"  {layer_name} {method}: " + ", ".join(f"{c['dtype']} {c['path']} {c['status']}" for c in mine),
                  flush=True)


def check_method(ctx, layer_name: str, shape, method: str, rows: list[dict]):
    """Every path of one method on one layer shape, fp32 and bf16 (rows appended as they come); returns the CPU
    layer the adapter was injected on. Positions are chosen on CPU and the layer then moved, the way the speed
    models are built."""
    prof, dev = ctx.profile, ctx.device
    cpu_module, cpu_layer = adapted_layer(layer_name, shape, method, ctx.seed)
    randomize(cpu_layer, ctx.seed)
    for dtype in DTYPES:
        module = copy.deepcopy(cpu_module).to(dev.name)
        layer = sspeft.adapted_layers(module)[layer_name]
        layer.base_layer.to(DTYPES[dtype])  # the coefficients stay fp32, as in training
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        x = torch.randn(prof.tokens, shape[1], generator=gen).to(dev.name, DTYPES[dtype])
        g = torch.randn(prof.tokens, shape[0], generator=gen).to(dev.name)
        for row in compare_paths(module, layer, x, g, forced_paths(method), BOUNDS[dtype]):
            rows.append(dict(layer=layer_name, shape=list(shape), method=method, dtype=dtype, **row))
    return cpu_layer


def inject_on_device(ctx, name: str, shape, method: str, cpu_layer) -> dict:
    """Attach the adapter to a layer that already lives on the device: must work and pick the CPU's positions."""
    row = dict(layer=name, shape=list(shape), method=method)
    try:
        _, layer = adapted_layer(name, shape, method, ctx.seed, device=ctx.device.name)
    except Exception as exc:  # the failure is the finding: recorded as FAIL with its message
        return dict(row, status="FAIL", error=_one_line(exc))
    on_device, on_cpu = (set(map(tuple, p.t().tolist())) for p in (layer.positions.cpu(), cpu_layer.positions))
    same = len(on_device & on_cpu) / max(len(on_cpu), 1)
    # SSH and LFMA rank spectral energies: a device FFT may break near-ties differently, so a few positions may
    # differ; the seeded random methods must pick the very same set.
    random_only = method in ("fourierft", "waveft", "shira")
    status = "PASS" if same == 1.0 or (not random_only and same >= 0.99) else "FAIL"
    return dict(row, status=status, same_positions=same)


def merge_check(ctx, model, method: str, ids: torch.Tensor) -> tuple[dict, nn.Module]:
    """Logits of ``model`` (adapted, reference path) against the same model after sspeft.merge_and_unload."""
    for layer in sspeft.adapted_layers(model).values():
        randomize(layer, ctx.seed)
    set_path(model, "reference")
    with torch.no_grad():
        adapted = model(input_ids=ids).logits.float()
        merged = sspeft.merge_and_unload(model)
        logits = merged(input_ids=ids).logits.float()
    error, bound = rel_error(logits, adapted), MERGE_BOUNDS[ctx.args.speed_dtype]
    return dict(method=method, logits_error=error, bound=bound, status=judge({"e": error}, bound)), merged


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# ---------------------------------------------------------------------------------------------------- 2. speed models
def base_model(profile: Profile, seed: int, dtype: str):
    """The seeded random LLaMA on CPU; every config starts from a copy of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**profile.model, max_position_embeddings=max(s for _, s in profile.loads.values()),
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(DTYPES[dtype])


def peers() -> dict[str, object]:
    """{config: PEFT config class or the reason it is missing} for LoRA-r8 and PEFT's spectral tuners."""
    import peft

    found = {}
    for name, cls in ((LORA, "LoraConfig"), ("peft-fourierft", "FourierFTConfig"), ("peft-waveft", "WaveFTConfig"),
                      ("peft-shira", "ShiraConfig")):
        found[name] = getattr(peft, cls, None) or f"peft {peft.__version__} has no {cls}"
    return found


def adapt(name: str, model: nn.Module, peer_classes: dict) -> nn.Module:
    """Attach config ``name`` to the CPU ``model`` (moved to the device afterwards: every machine then times
    adapters at the very same positions; injecting on the device is a check of the correctness section)."""
    import peft

    if name in METHODS:
        return sspeft.inject(model, budget_config(name))
    cls = peer_classes[name]
    if isinstance(cls, str):
        raise RuntimeError(cls)
    kwargs = {
        LORA: dict(r=8, lora_alpha=16, lora_dropout=0.0),
        "peft-fourierft": dict(n_frequency=METHOD_DEFAULTS["fourierft"]["n"], scaling=300.0),
        "peft-waveft": dict(n_frequency=METHOD_DEFAULTS["waveft"]["n"]),
        "peft-shira": dict(r=8),
    }[name]
    return peft.get_peft_model(model, cls(target_modules=TARGETS, **kwargs))


@dataclass
class Trainee:
    """One config's model and optimizer on the device; ``path`` forces an sspeft path before each step."""

    name: str
    model: nn.Module
    device: Device
    path: str | None = None
    resident: int = 0
    opt: torch.optim.Optimizer | None = None
    trainable: int = 0
    used: str = "peft"

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)

    def step(self, ids: torch.Tensor) -> float:
        if self.path is not None:
            set_path(self.model, self.path)
        box = {}

        def work():
            loss = self.model(input_ids=ids, labels=ids).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            box["loss"] = loss.detach()

        seconds = self.device.timed(work)
        if self.name.partition(":")[0] in METHODS:  # read now: trainees of the path sweep share one model
            self.used = used_paths(self.model)
        if not torch.isfinite(box["loss"]):
            raise RuntimeError(f"{self.name}: non-finite loss {box['loss'].item()}")
        return seconds


def build_trainees(ctx, names: list[str], section: str) -> tuple[list[Trainee], dict[str, str]]:
    """A Trainee per config (copy of the CPU base, adapted, moved); failures and budget cuts come back as reasons."""
    built, skipped = [], {}
    peer_classes = peers()
    for name in names:
        if ctx.budget.left(section) <= 0:
            skipped[name] = NOT_RUN
            continue
        try:
            model = adapt(name, copy.deepcopy(ctx.base_cpu), peer_classes).to(ctx.device.name)
            model.train()
            trainee = Trainee(name, model, ctx.device)
        except Exception as exc:  # a peer missing from this PEFT, or failing on these shapes: reported, not hidden
            skipped[name] = "not run: " + _one_line(exc)
            if name in METHODS:  # sspeft's own methods must build: a failure of the run
                ctx.failures.append(f"{section}: building {name}: {_one_line(exc)}")
            continue
        trainee.resident = tensor_bytes(model)
        built.append(trainee)
    return built, skipped


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (exact on any device, unlike a process's RSS)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------------------------------------------- 2. timing
def interleaved(trainees: list, run, rounds: int, deadline, failures: dict[str, str]) -> dict[str, list[float]]:
    """``rounds`` rounds of one ``run(trainee)`` each, order rotated per round; stops early when ``deadline()`` ≤ 0
    (the rounds done so far are kept). A config that raises leaves the rounds, its reason in ``failures``.
    Returns {name: [seconds per round]}: entry i of every list belongs to round i."""
    times: dict[str, list[float]] = {t.name: [] for t in trainees}
    active = list(trainees)
    for round_ in range(rounds):
        if not active or (round_ and deadline() <= 0):
            break
        shift = round_ % len(active)
        for t in active[shift:] + active[:shift]:
            try:
                times[t.name].append(run(t))
            except Exception as exc:  # e.g. out of memory at the larger load: the others go on
                failures[t.name] = _one_line(exc)
                active.remove(t)
    return {name: t for name, t in times.items() if t}


def summarize(times: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Median, min, max per config and the per-round ratios to ``reference`` (median, IQR, min–max)."""
    rows = {}
    for name, t in times.items():
        row = dict(median_s=statistics.median(t), min_s=min(t), max_s=max(t), rounds=len(t), times_s=t)
        if reference in times:
            ratios = [a / b for a, b in zip(t, times[reference])]
            q1, q3 = quartiles(ratios)
            row.update(ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3, ratio_min=min(ratios),
                       ratio_max=max(ratios))
        rows[name] = row
    return rows


def measured_step(trainee: Trainee, ids: torch.Tensor, peaks: dict[str, list[int]]) -> float:
    """One timed step; its peak memory above everything resident before it is appended to ``peaks``. (CUDA's
    allocator counts on the host as kernels are queued: reading it costs no synchronisation.)"""
    dev = trainee.device
    before = dev.allocated()
    dev.reset_peak()
    seconds = trainee.step(ids)
    peaks.setdefault(trainee.name, []).append(max(dev.peak() - before, 0))
    return seconds


def memory_row(trainee: Trainee, peaks: list[int]) -> dict:
    """Resident bytes (model, optimizer state, plans) and the largest step peak above them, in MiB."""
    above = max(peaks)
    return dict(resident_mib=trainee.resident / 2**20, step_peak_mib=above / 2**20,
                total_mib=(trainee.resident + above) / 2**20)


def warm(ctx, trainees: list[Trainee], ids: torch.Tensor, table: dict, section: str) -> list[Trainee]:
    """Warm-up steps (plans, FFT plans, AdamW state, allocator pools); the configs that ran them come back."""
    live = []
    for t in trainees:
        if ctx.budget.left(section) <= 0:
            table["failures"][t.name] = NOT_RUN
            continue
        try:
            before = ctx.device.allocated()
            for _ in range(ctx.profile.warmup):
                t.step(ids)
            t.resident += max(ctx.device.allocated() - before, 0)  # what stays: AdamW state, plans
            live.append(t)
        except Exception as exc:
            table["failures"][t.name] = _one_line(exc)
            ctx.failures.append(f"{section} {table['tokens']} tokens {t.name}: {_one_line(exc)}")
    return live


def time_load(ctx, trainees: list[Trainee], tokens: int, rounds: int, section: str) -> dict:
    batch, seq = ctx.profile.loads[tokens]
    gen = torch.Generator().manual_seed(ctx.seed + tokens)
    ids = torch.randint(ctx.profile.model["vocab_size"], (batch, seq), generator=gen).to(ctx.device.name)
    table = dict(tokens=tokens, batch=batch, sequence=seq, rows={}, failures={})
    live = warm(ctx, trainees, ids, table, section)
    if not live:
        table["status"] = "no config ran"
        return table
    peaks: dict[str, list[int]] = {}
    broke: dict[str, str] = {}
    times = interleaved(live, lambda t: measured_step(t, ids, peaks), rounds, lambda: ctx.budget.left(section), broke)
    table["failures"].update(broke)
    ctx.failures += [f"{section} {tokens} tokens {n}: {why}" for n, why in broke.items()]
    table["rows"] = summarize(times, LORA)
    for t in (t for t in live if t.name in times):
        row = table["rows"][t.name]
        row.update(trainable=t.trainable, path=t.used, memory=memory_row(t, peaks[t.name]))
    print(f"  {section} {tokens} tokens: " + ", ".join(f"{n} {r.get('ratio', math.nan):.3f}"
                                                    for n, r in table["rows"].items()), flush=True)
    done = min((r["rounds"] for r in table["rows"].values()), default=0)
    table["status"] = "done" if done == rounds and not broke else f"partial: {done} of {rounds} rounds"
    return table


def speed(ctx) -> None:
    names = [LORA, "peft-fourierft", "peft-waveft", "peft-shira", *METHODS]
    trainees, skipped = build_trainees(ctx, names, "speed")
    out = ctx.results.setdefault("speed", {"loads": {}, "skipped": skipped})
    for tokens in ctx.profile.loads:
        if ctx.budget.left("speed") <= 0:
            out["loads"][str(tokens)] = dict(tokens=tokens, status=NOT_RUN)
            continue
        out["loads"][str(tokens)] = time_load(ctx, trainees, tokens, ctx.profile.rounds, "speed")
        ctx.write()
    out["targets"] = speed_targets(out["loads"])
    ctx.trainees = trainees  # reused by the next sections


def speed_targets(loads: dict) -> list[dict]:
    rows = []
    for tokens, table in loads.items():
        ref = table.get("rows", {}).get(LORA, {})
        for method, limit in TIME_TARGETS.items():
            row = table.get("rows", {}).get(method)
            if not row or "ratio" not in row:
                rows.append(dict(tokens=int(tokens), method=method, what="time", status="not measured"))
                continue
            rows.append(dict(tokens=int(tokens), method=method, what="time", value=row["ratio"], limit=limit,
                             status="PASS" if row["ratio"] <= limit else "MISS"))
            if "memory" in row and "memory" in ref:
                value = row["memory"]["total_mib"] / ref["memory"]["total_mib"]
                rows.append(dict(tokens=int(tokens), method=method, what="memory", value=value,
                                 limit=MEMORY_TARGET, status="PASS" if value <= MEMORY_TARGET else "MISS"))
    return rows


# ---------------------------------------------------------------------------------------------------- 3. inference
@dataclass
class Forward:
    name: str
    model: nn.Module
    device: Device

    def run(self, ids: torch.Tensor) -> float:
        with torch.inference_mode():
            return self.device.timed(lambda: self.model(input_ids=ids))


def merged_inference(ctx) -> None:
    out = ctx.results.setdefault("merged_inference", {"merge_checks": [], "loads": {}})
    section = "merged_inference"
    base = Forward("base", copy.deepcopy(ctx.base_cpu).to(ctx.device.name).eval(), ctx.device)
    forwards = [base]
    check_ids = torch.randint(ctx.profile.model["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(1))
    trainees = [t for t in ctx.trainees if t.name in METHODS]
    if not trainees:  # run without the speed section: adapted models of its own
        trainees, skipped = build_trainees(ctx, list(METHODS), section)
        out["merge_checks"] += [dict(method=n, status=why) for n, why in skipped.items()]
    for t in trainees:
        if ctx.budget.left(section) <= 0:
            out["merge_checks"].append(dict(method=t.name, status=NOT_RUN))
            continue
        t.opt = None  # AdamW state is not part of an inference model
        try:
            row, merged = merge_check(ctx, t.model, t.name, check_ids.to(ctx.device.name))
            forwards.append(Forward(t.name, merged.eval(), ctx.device))
        except Exception as exc:  # a merge that raises is a failed check; the other methods still run
            row = dict(method=t.name, status="FAIL", error=_one_line(exc))
        out["merge_checks"].append(row)
        t.model = None
    for tokens, (batch, seq) in ctx.profile.loads.items():
        if ctx.budget.left(section) <= 0:
            out["loads"][str(tokens)] = dict(tokens=tokens, status=NOT_RUN)
            continue
        ids = torch.randint(ctx.profile.model["vocab_size"], (batch, seq),
                            generator=torch.Generator().manual_seed(tokens)).to(ctx.device.name)
        for f in forwards:
            f.run(ids)  # warm-up
        failures: dict[str, str] = {}
        times = interleaved(forwards, lambda f: f.run(ids), ctx.profile.infer_rounds, lambda: ctx.budget.left(section),
                            failures)
        ctx.failures += [f"{section} {tokens} tokens {n}: {why}" for n, why in failures.items()]
        rows = summarize(times, "base")
        for name, row in rows.items():
            if name != "base" and "ratio" in row:
                row["status"] = "PASS" if row["ratio"] <= INFERENCE_TARGET else "MISS"
        out["loads"][str(tokens)] = dict(tokens=tokens, batch=batch, sequence=seq, rows=rows, failures=failures)
        ctx.write()
    del forwards, base
    ctx.trainees = []  # the PEFT models too: the path sweep builds its own
    ctx.device_cleanup()


# ---------------------------------------------------------------------------------------------------- 4. paths
def path_sweep(ctx) -> None:
    """Every sspeft method on every forced path, LoRA-r8 interleaved as the reference (fresh models: the speed
    section's sspeft models were merged)."""
    section = "paths"
    names = [LORA, *METHODS]
    built, skipped = build_trainees(ctx, names, section)
    out = ctx.results.setdefault("paths", {"loads": {}, "skipped": skipped})
    sweep = [t for t in built if t.name == LORA]
    for t in built:
        if t.name in METHODS:
            for path in forced_paths(t.name):
                sweep.append(Trainee(f"{t.name}:{path}", t.model, ctx.device, path=path, resident=t.resident))
    for tokens in ctx.profile.loads:
        if ctx.budget.left(section) <= 0:
            out["loads"][str(tokens)] = dict(tokens=tokens, status=NOT_RUN)
            continue
        out["loads"][str(tokens)] = time_load(ctx, sweep, tokens, ctx.profile.sweep_rounds, section)
        ctx.write()
    out["auto_vs_best"] = auto_vs_best(ctx.results.get("speed", {}).get("loads", {}), out["loads"])
    del built, sweep
    ctx.device_cleanup()


# ---------------------------------------------------------------------------------------------------- 5. 4-bit
def quant4(ctx) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        ctx.results["quant4"] = {"skipped": f"4-bit skipped: bitsandbytes not installed ({_one_line(exc)})"}
        return
    out = ctx.results.setdefault("quant4", {"bitsandbytes": bnb.__version__, "cases": []})
    name, shape = "v_proj", ctx.profile.layers["v_proj"]
    for method in METHODS:
        cases = [dict(layer=name, shape=list(shape), method=method, dtype="bf16", path=p) for p in forced_paths(method)]
        if ctx.budget.left("quant4") <= 0:
            out["cases"] += [dict(c, status=NOT_RUN) for c in cases]
            continue
        try:
            rows = check_4bit(ctx, name, shape, method)
        except Exception as exc:  # e.g. bitsandbytes without kernels for this device
            rows = [dict(c, status="FAIL", error=_one_line(exc)) for c in cases]
        out["cases"] += rows


def check_4bit(ctx, name: str, shape, method: str) -> list[dict]:
    """Every path of ``method`` against the reference on an NF4 base that lives on the device."""
    torch.manual_seed(ctx.seed)
    module = One(name, *shape)
    setattr(module, name, nf4_linear(getattr(module, name), ctx.device.name))
    sspeft.inject(module, budget_config(method, targets=[name]))
    layer = sspeft.adapted_layers(module)[name]
    randomize(layer, ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    x = torch.randn(ctx.profile.tokens, shape[1], generator=gen).to(ctx.device.name, torch.bfloat16)
    g = torch.randn(ctx.profile.tokens, shape[0], generator=gen).to(ctx.device.name)
    return [dict(layer=name, shape=list(shape), method=method, dtype="bf16", **row)
            for row in compare_paths(module, layer, x, g, forced_paths(method), BOUNDS["bf16"])]


def nf4_linear(dense: nn.Linear, device: str) -> nn.Module:
    """A real bitsandbytes NF4 Linear4bit (double quant, bf16 compute) of ``dense``, quantized on ``device``."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="cpu")
    layer.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=layer)
    layer = layer.to(device)  # Params4bit quantizes on its first move to a device
    sspeft.prepare_4bit(layer)
    return layer


# ---------------------------------------------------------------------------------------------------- report
def machine(device: Device) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            **{name: _version(name) for name in ("transformers", "peft", "safetensors", "numpy", "bitsandbytes")},
            "sspeft": sspeft.__version__,
            "sspeft_peft_registered": sspeft.PEFT_REGISTERED, "cpu_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()), "device": device.name,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_cost_constants": sspeft_forward.COST_CONSTANTS.get("cuda")}
    if device.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def auto_vs_best(speed_loads: dict, sweep_loads: dict) -> list[dict]:
    """Per load and method: the path the cost model chose (speed section) and the fastest forced path (sweep)."""
    rows = []
    for tokens, table in sweep_loads.items():
        sweep = table.get("rows", {})
        auto = speed_loads.get(tokens, {}).get("rows", {})
        for method in METHODS:
            timed = {n.partition(":")[2]: r["ratio"] for n, r in sweep.items() if n.partition(":")[0] == method
                     and "ratio" in r}
            if not timed:
                continue
            best = min(timed, key=timed.get)
            chosen = auto.get(method, {}).get("path")
            rows.append(dict(tokens=int(tokens), method=method, auto=chosen, auto_ratio=timed.get(chosen),
                             best=best, best_ratio=timed[best]))
    return rows


# ---------------------------------------------------------------------------------------------------- main
class Context:
    """Everything the sections share: settings, the CPU base model, the results and where they are written."""

    def __init__(self, args) -> None:
        self.args, self.seed = args, args.seed
        self.profile = PROFILES["small" if args.small else "full"]
        self.device = Device(args.device)
        self.budget = Budget(args.time_budget)
        self.out = Path(args.out)
        self.failures: list[str] = []
        self.trainees: list[Trainee] = []
        self.base_cpu = None
        m = self.profile.model
        self.results = {
            "machine": machine(self.device), "command": " ".join(["python3", *sys.argv]),
            "settings": dict(profile="small" if args.small else "full", time_budget_s=args.time_budget,
                             seed=args.seed, speed_dtype=args.speed_dtype, reference=LORA, bounds=BOUNDS,
                             merge_bounds=MERGE_BOUNDS, time_targets=TIME_TARGETS,
                             memory_target=MEMORY_TARGET, inference_target=INFERENCE_TARGET,
                             correctness_layers=self.profile.layers, correctness_tokens=self.profile.tokens,
                             loads={str(k): v for k, v in self.profile.loads.items()}, model=m,
                             speed_model=(f"LlamaForCausalLM, {m['num_hidden_layers']} decoder layers, hidden "
                                          f"{m['hidden_size']}, intermediate {m['intermediate_size']}, "
                                          f"{m['num_attention_heads']} heads, {m['num_key_value_heads']} KV heads, "
                                          f"vocabulary {m['vocab_size']} (reduced), seeded random weights, AdamW; "
                                          f"{self.profile.warmup} warm-up steps per config.")),
            "sections": {}, "failures": self.failures}

    def device_cleanup(self) -> None:
        gc.collect()
        if self.device.cuda:
            torch.cuda.empty_cache()

    def write(self) -> None:
        self.results["elapsed_s"] = time.monotonic() - self.budget.start
        atomic_write_json(self.out / "gpu_check.json", _finite(self.results))
        atomic_write_text(self.out / "gpu_check.md", markdown(self.results))


def _finite(obj):
    """JSON without NaN/Infinity tokens: non-finite floats become strings ("inf", "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


SECTIONS = {"correctness": correctness, "speed": speed, "merged_inference": merged_inference, "paths": path_sweep,
            "quant4": quant4}


def run_section(ctx: Context, name: str) -> None:
    started = time.monotonic()
    ctx.results["sections"][name] = "running"
    try:
        if name in ("speed", "merged_inference", "paths") and ctx.base_cpu is None:
            ctx.base_cpu = base_model(ctx.profile, ctx.seed, ctx.args.speed_dtype)
        SECTIONS[name](ctx)
        status = "done"
    except Exception as exc:  # a section that raises is a failure of the run, reported with where it happened
        status = f"error: {_one_line(exc)}"
        ctx.failures.append(f"{name}: {_one_line(exc)} at {traceback.extract_tb(exc.__traceback__)[-1].line}")
        traceback.print_exc()
    ctx.results["sections"][name] = f"{status} ({time.monotonic() - started:.1f} s)"
    ctx.device_cleanup()
    ctx.write()
    print(f"== {name}: {ctx.results['sections'][name]}", flush=True)


def verdict(results: dict) -> tuple[str, int]:
    cases = results.get("correctness", {}).get("cases", []) + results.get("quant4", {}).get("cases", [])
    checks = cases + results.get("correctness", {}).get("inject_on_device", []) + \
        results.get("merged_inference", {}).get("merge_checks", [])
    failed = [c for c in checks if c["status"] == "FAIL"]
    not_run = [c for c in checks if c["status"].startswith("not run")]
    text = f"{len(checks) - len(failed) - len(not_run)} checks passed, {len(failed)} FAILED, {len(not_run)} not run"
    if results["failures"]:
        text += f", {len(results['failures'])} errors"
    if failed or results["failures"]:
        return text, 1
    return text, 3 if not_run else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="small shapes and few rounds (CPU, tests)")
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for all sections together (default 300; 120 with --small)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the speed and inference models (default bf16 on CUDA; fp32 on CPU, where bf16 "
                        "matmuls are emulated without AVX512-BF16 and ~10x slower)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); use --device cpu")
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; expected a subset of {','.join(SECTIONS)}")
    if args.time_budget is None:
        args.time_budget = 120.0 if args.small else 300.0
    if not args.time_budget > 0:
        p.error(f"--time-budget {args.time_budget}: must be > 0 seconds")
    if args.speed_dtype is None:
        args.speed_dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be ≥ 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(args)
    gc.freeze()  # the imported libraries' objects: later collections scan only what the sections create
    for name in SECTIONS:
        if name in args.sections.split(","):
            run_section(ctx, name)
        else:
            ctx.results["sections"][name] = "skipped (--sections)"
    ctx.results["verdict"], code = verdict(ctx.results)
    ctx.write()
    gc.unfreeze()
    print(f"{ctx.results['verdict']}; wrote {ctx.out / 'gpu_check.md'} and gpu_check.json", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
