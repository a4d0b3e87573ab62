"""What both parts of the quality benchmark share: the record split, encoding through `launch.data` (the shipped
Alpaca prompt, tokenisation and response-only labels), the model with its frozen lower layers cached, per-record
response losses, and the statistics (paired bootstrap, seed intervals).

The split is fixed by `split_seed`: validation (chooses learning rates and η), test (reports) and training records
are disjoint. Nothing here trains; `quality_coverage` and `quality_train` do.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ALPACA_FILE = Path("data") / "alpaca" / "alpaca_en_demo.json"
"""The Alpaca sample, relative to the shared data directory."""


def default_shared_dir() -> Path:
    """$SSPEFT_SHARED_DIR, else the `shared/` directory next to the checkout (the tests' convention)."""
    return Path(os.environ.get("SSPEFT_SHARED_DIR", REPO.parent / "shared"))


@dataclass
class Setup:
    """Model, data and split shared by every measurement of one benchmark."""

    model_dir: str
    """Transformers checkpoint directory of the base model (loaded in fp32)."""
    data: str
    """Alpaca-format .json/.jsonl file read through launch.data.load_records."""
    n_train: int = 480
    """Training records (part 2 uses them in a seeded order; part 1 accumulates gradients over a prefix)."""
    n_val: int = 64
    """Validation records: choose learning rates (part 2) and the step size η (part 1)."""
    n_test: int = 64
    """Test records: every reported loss."""
    split_seed: int = 0
    max_length: int = 192
    """Tokens per example after truncation (prompt + response + EOS)."""
    top_layers: int = 4
    """Adapt q,v in the top `top_layers` decoder layers; the frozen layers below run once and are cached."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    batch_size: int = 8
    """Examples per forward pass (and per optimizer step in part 2)."""
    threads: int = 2


def settings_of(setup: Setup, **parts) -> dict:
    """The settings a result is stored with and resumed by: the setup without `threads` (a speed knob, not a
    result's input) plus the part's own configuration."""
    from dataclasses import asdict

    base = {k: v for k, v in asdict(setup).items() if k != "threads"}
    return json.loads(json.dumps({"setup": base, **{k: asdict(v) for k, v in parts.items()}}))


def check_labels(only: list[str] | None, known: list[str]) -> None:
    """Raise SystemExit naming the `--only` labels that are not among `known`."""
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise SystemExit(f"--only: unknown labels {unknown}; expected some of {known}")


PLANNING_KEYS = {"setup": ("threads",), "train": ("max_extensions", "seeds"), "coverage": ("eta_evals", "eta_growth")}
"""Settings that change how long a part runs or which runs it plans, never what a stored result measured (a
training run stores its own seed; the coverage part's η-search settings are stored with each η search instead,
and a search made under others is redone)."""


def same_settings(a: dict | None, b: dict | None) -> bool:
    """Whether two results were measured under the same settings (`PLANNING_KEYS` in either are ignored)."""
    def key(x):
        return {part: ({k: v for k, v in val.items() if k not in PLANNING_KEYS.get(part, ())}
                       if isinstance(val, dict) else val) for part, val in x.items()}
    return isinstance(a, dict) and isinstance(b, dict) and key(a) == key(b)


@dataclass
class Encoded:
    """Token ids and labels (-100 outside the response) of one split, with the source record indices."""

    ids: list[list[int]]
    labels: list[list[int]]
    source: list[int]
    """Index of each example's record in the data file."""
    dropped: int
    """Records dropped because their prompt alone fills max_length."""

    def __len__(self) -> int:
        return len(self.ids)


def split_indices(n_records: int, setup: Setup) -> dict[str, list[int]]:
    """Seeded shuffle of the record indices; validation, test and training take disjoint consecutive slices."""
    need = setup.n_val + setup.n_test + setup.n_train
    if need > n_records:
        raise ValueError(f"n_val={setup.n_val} + n_test={setup.n_test} + n_train={setup.n_train} = {need} exceed the "
                         f"{n_records} records in {setup.data}")
    order = list(range(n_records))
    random.Random(setup.split_seed).shuffle(order)
    a, b = setup.n_val, setup.n_val + setup.n_test
    return {"val": order[:a], "test": order[a:b], "train": order[b:need]}


def content_duplicates(records: list, splits: dict[str, list[int]]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """((split, record index), (split, record index)) for every record of the splits that repeats an earlier one
    by content (instruction, input, output); the first occurrence in split order is the one repeated."""
    first: dict[tuple, tuple[str, int]] = {}
    out = []
    for name, idx in splits.items():
        for i in idx:
            r = records[i]
            key = (r.instruction, r.input, r.output)
            if key in first:
                out.append((first[key], (name, i)))
            else:
                first[key] = (name, i)
    return out


def load_splits(setup: Setup, tokenizer) -> dict[str, Encoded]:
    """The three splits encoded exactly as `launch.train` encodes training data (template `alpaca`)."""
    from launch.data import DataError, build_template, load_records, tokenize_records

    records = load_records(setup.data)
    template = build_template("alpaca", tokenizer)
    out = {}
    for name, idx in split_indices(len(records), setup).items():
        kept_ids, kept_labels, kept_src, dropped = [], [], [], 0
        for i in idx:  # one record at a time so each kept example keeps its record index
            try:
                rows, _ = tokenize_records([records[i]], tokenizer, template, "alpaca", setup.max_length)
            except DataError:  # launch.data raises when the prompt fills max_length
                dropped += 1
                continue
            kept_ids.append(rows[0]["input_ids"])
            kept_labels.append(rows[0]["labels"])
            kept_src.append(i)
        out[name] = Encoded(kept_ids, kept_labels, kept_src, dropped)
    return out


def load_model(setup: Setup):
    """(model, tokenizer): the base model in fp32, eval mode, every parameter frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.requires_grad_(False)
    model.eval()
    return model, AutoTokenizer.from_pretrained(setup.model_dir)


def first_adapted_layer(model, setup: Setup) -> int:
    n = len(model.model.layers)
    if not 1 <= setup.top_layers <= n:
        raise ValueError(f"top_layers={setup.top_layers}; the model has {n} decoder layers")
    return n - setup.top_layers


def target_names(model, setup: Setup, first_layer: int = 0) -> list[str]:
    """Full names of the adapted linear modules (targets in decoder layers ≥ first_layer)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in setup.targets:
            layer = [int(p) for p in name.split(".") if p.isdigit()]
            if layer and layer[0] >= first_layer:
                out.append(name)
    if not out:
        raise ValueError(f"no module named {setup.targets} in decoder layers ≥ {first_layer}")
    return out


# ---------------------------------------------------------------------------------------------------- stems
class _Passthrough(torch.nn.Module):
    """Stands in for a frozen decoder layer whose output is already the input (cached stems)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Stop(Exception):
    pass


def compute_stems(model, data: Encoded, first_layer: int) -> list[torch.Tensor]:
    """Per example, the hidden states entering decoder layer `first_layer` (one unpadded forward each)."""
    captured: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"])[0].detach().clone())
        raise _Stop

    handle = model.model.layers[first_layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in data.ids:
                try:
                    model.model(input_ids=torch.tensor([ids]))
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def drop_lower_layers(model, first_layer: int) -> None:
    """Decoder layers below first_layer become passthroughs (their output comes from the stems). Exact: nothing
    below first_layer trains, and causal attention makes each example's hidden states independent of padding."""
    for i in range(first_layer):
        model.model.layers[i] = _Passthrough()


# ---------------------------------------------------------------------------------------------------- losses
def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def batch_losses(model, data: Encoded, index: list[int], stems: list[torch.Tensor] | None) -> tuple:
    """(summed response cross-entropy per example (B,), response tokens per example (B,)) for one right-padded
    batch. With stems the decoder starts from the cached hidden states; the vocabulary projection runs only where
    a response token is predicted."""
    labels = _pad([data.labels[i] for i in index], -100)
    mask = _pad([[1] * len(data.ids[i]) for i in index], 0)
    if stems is None:
        x = model.model.embed_tokens(_pad([data.ids[i] for i in index], 0))
    else:
        width = labels.shape[1]
        x = torch.stack([torch.nn.functional.pad(stems[i], (0, 0, 0, width - stems[i].shape[0])) for i in index])
    hidden = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[keep]).float()
    token_loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="none")
    rows = torch.arange(len(index))[:, None].expand_as(target)[keep]
    per_example = torch.zeros(len(index), dtype=token_loss.dtype).index_add(0, rows, token_loss)
    return per_example, keep.sum(1)


def record_losses(model, data: Encoded, stems: list[torch.Tensor] | None, batch_size: int) -> dict:
    """Per-record summed response loss and token count, and the token-weighted mean, without gradients."""
    sums, tokens = [], []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            s, t = batch_losses(model, data, list(range(start, min(start + batch_size, len(data)))), stems)
            sums += s.tolist()
            tokens += t.tolist()
    if sum(tokens) == 0:
        raise ValueError("no response tokens in the evaluated split: raise max_length")
    return {"loss": sum(sums) / sum(tokens), "sums": sums, "tokens": tokens}


# ---------------------------------------------------------------------------------------------------- statistics
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student-t 97.5 % quantiles for small seed counts (degrees of freedom → quantile)."""


def mean_interval(values: list[float]) -> dict:
    """Mean over seeds and its 95 % t-interval (zero width when every seed gives the same value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "lo": mean, "hi": mean, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def paired_bootstrap(a: dict, b: dict, reps: int = 2000, seed: int = 0) -> dict:
    """Token-weighted loss difference a − b over the same test records and its 95 % percentile interval, records
    resampled with replacement. a, b: {"sums": [...], "tokens": [...]} per record (seeds already averaged)."""
    sa, sb, tok = torch.tensor(a["sums"], dtype=torch.float64), torch.tensor(b["sums"], dtype=torch.float64), \
        torch.tensor(a["tokens"], dtype=torch.float64)
    if sa.shape != sb.shape or not torch.equal(tok, torch.tensor(b["tokens"], dtype=torch.float64)):
        raise ValueError("paired bootstrap needs the same test records (and token counts) on both sides")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(sa), (reps, len(sa)), generator=g)
    diff = (sa[idx].sum(1) - sb[idx].sum(1)) / tok[idx].sum(1)
    lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": float((sa.sum() - sb.sum()) / tok.sum()), "lo": lo, "hi": hi, "reps": reps}
