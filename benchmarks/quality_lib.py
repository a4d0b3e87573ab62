"""Machinery of the quality benchmark (`benchmarks/quality.py`): data, adapters, a plain AdamW loop, ΔW spectra.

Everything one run needs is in a `RunSpec` plus a `BenchConfig`; `run_one` trains and evaluates one adapter on a
fresh copy of the base model and returns a JSON-ready result. Kept free of CLI concerns so tests can drive it on a
tiny random model.
"""

from __future__ import annotations

import json
import math
import hashlib
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Alpaca's prompt format, reproduced exactly (interoperability strings).
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SPECTRAL = ("ssh", "lfma", "waveft", "fourierft", "shira")
PEFT_PEERS = ("peft-fourierft", "peft-waveft", "peft-shira")
METHODS = ("base", "lora", *SPECTRAL, *PEFT_PEERS)
RANK_TOL = 1e-3
"""Numerical rank counts singular values above RANK_TOL·σmax (the WaveFT paper's Figure 3 analogue)."""


@dataclass
class BenchConfig:
    """Settings shared by every run of one benchmark."""

    model_dir: str
    """Transformers checkpoint directory of the base model (fp32)."""
    data: str
    """Alpaca-format JSON file: a list of {instruction, input, output}."""
    n_train: int = 800
    """Training records drawn (seeded) from the file; steps × batch_size of them are used in order."""
    n_eval: int = 64
    """Held-out records (disjoint from the training ones) for the response-only loss."""
    split_seed: int = 0
    """Seed of the train/held-out shuffle (fixed across runs so every run sees the same held-out set)."""
    max_length: int = 192
    """Tokens per example after truncation (prompt + response + EOS)."""
    batch_size: int = 4
    """Examples per optimizer step (no accumulation)."""
    eval_batch_size: int = 8
    """Examples per held-out forward pass."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module-name suffixes adapted by every method."""
    warmup_frac: float = 0.1
    """Linear warmup share of the steps; the lr is constant afterwards (short runs: no decay to hide behind)."""
    threads: int = 2
    """torch intra-op threads."""
    first_layer: int = 0
    """Adapt targets in decoder layers >= first_layer only; the frozen layers below are run once per example and
    their output cached (exact: nothing below first_layer trains), which makes each step much cheaper."""


@dataclass
class RunSpec:
    """One training run: a method, its options, a learning rate, a step count and a seed."""

    name: str
    """Unique id; the result file is <name>.json."""
    method: str
    """One of METHODS ("base" = evaluate the untouched model)."""
    lr: float = 0.0
    """AdamW learning rate."""
    steps: int = 100
    """Optimizer steps."""
    seed: int = 0
    """Adapter seed (positions, inits) and training-data order."""
    options: dict[str, Any] = field(default_factory=dict)
    """Method options: sspeft SpectralConfig fields, LoRA r/alpha, PEFT config fields."""
    groups: list[str] = field(default_factory=list)
    """Tables/plots the run belongs to (main, lr-grid, seed, ablation-delta, ablation-topk)."""
    label: str = ""
    """Human-readable method label for tables and plots."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"RunSpec.method={self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method != "base" and not (self.lr > 0 and self.steps > 0):
            raise ValueError(f"RunSpec {self.name!r}: lr={self.lr} and steps={self.steps} must be > 0")


# ---------------------------------------------------------------------------------------------------- data
def load_records(path: str | Path) -> list[dict[str, str]]:
    """Alpaca records from a JSON list; raises naming the first malformed record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: file does not exist (expected an Alpaca-format JSON list)")
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not data:
        raise ValueError(f"--data {path}: expected a non-empty JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) \
                or not isinstance(rec.get("output"), str) or not isinstance(rec.get("input", ""), str):
            raise ValueError(f"--data {path}: record {i} is not {{instruction: str, input: str, output: str}}")
    return data


def split_records(records: list, n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then the first n_eval records are held out and the next n_train train."""
    if n_train + n_eval > len(records):
        raise ValueError(f"n_train={n_train} + n_eval={n_eval} exceed the {len(records)} records in the data file")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = [records[i] for i in order[:n_eval]]
    train = [records[i] for i in order[n_eval:n_eval + n_train]]
    return train, held


def prompt_of(rec: dict[str, str]) -> str:
    if rec.get("input"):
        return PROMPT_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return PROMPT_NO_INPUT.format(instruction=rec["instruction"])


def encode(tokenizer, rec: dict[str, str], max_length: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with the prompt masked (-100); None when the prompt leaves no room for a response."""
    prompt = tokenizer(prompt_of(rec), add_special_tokens=False)["input_ids"]
    response = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) >= max_length:
        return None
    ids = (prompt + response)[:max_length]
    labels = ([-100] * len(prompt) + response)[:max_length]
    return ids, labels


def encode_all(tokenizer, records: list, max_length: int) -> tuple[list, int]:
    """Encoded examples and the number dropped because their prompt alone fills max_length."""
    out = [encode(tokenizer, r, max_length) for r in records]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


def batch_indices(n_examples: int, steps: int, batch_size: int) -> list[list[int]]:
    """Example indices of each step: the (already shuffled) training examples in order, cycling if needed.
    The order is the same for every run and seed, so runs differ only by their adapter."""
    return [[(s * batch_size + i) % n_examples for i in range(batch_size)] for s in range(steps)]


# ---------------------------------------------------------------------------------------------------- adapters
def attach_adapter(model: torch.nn.Module, spec: RunSpec, targets: list[str] | str) -> torch.nn.Module:
    """The model with the run's adapter attached (only adapter parameters trainable)."""
    opts = dict(spec.options)
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        r = int(opts.pop("r", 8))
        cfg = LoraConfig(r=r, lora_alpha=opts.pop("alpha", 2 * r), lora_dropout=0.0, target_modules=targets, **opts)
        torch.manual_seed(spec.seed)  # LoRA's A init
        return get_peft_model(model, cfg)
    if spec.method in SPECTRAL:
        import sspeft

        cfg = sspeft.SpectralConfig(method=spec.method, target_modules=targets, seed=spec.seed, **opts)
        return sspeft.inject(model, cfg)
    from peft import get_peft_model

    torch.manual_seed(spec.seed)
    return get_peft_model(model, peft_peer_config(spec.method, opts, targets, spec.seed))


def peft_peer_config(method: str, opts: dict, targets: list[str] | str, seed: int):
    """PEFT's own FourierFT / WaveFT / SHiRA config at PEFT's defaults except the given options."""
    if method == "peft-fourierft":
        from peft import FourierFTConfig

        return FourierFTConfig(target_modules=targets, random_loc_seed=seed, **opts)
    if method == "peft-waveft":
        from peft import WaveFTConfig

        return WaveFTConfig(target_modules=targets, random_loc_seed=seed, **opts)
    from peft import ShiraConfig

    return ShiraConfig(target_modules=targets, random_seed=seed, **opts)


def delta_weights(model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """{module name: ΔW (out, in) fp32} for every adapted layer, whatever library made it."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if method in SPECTRAL:
            import sspeft

            for name, layer in sspeft.adapted_layers(model).items():
                out[name] = layer.delta_weight().detach().float()
            return out
        for name, module in causal_lm(model).named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and module.active_adapters:
                delta = module.get_delta_weight(module.active_adapters[0]).detach()
                out[name] = (delta.to_dense() if delta.is_sparse else delta).float()  # PEFT SHiRA: sparse COO
    return out


def spectrum_stats(deltas: dict[str, torch.Tensor], keep: int = 3) -> dict[str, Any]:
    """Numerical rank of every ΔW and the normalised singular values of `keep` evenly spaced q_proj layers."""
    ranks, spectra = {}, {}
    names = sorted(deltas, key=_layer_order)
    q_names = [n for n in names if n.endswith("q_proj")] or names
    chosen = {q_names[round(i * (len(q_names) - 1) / max(keep - 1, 1))] for i in range(min(keep, len(q_names)))}
    for name in names:
        s = torch.linalg.svdvals(deltas[name].double())
        top = float(s[0]) if s.numel() else 0.0
        ranks[name] = int((s > RANK_TOL * top).sum()) if top > 0 else 0
        if name in chosen:
            spectra[name] = (s / top).tolist() if top > 0 else s.tolist()
    values = list(ranks.values())
    return {"ranks": ranks, "spectra": spectra, "rank_mean": sum(values) / max(len(values), 1),
            "rank_min": min(values, default=0), "rank_max": max(values, default=0)}


def _layer_order(name: str) -> tuple:
    digits = [int(p) for p in name.split(".") if p.isdigit()]
    return (digits[0] if digits else -1, name)


# ---------------------------------------------------------------------------------------------------- stems
class _Passthrough(torch.nn.Module):
    """Stands in for a frozen decoder layer whose output is already in the input (cached stems)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Stop(Exception):
    pass


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PeftModel (adapters live in its module tree either way)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compute_stems(lm: torch.nn.Module, examples: list, first_layer: int) -> list[torch.Tensor]:
    """Per example, the hidden states entering decoder layer `first_layer` (fp32, no grad)."""
    layers = lm.model.layers
    captured: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"])[0].detach().clone())
        raise _Stop

    handle = layers[first_layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids, _ in examples:
                try:
                    lm.model(input_ids=torch.tensor([ids]))
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def cached_stems(lm, cfg: BenchConfig, cache_dir: Path, key: str, examples: list) -> list[torch.Tensor] | None:
    """Stems for `examples` from cache_dir (computed and saved atomically on first use); None when first_layer=0."""
    if cfg.first_layer == 0:
        return None
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "targets", "warmup_frac")}
    digest = hashlib.sha256(json.dumps([settings, key, [e[0] for e in examples]]).encode()).hexdigest()[:16]
    path = cache_dir / f"stems-{key}-{digest}.pt"
    if path.is_file():
        return torch.load(path)
    stems = compute_stems(lm, examples, cfg.first_layer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(stems, tmp)
    tmp.replace(path)
    return stems


def drop_lower_layers(lm: torch.nn.Module, first_layer: int) -> None:
    """Replace decoder layers below first_layer by passthroughs (their output comes from the stem cache)."""
    for i in range(first_layer):
        lm.model.layers[i] = _Passthrough()


# ---------------------------------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, lr: float, warmup_frac: float) -> float:
    """Linear warmup over warmup_frac of the steps, then constant."""
    warm = max(1, round(warmup_frac * steps))
    return lr * min(1.0, (step + 1) / warm)


def example_loss(lm: torch.nn.Module, ids: list[int], labels: list[int], stem: torch.Tensor | None) -> tuple:
    """(summed response-token cross-entropy, response tokens) for one unpadded example. The vocabulary projection
    runs only where a response token is predicted (the prompt positions would be masked anyway)."""
    x = stem[None] if stem is not None else lm.model.embed_tokens(torch.tensor([ids]))
    hidden = lm.model(inputs_embeds=x).last_hidden_state[0, :-1]
    target = torch.tensor(labels[1:])
    keep = target != -100
    logits = lm.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum"), int(keep.sum())


def heldout_loss(lm: torch.nn.Module, examples: list, stems: list | None) -> float:
    """Token-weighted mean response-only cross-entropy over the held-out examples."""
    total, count = 0.0, 0
    lm.eval()
    with torch.no_grad():
        for i, (ids, labels) in enumerate(examples):
            loss, n = example_loss(lm, ids, labels, stems[i] if stems else None)
            total, count = total + float(loss), count + n
    if count == 0:
        raise ValueError("no held-out response tokens: raise max_length or n_eval (every prompt filled max_length)")
    return total / count


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(cfg: BenchConfig):
    """Tokenizer-encoded train and held-out examples and the number dropped for lack of room."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    train_recs, held_recs = split_records(load_records(cfg.data), cfg.n_train, cfg.n_eval, cfg.split_seed)
    train_ex, dropped_train = encode_all(tokenizer, train_recs, cfg.max_length)
    held_ex, dropped_held = encode_all(tokenizer, held_recs, cfg.max_length)
    return train_ex, held_ex, dropped_train + dropped_held


def target_spec(cfg: BenchConfig, n_layers: int) -> list[str] | str:
    """Target suffixes, or (first_layer > 0) a full-match regex both sspeft and PEFT accept."""
    if cfg.first_layer == 0:
        return list(cfg.targets)
    layers = "|".join(str(i) for i in range(cfg.first_layer, n_layers))
    return rf".*\.layers\.({layers})\..*\.({'|'.join(cfg.targets)})"


def run_one(spec: RunSpec, cfg: BenchConfig, cache_dir: Path, progress=print) -> dict[str, Any]:
    """Train one adapter on a fresh base model and return its result record (meant for a fresh process; the
    caller's torch thread count is restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run_one(spec, cfg, cache_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _run_one(spec: RunSpec, cfg: BenchConfig, cache_dir: Path, progress) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    train_ex, held_ex, dropped = prepare(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32)
    model.config.use_cache = False
    batches = batch_indices(len(train_ex), spec.steps, cfg.batch_size)
    used = sorted({i for b in batches for i in b})
    train_stems = cached_stems(model, cfg, cache_dir, "train", train_ex)
    held_stems = cached_stems(model, cfg, cache_dir, "heldout", held_ex)
    drop_lower_layers(model, cfg.first_layer)
    result: dict[str, Any] = {"spec": asdict(spec), "bench": asdict(cfg), "dropped_examples": dropped,
                              "train_examples_used": len(used), "heldout_examples": len(held_ex),
                              "torch": torch.__version__, "rss_after_load_mib": peak_rss_mib()}
    if spec.method == "base":
        t0 = time.perf_counter()
        result.update(heldout_loss=heldout_loss(model, held_ex, held_stems), trainable=0, train_losses=[],
                      step_s=0.0, eval_s=time.perf_counter() - t0, peak_rss_mib=peak_rss_mib())
        return result
    model = attach_adapter(model, spec, target_spec(cfg, len(model.model.layers)))
    lm = causal_lm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    result["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    losses, times = train_loop(lm, opt, spec, cfg, train_ex, train_stems, batches, progress)
    t0 = time.perf_counter()
    result["heldout_loss"] = heldout_loss(lm, held_ex, held_stems)
    result["eval_s"] = time.perf_counter() - t0
    result["train_losses"] = losses
    result["train_s"] = sum(times)
    tail = sorted(times[1:] or times)  # the first step pays one-off allocations
    result["step_s"] = tail[len(tail) // 2]
    result["peak_rss_mib"] = peak_rss_mib()
    result["delta"] = spectrum_stats(delta_weights(model, spec.method))
    return result


def train_loop(lm, opt, spec: RunSpec, cfg: BenchConfig, examples, stems, batches, progress) -> tuple[list, list]:
    """Plain AdamW: each step sums the response-token losses of its examples (one unpadded forward each) and
    divides by the step's response tokens — the token-weighted mean a padded batch would give."""
    losses, times = [], []
    lm.train()
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec.steps, spec.lr, cfg.warmup_frac)
        tokens = sum(sum(1 for t in examples[i][1][1:] if t != -100) for i in batch)
        total = 0.0
        for i in batch:
            loss, _ = example_loss(lm, examples[i][0], examples[i][1], stems[i] if stems else None)
            (loss / tokens).backward()
            total += float(loss.detach())
        if not torch.isfinite(torch.tensor(total)):
            raise FloatingPointError(f"run {spec.name}: non-finite training loss at step {step}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / tokens)
        times.append(time.perf_counter() - t0)
        if (step + 1) % max(1, spec.steps // 5) == 0:
            recent = losses[-10:]
            progress(f"  {spec.name}: step {step + 1}/{spec.steps} loss {sum(recent) / len(recent):.3f} "
                     f"({times[-1]:.2f} s/step)")
    return losses, times
