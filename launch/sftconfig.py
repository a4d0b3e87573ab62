"""The recipe's `train:` section as TRL's `SFTConfig`: which keys a recipe may set, and a dry build that validates
them with SFTConfig's own checks before anything is written.

    kwargs = sft_kwargs(recipe.train, recipe.data, output_dir="runs/x/checkpoints", has_eval=False)
    SFTConfig(**kwargs)                  # what launch.train builds (plus device and launcher settings)

The train section uses SFTConfig's field names. The pipeline owns a few of them (where the run is written, the
data seed, where to resume, devices and precision); those are refused with the place they live instead.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from launch.schema import DataSection, RecipeError, TrainSection, shown, unknown_key

RENAMED = {
    "epochs": "num_train_epochs",
    "per_device_batch_size": "per_device_train_batch_size",
    "lr_scheduler": "lr_scheduler_type",
    "optimizer": "optim",
    "warmup_ratio": "warmup_steps",
}
"""Earlier recipe keys → their SFTConfig names."""

OWNED = {
    "output_dir": "run_dir: checkpoints are written to <run_dir>/checkpoints",
    "overwrite_output_dir": "train.resume: 'auto' continues the run directory, 'never' refuses a non-fresh one",
    "resume_from_checkpoint": "train.resume: 'auto' continues from the newest complete checkpoint in run_dir",
    "data_seed": "train.seed: data order, dropout and the adapter's positions all follow it",
    "logging_dir": "run_dir: TensorBoard logs go to <run_dir>/logs/tensorboard",
    "use_cpu": "the pipeline: it trains on CPU exactly when no GPU is visible",
    "no_cuda": "the pipeline: it trains on CPU exactly when no GPU is visible",
    "local_rank": "the launcher (torchrun, deepspeed or accelerate launch set it)",
    "accelerator_config": "the pipeline: it reuses the process group the launcher set up",
    "gradient_checkpointing_kwargs": "the pipeline: reentrant checkpointing under ZeRO-3 (PEFT needs it), "
                                     "non-reentrant otherwise; set train.gradient_checkpointing only",
    "model_init_kwargs": "the model section (model.dtype, model.attn_implementation, model.device_map, ...)",
    "trust_remote_code": "model.trust_remote_code",
    "chat_template_path": "data.template: 'alpaca' or 'chat' (the model's own), saved as template.jinja",
    "dataset_text_field": "the data section: records are read from data.path in a format launch.data "
                          "recognises (Alpaca, prompt/completion or messages)",
    "dataset_kwargs": "the data section: records are tokenized by the pipeline",
    "completion_only_loss": "the pipeline: the loss always covers the assistant's turns only",
    "assistant_only_loss": "the pipeline: the loss always covers the assistant's turns only",
    "hub_token": "the environment (HF_TOKEN or `hf auth login`), never a recipe file",
}
"""SFTConfig keys the pipeline sets itself → where the setting lives."""

DATA_KEYS = ("max_length", "packing")
"""SFTConfig keys accepted in train: and stored in the data section (the pipeline tokenizes with them)."""

PRECISION_KEYS = ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval")
"""Accepted when they agree with model.dtype; the trainer itself never autocasts (adapters stay fp32)."""

# hardware-dependent checks (tf32 needs an Ampere GPU; a DeepSpeed config is read when training starts), so a
# recipe written for a cluster still validates on a login node
_NOT_DRY = ("deepspeed", "tf32")
# the pipeline's own settings a recipe may override
_PIPELINE_DEFAULTS = {"save_strategy": "steps", "ddp_find_unused_parameters": False, "disable_tqdm": False,
                      "dataset_num_proc": None, "remove_unused_columns": True, "save_only_model": False}


@functools.cache
def sft_fields() -> dict[str, Any]:
    """{name: type hint} of every SFTConfig field."""
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(SFTConfig) if f.init}


def allowed_keys() -> list[str]:
    """Keys the train section accepts."""
    own = [f.name for f in dataclasses.fields(TrainSection) if f.name != "options"]
    return sorted(set(own) | set(sft_fields()) - set(OWNED))


def check_key(key: str, source: str) -> None:
    """Refuse an earlier recipe key, a pipeline-owned key or an unknown one, naming where to go instead."""
    if key in RENAMED:
        extra = (" (transformers 5 reads a warmup_steps value in [0, 1) as a fraction of the steps)"
                 if key == "warmup_ratio" else "")
        raise RecipeError(f"{source}: train.{key} is now train.{RENAMED[key]}, SFTConfig's name{extra}; rename it")
    if key in OWNED:
        raise RecipeError(f"{source}: train.{key} is set by the pipeline, not the recipe; it lives in {OWNED[key]}")
    if key not in allowed_keys():
        raise RecipeError(unknown_key(source, "key in section 'train'", key, allowed_keys(), prefix="train",
                                      valid_text="resume and the fields of trl.SFTConfig "
                                                 "(transformers.TrainingArguments)"))


def check_report_to(value: Any, source: str) -> None:
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise RecipeError(f"{source}: train.report_to = {shown(value)} has the wrong type; expected a name or a "
                          f"list")
    names = [value] if isinstance(value, str) else value
    if len(names) == 1 and names[0] in ("none", "all"):
        return
    installed = get_available_reporting_integrations()
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(f"{source}: train.report_to = {shown(value)}: {shown(name)} is not an integration "
                              f"transformers knows; expected 'none', 'all' or some of "
                              f"{sorted(INTEGRATION_TO_CALLBACK)}")
        if name not in installed:
            raise RecipeError(f"{source}: train.report_to = {shown(value)}: {shown(name)} is not installed here "
                              f"(installed: {installed or 'none'}); install its package or leave it out")


def check_precision(options: dict[str, Any], dtype: str, source: str) -> None:
    """bf16/fp16 keys must agree with model.dtype, which is where the pipeline's precision lives."""
    for key in PRECISION_KEYS:
        value = options.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: train.{key} = {shown(value)} has the wrong type; expected true or false")
        if key.startswith("fp16") and value:
            raise RecipeError(f"{source}: train.{key} = true is not supported: the base computes in model.dtype "
                              f"(bf16 or fp32) and adapter coefficients stay fp32; drop train.{key}")
        if key == "bf16" and value != (dtype == "bf16"):
            raise RecipeError(f"{source}: train.bf16 = {str(value).lower()} contradicts model.dtype = {dtype!r}: "
                              f"precision lives in model.dtype (the trainer never autocasts, so the fp32 adapter "
                              f"coefficients keep their updates); set model.dtype to "
                              f"{'bf16' if value else 'fp32'} or drop train.bf16")
        if key == "bf16_full_eval" and value and dtype != "bf16":
            raise RecipeError(f"{source}: train.bf16_full_eval = true contradicts model.dtype = {dtype!r}")


def sft_kwargs(train: TrainSection, data: DataSection, output_dir: str, has_eval: bool) -> dict[str, Any]:
    """SFTConfig keyword arguments for the recipe's train and data sections (devices and launcher aside)."""
    kwargs: dict[str, Any] = dict(_PIPELINE_DEFAULTS, per_device_eval_batch_size=train.per_device_train_batch_size)
    kwargs.update({k: v for k, v in train.to_dict().items() if k != "resume" and k not in PRECISION_KEYS})
    kwargs.update(
        output_dir=output_dir, data_seed=train.seed, max_length=data.max_length, packing=data.packing,
        # the model is loaded in model.dtype and adapters stay fp32: no autocast, and DeepSpeed must not cast the
        # module (it would round the fp32 coefficients to bf16)
        bf16=False, fp16=False, bf16_full_eval=False, fp16_full_eval=False,
    )
    if not has_eval:
        kwargs["eval_strategy"] = "no"  # nothing to evaluate on without data.eval_fraction
    elif "eval_strategy" not in train.options:
        kwargs["eval_strategy"] = "steps" if train.eval_steps else "no"  # no interval: one evaluation at the end
    return kwargs


def validate(train: TrainSection, data: DataSection, source: str) -> None:
    """Build SFTConfig once without touching devices; on failure name the key (and value) responsible."""
    try:
        _dry_build(train, data)
        return
    except (ValueError, TypeError) as e:
        error = e
    defaults = TrainSection()
    for key, value in train.to_dict().items():
        if key in _NOT_DRY or value == getattr(defaults, key, _MISSING):
            continue
        single = dataclasses.replace(defaults, options={})
        if hasattr(single, key) and key != "options":
            setattr(single, key, value)
        else:
            single.options[key] = value
        try:
            _dry_build(single, data)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"{source}: train.{key} = {shown(value)} is refused by SFTConfig: {e}") from e
    raise RecipeError(f"{source}: the train section is refused by SFTConfig: {error}") from error


_MISSING = object()


def _dry_build(train: TrainSection, data: DataSection) -> None:
    kwargs = sft_kwargs(train, data, output_dir="sspeft-recipe-check", has_eval=data.eval_fraction > 0)
    for key in _NOT_DRY:
        kwargs.pop(key, None)
    kwargs["use_cpu"] = True
    _dry_class()(**kwargs)


@functools.cache
def _dry_class() -> type:
    import torch
    from trl import SFTConfig

    class DrySFTConfig(SFTConfig):
        """SFTConfig whose checks run without setting up devices or a process group (no side effects)."""

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

    return DrySFTConfig
