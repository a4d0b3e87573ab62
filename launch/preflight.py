"""Checks the training stage runs before it writes anything: the run directory, the launcher's DeepSpeed config,
and the adapter and sequence length against the model's own shapes (read from its config, weights not loaded).

    from launch.preflight import check_run_dir, check_against_model, adopt_launcher_deepspeed
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from launch.models import context_length, meta_model, model_config
from launch.recipe import Recipe, RecipeError, load_resolved, shown
from launch.rundir import RunDir, RunDirError

log = logging.getLogger("launch.train")


class TrainError(RuntimeError):
    """The training stage cannot start; the message says what to change."""


def zero_stage_of(path: str | None, field: str = "train.deepspeed") -> int | None:
    """The ZeRO stage of a DeepSpeed config file (None without DeepSpeed)."""
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"{field} = {path!r} does not exist; use one of launch/ds_zero2.json, "
                         f"launch/ds_zero3.json or null")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"{field} = {path!r} is not valid JSON: {e}") from e
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None
    if stage not in (0, 1, 2, 3):
        raise TrainError(f"{path}: zero_optimization.stage = {stage!r}; expected 0, 1, 2 or 3")
    return int(stage)


def check_run_dir(recipe: Recipe, run: RunDir) -> bool:
    """Refuse a run directory that is not ours or was made by another recipe; True when it holds only an attempt
    that never completed a checkpoint under a different recipe (that attempt is then discarded and started over)."""
    run.check_usable()
    if recipe.train.resume == "never" and not run.is_fresh():
        raise TrainError(f"train.resume = 'never' but {run.root} is not empty")
    if not run.recipe.is_file():
        return False
    try:
        previous = load_resolved(run.root)
    except RecipeError as e:
        raise TrainError(f"run_dir = {str(run.root)!r} holds a recipe.yaml that launch.train cannot read back "
                         f"({e}); use another run_dir") from e
    changed = recipe.differences(previous)
    if not changed:
        return False
    if not run.holds_progress():
        return True
    old, new = previous.flat(), recipe.flat()
    details = "; ".join(f"{k}: {shown(old.get(k))} -> {shown(new.get(k))}" for k in changed)
    raise TrainError(f"{run.root} was made by a different recipe ({details}). Use another run_dir, or "
                     f"remove the directory to start over")


def adopt_launcher_deepspeed(recipe: Recipe) -> None:
    """Make recipe.train.deepspeed name the DeepSpeed config that will actually run.

    `accelerate launch --config_file launch/accelerate_zero2.yaml` turns DeepSpeed on through environment variables
    whatever the recipe says; its config file becomes train.deepspeed (and so is recorded in recipe.yaml). A
    launcher config that contradicts the recipe, or DeepSpeed/FSDP without a file to record, is an error.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise TrainError("accelerate launch enabled FSDP (distributed_type: FSDP in its config); launch.train "
                         "shards with DeepSpeed ZeRO: use launch/accelerate_zero2.yaml or launch/accelerate_zero3.yaml")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not file or file == "none":
        if recipe.train.deepspeed:
            return  # the recipe's file is what the trainer is given
        raise TrainError("accelerate launch enabled DeepSpeed without a deepspeed_config_file while "
                         "train.deepspeed = null, so nothing would record what runs; set deepspeed_config_file "
                         "in the accelerate config (as launch/accelerate_zero2.yaml does) or set train.deepspeed")
    launcher = str(Path(file).expanduser().resolve())  # relative to the directory accelerate was started in
    zero_stage_of(launcher, field="accelerate's deepspeed_config_file")
    if not recipe.train.deepspeed:
        log.info("train.deepspeed = %s (from the accelerate launch config)", launcher)
        recipe.train.deepspeed = launcher
    elif not _same_json(recipe.train.deepspeed, launcher):
        raise TrainError(f"train.deepspeed = {recipe.train.deepspeed!r} but accelerate launch names another "
                         f"DeepSpeed config ({launcher!r}); name the same file in both, or leave "
                         f"train.deepspeed null")


def _same_json(a: str, b: str) -> bool:
    try:
        return json.loads(Path(a).read_text()) == json.loads(Path(b).read_text())
    except (OSError, ValueError):
        return False


def check_against_model(recipe: Recipe, run: RunDir) -> None:
    """data.max_length within the model's context length, and the adapter's targets and sizes within its layers."""
    config = model_config(recipe.model.path, run.base, recipe.model.revision, recipe.model.trust_remote_code)
    where = f"model.path = {recipe.model.path!r}"
    limit = context_length(config)
    if limit is not None and recipe.data.max_length > limit:
        raise TrainError(f"data.max_length = {recipe.data.max_length} is larger than the context length of "
                         f"{where} (max_position_embeddings = {limit}); expected data.max_length <= {limit}")
    check_pattern(recipe.adapter.options.get("target_modules"))
    try:
        model = meta_model(config, recipe.model.trust_remote_code)
    except Exception as e:  # an architecture transformers cannot build from config alone: training will say more
        log.warning("cannot check the adapter against %s without loading it (%s: %s)", where, type(e).__name__, e)
        return
    if recipe.adapter.method == "lora":
        _check_lora(recipe, model, where)
    else:
        _check_spectral(recipe, model, where)


def check_pattern(targets) -> None:
    """A string target_modules (other than 'all-linear') is a regular expression: it must compile."""
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            raise TrainError(f"adapter.target_modules = {shown(targets)} is not a valid regular expression ({e}); "
                             f"expected a pattern that fully matches module names (e.g. '.*\\.(q_proj|v_proj)'), "
                             f"a list of name suffixes, or 'all-linear'") from e


def _check_spectral(recipe: Recipe, model, where: str) -> None:
    import sspeft
    from sspeft.methods import num_positions
    from sspeft.model import find_targets

    options = dict(recipe.adapter.options)
    options.setdefault("seed", recipe.train.seed)
    cfg = sspeft.SpectralConfig(method=recipe.adapter.method, **options).resolved()
    try:
        for name, module in find_targets(model, cfg).items():
            num_positions(cfg, (module.out_features, module.in_features), name)
    except (ValueError, TypeError) as e:
        message = str(e).replace("SpectralConfig.", "adapter.")
        raise TrainError(f"the adapter does not fit {where}: {message}") from e


def _check_lora(recipe: Recipe, model, where: str) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(task_type="CAUSAL_LM", **recipe.adapter.options)
    try:
        inject_adapter_in_model(config, model, low_cpu_mem_usage=True)
    except (ValueError, TypeError) as e:
        raise TrainError(f"the adapter does not fit {where}: {e}") from e


# ---------------------------------------------------------------- what a resume continues

SMALL_FILE = 4 * 1024**2
"""Model files up to this size (config, tokenizer, template) are hashed whole; larger ones (weights) by name and size,
so fingerprinting an 8B base reads a few MB, not 16 GB."""


def run_fingerprint(recipe: Recipe, records: list) -> dict[str, Any]:
    """What defines a run besides its recipe: the data records as read (content, not file name), the base model's
    files and the DeepSpeed config's contents. Stored in the run directory's marker when training starts."""
    data = hashlib.sha256(json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True).encode())
    return {"data": {"sha256": data.hexdigest()[:16], "records": len(records)},
            "model": {"sha256": _path_digest(recipe.model.path)},
            "deepspeed": {"sha256": _path_digest(recipe.train.deepspeed) if recipe.train.deepspeed else None}}


def _path_digest(spec: str) -> str:
    """A digest of a local file or directory (small files by content, large ones by name and size); a hub id or
    keyword by its name."""
    path = Path(spec)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        h.update(f"spec:{spec}".encode())
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size};".encode())
        if size <= SMALL_FILE:
            h.update(file.read_bytes())
    return h.hexdigest()[:16]


def check_fingerprint(run: RunDir, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume checkpoints trained on other data, another base or another DeepSpeed config, naming what
    changed (the recipe's own keys are compared by check_run_dir)."""
    try:
        recorded = (run.read_marker() or {}).get("fingerprint")
    except RunDirError as e:
        raise TrainError(str(e)) from e
    if not recorded or not run.complete_checkpoints():
        return
    what = {"data": "the records of data.path", "model": "the files of model.path",
            "deepspeed": "the DeepSpeed config train.deepspeed"}
    changed = [f"{what.get(k, k)} ({recorded.get(k)} -> {fingerprint.get(k)})" for k in sorted(set(recorded)
               | set(fingerprint)) if recorded.get(k) != fingerprint.get(k)]
    if changed:
        raise TrainError(f"{run.root} holds checkpoints trained on other inputs: {'; '.join(changed)} changed since "
                         f"training started. Resuming would continue on inputs the checkpoints never saw; restore "
                         f"them, or use another run_dir to start over")


def resume_point(recipe: Recipe, run: RunDir) -> Path | None:
    """The newest complete checkpoint whose files all check out (train.resume = 'auto'); newer damaged ones are
    passed over with a warning naming the file. Complete checkpoints that are all damaged are an error."""
    if recipe.train.resume != "auto" or not run.complete_checkpoints():
        return None
    chosen, skipped = run.resumable_checkpoint()
    for problem in skipped:
        log.warning("passing over a damaged checkpoint: %s", problem)
    if chosen is None:
        raise TrainError(f"no checkpoint in {run.checkpoints} can be resumed: {'; '.join(skipped)}. Restore the "
                         f"file, or use another run_dir to start over")
    return chosen


def check_split(recipe: Recipe, records: list) -> None:
    """data.eval_fraction against the records: the held-out split must leave records on both sides (checked on the
    records, before the model loads)."""
    fraction = recipe.data.eval_fraction
    if fraction > 0:
        held = math.ceil(fraction * len(records))
        if held < 1 or len(records) - held < 1:
            raise TrainError(f"data.eval_fraction = {fraction} holds out {held} of {len(records)} records, leaving "
                             f"{len(records) - held} to train on; expected a fraction that leaves at least one "
                             f"record on each side (at most {(len(records) - 1) / max(len(records), 1):.3f})")
