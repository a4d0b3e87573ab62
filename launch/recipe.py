"""Typed recipe schema: YAML file + `section.key=value` overrides → a validated, fully resolved Recipe.

    from launch.recipe import load_recipe, load_resolved
    recipe = load_recipe("recipes/demo/smollm2_ssh.yaml", ["train.max_steps=2", "run_dir=/tmp/run"])
    recipe.dump(run.recipe)              # the resolved recipe, absolute paths
    recipe = load_resolved("runs/demo")  # what a later stage reads back

Sections: top-level `name`, `run_dir`; `model`, `adapter`, `data`, `train`, `eval`. `adapter.method` is one of
ssh, lfma, waveft, fourierft, shira, lora; its other keys are the fields of `sspeft.SpectralConfig` (or of PEFT's
`LoraConfig` for lora). `train` holds the fields of TRL's `SFTConfig` under their own names, checked by SFTConfig
itself (see launch/sftconfig.py for the keys the pipeline owns). Relative paths in the file resolve against the file's directory, relative paths in
overrides against the current directory; both are stored absolute. Files are not required to exist here (a
recipe may name cluster paths); each stage checks what it needs when it starts.

The schema itself (the sections, Recipe, RecipeError) is launch.schema; its names are re-exported here.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from launch.credentials import refusal
from launch.rundir import RunDir
from launch.schema import (SECTIONS, AdapterSection, DataSection, EvalSection, ModelSection,  # noqa: F401
                           Recipe, RecipeError, TrainSection, shown, unknown_key)  # (the schema, re-exported)

# PEFT bookkeeping fields that a recipe must not set (the trainer fills them in)
_LORA_INTERNAL = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                  "revision", "inference_mode", "runtime_config"}

MAX_YAML_NODES = 100_000
"""The most values a recipe (or an override) may hold once YAML aliases are expanded: real recipes hold ~100; an
alias bomb ("billion laughs") parses into a small shared graph that anything walking it (a repr in a message, a
deep copy, a YAML dump) would expand until memory runs out."""
MAX_YAML_DEPTH = 50
"""The deepest nesting a recipe value may have (real recipes: 3)."""


def load_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand to more than MAX_YAML_NODES values or nest deeper
    than MAX_YAML_DEPTH (measured on the loaded graph, counting each shared node by its expanded size, never
    expanding it)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from e
    except RecursionError:
        raise RecipeError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels; expected a recipe") from None
    size = _expanded_size(value, {}, 0, source)
    if size > MAX_YAML_NODES:
        raise RecipeError(f"{source}: expands to more than {MAX_YAML_NODES} values through YAML aliases "
                          f"(&anchor/*alias); expected at most {MAX_YAML_NODES}. Write the values out instead of "
                          f"nesting aliases")
    return value


def _expanded_size(value: Any, sizes: dict[int, int], depth: int, source: str) -> int:
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key in sizes:
        if sizes[key] < 0:
            raise RecipeError(f"{source}: a YAML alias refers to a value that contains it (a recursive structure); "
                              f"expected plain nested values")
        return sizes[key]
    if depth > MAX_YAML_DEPTH:
        raise RecipeError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels; expected a recipe")
    sizes[key] = -1
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += _expanded_size(item, sizes, depth + 1, source)
        if total > MAX_YAML_NODES:
            break  # big enough to refuse; no need to count the rest
    sizes[key] = total
    return total


_TOP_LEVEL = ("name", "run_dir")
# (section, key) of path-valued fields resolved against the recipe file
_PATH_FIELDS = {("", "run_dir"), ("model", "path"), ("data", "path"), ("train", "deepspeed"),
                ("eval", "questions"), ("eval", "references"), ("eval", "judge")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KEYWORDS = {"smollm2"}


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides, validate, and resolve paths to absolute."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {e}") from e
    raw = load_yaml(text, str(path))
    if raw is None:
        raise RecipeError(f"{path}: the file is empty ({path.stat().st_size} bytes, no YAML document); expected a "
                          f"mapping of sections (model, adapter, data, train, eval)")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    base = path.resolve().parent

    def build(items) -> Recipe:
        resolved = _resolve_paths(copy.deepcopy(raw), base)  # overrides write into the sections
        for item in items:
            _apply_override(resolved, item)
        return _build(resolved, str(path))

    try:
        return build(overrides)
    except RecipeError as e:
        raise _blame(e, str(path), overrides, build) from None


def _blame(error: RecipeError, source: str, overrides, build) -> RecipeError:
    """The error with its source: the first override after which it appears (`FILE, override 'k=v': ...`), else
    the file alone.
    Found by rebuilding with the overrides one at a time (only on this error path; a build is validation only)."""
    message, prefix = str(error), f"{source}: "
    if not overrides or not message.startswith(prefix):
        return error
    for i in range(len(overrides) + 1):
        try:
            build(overrides[:i])
        except RecipeError as e:
            if str(e) == message:
                return error if i == 0 else RecipeError(f"{source}, override {shown(overrides[i - 1])}: "
                                                        f"{message[len(prefix):]}")
    return error


def load_resolved(run_dir: str | os.PathLike[str]) -> Recipe:
    """The resolved recipe a run directory was made with (run_dir/recipe.yaml)."""
    run = RunDir(run_dir)
    if not run.recipe.is_file():
        raise RecipeError(f"{run.recipe} does not exist: {run.root} was not made by `python -m launch.train`")
    return load_recipe(run.recipe)


def parse_override(item: str) -> tuple[str, str, Any]:
    """'section.key=value' → (section, key, YAML-parsed value); top-level keys give section ''."""
    if "=" not in item:
        raise RecipeError(f"override {shown(item)} must look like section.key=value (e.g. train.max_steps=10)")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) == 1 and parts[0] in _TOP_LEVEL:
        section, key = "", parts[0]
    elif len(parts) == 2 and all(parts):
        section, key = parts
    else:
        raise RecipeError(f"override {shown(item)}: the key must be section.key or one of {list(_TOP_LEVEL)}")
    value = load_yaml(text, f"override {shown(item)}: value") if text.strip() else ""
    return section, key, value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    section, key, value = parse_override(item)
    if (section, key) in _PATH_FIELDS:
        value = _resolve_one(section, key, value, Path.cwd())
    if not section:
        raw[key] = value
        return
    if section not in SECTIONS:
        raise RecipeError(unknown_key(f"override {shown(item)}", "section", section, list(SECTIONS)))
    target = raw.setdefault(section, {})
    if target is None:
        target = raw[section] = {}
    target[key] = value


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(raw)
    for section, key in _PATH_FIELDS:
        holder = out if not section else out.get(section)
        if isinstance(holder, dict) and key in holder:
            if section:
                holder = out[section] = dict(holder)
            holder[key] = _resolve_one(section, key, holder[key], base)
    return out


def _resolve_one(section: str, key: str, value: Any, base: Path) -> Any:
    """Make a path-valued field absolute; hub ids, keywords and judge API specs stay as they are."""
    if not isinstance(value, str) or not value:
        return value
    if (section, key) == ("eval", "judge"):
        problem = refusal("eval.judge", value)
        if problem:
            raise RecipeError(problem)
        prefix, sep, rest = value.partition(":")
        if sep and prefix in ("local", "serve") and rest:
            return f"{prefix}:{_resolve_one('', 'path', rest, base)}"
        if not sep and (value.startswith(".") or value.endswith(".gguf")):
            return _resolve_one("", "path", value, base)  # a bare path means local:PATH
        return value
    if value in _KEYWORDS:
        return value
    expanded = Path(value).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    candidate = base / expanded
    looks_like_file = value.startswith(".") or Path(value).suffix in {".json", ".jsonl", ".gguf", ".yaml"}
    if candidate.exists() or looks_like_file or not _HUB_ID.match(value) or (section, key) in {("", "run_dir"),
                                                                                             ("train", "deepspeed")}:
        return str(Path(os.path.normpath(candidate)))
    return value  # a hub id such as meta-llama/Llama-3.1-8B


def _build(raw: dict[str, Any], source: str) -> Recipe:
    allowed = list(_TOP_LEVEL) + list(SECTIONS)
    for key in raw:
        if key not in allowed:
            raise RecipeError(unknown_key(source, "top-level key", key, allowed))
    recipe = Recipe()
    for key in _TOP_LEVEL:
        if key in raw:
            setattr(recipe, key, _check_type(source, key, raw[key], str))
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise RecipeError(f"{source}: section {section!r} must be a mapping, got {shown(values)}")
        if cls is AdapterSection:
            recipe.adapter = _build_adapter(values, source)
        elif cls is TrainSection:
            continue  # after model and data: some SFTConfig keys are checked against them
        else:
            setattr(recipe, section, _build_section(cls, section, values, source))
    recipe.train = _build_train(raw.get("train") or {}, raw.get("data") or {}, recipe, source)
    _check_combinations(recipe, source)
    from launch import sftconfig

    sftconfig.validate(recipe.train, recipe.data, source)  # SFTConfig's own checks, without touching devices
    return recipe


def _build_train(values: dict[str, Any], data_values: dict[str, Any], recipe: Recipe, source: str) -> TrainSection:
    """The train section: SFTConfig's fields under their own names, validated by SFTConfig itself."""
    from launch import sftconfig

    hints = typing.get_type_hints(TrainSection)
    fields = {f.name for f in dataclasses.fields(TrainSection)} - {"options"}
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in values.items():
        sftconfig.check_key(key, source)
        if key in sftconfig.DATA_KEYS:
            # SFTConfig's max_length/packing shape the tokenized data, so they are stored in the data section
            if key in data_values and data_values[key] != value:
                raise RecipeError(f"{source}: train.{key} = {shown(value)} contradicts data.{key} = "
                                  f"{shown(data_values[key])}; set one of them")
            hint = typing.get_type_hints(DataSection)[key]
            setattr(recipe.data, key, _check_type(source, f"train.{key}", value, hint))
        elif key in fields:
            kwargs[key] = _check_type(source, f"train.{key}", value, hints[key])
        else:
            options[key] = _check_option(source, f"train.{key}", value, sftconfig.sft_fields()[key])
    sftconfig.check_report_to(kwargs.get("report_to", TrainSection.report_to), source)
    sftconfig.check_precision(options, recipe.model.dtype, source)
    return TrainSection(**kwargs, options=options)


def _check_option(source: str, key: str, value: Any, hint: Any) -> Any:
    """Type-check an SFTConfig field the recipe sets (integers stay integers: TrainingArguments reads some float
    fields, such as save_steps, as step counts when they are whole)."""
    return _check_type(source, key, value, hint, ints_to_float=False)


def _build_section(cls: type, section: str, values: dict[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise RecipeError(unknown_key(source, f"key in section {section!r}", key, names, prefix=section))
        kwargs[key] = _check_type(source, f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def methods() -> tuple[str, ...]:
    """The values adapter.method accepts: sspeft's methods, then PEFT's LoRA (imports sspeft, hence torch)."""
    import sspeft

    return (*sspeft.METHODS, "lora")


def _build_adapter(values: dict[str, Any], source: str) -> AdapterSection:
    method = values.get("method", AdapterSection.method)
    if method not in methods():
        raise RecipeError(f"{source}: adapter.method = {shown(method)} is not a known method; expected one of "
                          f"{list(methods())}")
    options = {k: v for k, v in values.items() if k != "method"}
    valid = adapter_fields(method)
    for key in options:
        if key not in valid:
            raise RecipeError(unknown_key(source, f"key in section 'adapter' for method {method!r}", key,
                                       sorted(valid), prefix="adapter"))
    _validate_adapter_values(method, options, source)
    return AdapterSection(method=method, options=options)


def _validate_adapter_values(method: str, options: dict[str, Any], source: str) -> None:
    """Build the library's own config once, so bad values fail here with its message."""
    try:
        if method == "lora":
            import peft

            peft.LoraConfig(task_type="CAUSAL_LM", **options)
        else:
            import sspeft

            sspeft.SpectralConfig(method=method, **options)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{source}: adapter section invalid for method {method!r}: {e}") from e


def adapter_fields(method: str) -> set[str]:
    """Keys a recipe may set for `method` (besides `method`): SpectralConfig's or LoraConfig's fields."""
    if method == "lora":
        import peft

        return {f.name for f in dataclasses.fields(peft.LoraConfig)} - _LORA_INTERNAL
    import sspeft

    if not hasattr(sspeft, "SpectralConfig"):
        raise RecipeError("the installed sspeft package has no SpectralConfig; reinstall the project (pip install -e .)")
    params = inspect.signature(sspeft.SpectralConfig).parameters
    # `layers` and `version` are filled in by the library when it injects
    return {name for name in params if name not in ("method", "layers", "version")}


SEED_RANGE = (0, 2**32 - 1)
"""What numpy's and torch's seeding accept (the trainer seeds both)."""


def _check_combinations(recipe: Recipe, source: str) -> None:
    train, model, data = recipe.train, recipe.model, recipe.data
    for key, value in recipe.flat().items():  # every number, SFTConfig's own fields included
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{source}: {key} = {value} is not a finite number; expected a finite value")
    for key, value in {"train.seed": train.seed, "eval.seed": recipe.eval.seed}.items():
        if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise RecipeError(f"{source}: {key} = {value} is out of range; expected an integer in "
                              f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    positive = {"train.per_device_train_batch_size": train.per_device_train_batch_size,
                "train.gradient_accumulation_steps": train.gradient_accumulation_steps,
                "train.save_steps": train.save_steps, "train.logging_steps": train.logging_steps,
                "data.max_length": data.max_length, "eval.max_new_tokens": recipe.eval.max_new_tokens,
                "eval.judge_max_new_tokens": recipe.eval.judge_max_new_tokens, "eval.samples": recipe.eval.samples}
    for key, value in positive.items():
        if value <= 0:
            raise RecipeError(f"{source}: {key} = {value} must be a positive integer")
    if train.max_steps == 0 or train.max_steps < -1:
        raise RecipeError(f"{source}: train.max_steps = {train.max_steps} must be positive or -1 (use "
                          f"num_train_epochs)")
    if train.max_steps == -1 and train.num_train_epochs <= 0:
        raise RecipeError(f"{source}: train.num_train_epochs = {train.num_train_epochs} must be > 0 when "
                          f"train.max_steps is -1")
    if train.warmup_steps < 0 or (isinstance(train.warmup_steps, float) and 1 <= train.warmup_steps
                                  and train.warmup_steps != int(train.warmup_steps)):
        raise RecipeError(f"{source}: train.warmup_steps = {train.warmup_steps} must be an integer number of steps "
                          f"or a fraction in [0, 1)")
    if data.eval_fraction == 0 and train.options.get("eval_strategy", "no") != "no":
        raise RecipeError(f"{source}: train.eval_strategy = {shown(train.options['eval_strategy'])} needs held-out "
                          f"data; set data.eval_fraction > 0 or drop train.eval_strategy")
    for key, value in {"data.eval_fraction": data.eval_fraction,
                       "eval.max_failure_rate": recipe.eval.max_failure_rate}.items():
        if not 0.0 <= value < 1.0 and not (key == "eval.max_failure_rate" and value == 1.0):
            raise RecipeError(f"{source}: {key} = {value} must lie in [0, 1)")
    for key, value in {"data.limit": data.limit, "eval.limit": recipe.eval.limit}.items():
        if value is not None and value <= 0:
            raise RecipeError(f"{source}: {key} = {value} must be a positive integer or null")
    if train.learning_rate <= 0:
        raise RecipeError(f"{source}: train.learning_rate = {train.learning_rate} must be > 0")
    if train.max_steps == 1 and _warmup_steps(train.warmup_steps, 1) >= 1:
        raise RecipeError(f"{source}: train.warmup_steps = {train.warmup_steps} makes the only step of "
                          f"train.max_steps = 1 a warmup step at learning rate 0, so the adapter would not change; "
                          f"expected train.warmup_steps = 0 or train.max_steps > 1")
    if train.deepspeed and model.device_map:
        raise RecipeError(f"{source}: model.device_map = {shown(model.device_map)} cannot be combined with "
                          f"train.deepspeed (DeepSpeed places and partitions the weights itself); set "
                          f"model.device_map to null")
    if not recipe.name or "/" in recipe.name:
        raise RecipeError(f"{source}: name = {shown(recipe.name)} must be a non-empty name without '/'")


def _warmup_steps(warmup: int | float, total: int) -> int:
    """Warmup steps as transformers counts them: a float below 1 is a fraction of the steps, rounded up."""
    return math.ceil(warmup * total) if isinstance(warmup, float) and warmup < 1 else int(warmup)


def _check_type(source: str, key: str, value: Any, hint: Any, ints_to_float: bool = True) -> Any:
    """`value` checked against the type `hint`; numbers written like 1e-3 (a YAML string) become floats, and with
    `ints_to_float` an integer given for a float-only field becomes a float."""
    union = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else ()
    wants_float = hint is float or float in union
    if wants_float and isinstance(value, str):
        # PyYAML reads 1e-3 (no dot) as a string; users write it that way
        try:
            value = float(value)
        except ValueError:
            pass
    ok, expected = _matches(value, hint)
    if not ok:
        raise RecipeError(f"{source}: {key} = {shown(value)} has the wrong type; expected {expected}")
    if ints_to_float and wants_float and int not in union and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _matches(value: Any, hint: Any) -> tuple[bool, str]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return value in choices, f"one of {list(choices)}"
    if origin in (Union, types.UnionType):
        results = [_matches(value, h) for h in typing.get_args(hint)]
        return any(ok for ok, _ in results), " or ".join(e for _, e in results)
    if hint is type(None):
        return value is None, "null"
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if hint is str:
        return isinstance(value, str), "a string"
    return True, str(hint)
