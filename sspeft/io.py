"""The one adapter format: PEFT's layout, so `save_adapter`, Trainer checkpoints (PEFT's save_pretrained),
`load_adapter` and `PeftModel.from_pretrained` all read and write the same files.

    adapter_config.json        peft_type "SSPEFT", every SpectralConfig field (resolved), per-layer shapes,
                               n and base-weight fingerprints, sspeft version
    adapter_model.safetensors  base_model.model.<module>.sspeft_coefficients  fp32
                               base_model.model.<module>.sspeft_positions     int64 (2, n)

Loading never unpickles, and the saved positions are the ones used (SSH/LFMA positions depend on the base weight):
`load_adapter` and `PeftModel.from_pretrained` (see peft_tuner.py) read the directory with `read_adapter` and build
each recorded layer from its saved positions and coefficients through `saved_layers`; nothing is chosen again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import methods, weights
from .config import SpectralConfig
from .layer import SpectralLinear
from .model import adapted_layers, adapter_config, already_adapted, apply_plan, is_adapter_layer, warn_base_mismatch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "SSPEFT"
KEY_PREFIX = "base_model.model."
# PEFT's own config fields that may appear in the JSON next to ours.
_PEFT_FIELDS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "sspeft_format",
}


def _config_json(cfg: SpectralConfig, base_name: str | None) -> dict:
    """The JSON PEFT's save_pretrained writes for the same adapter (same keys), so either front end reads it."""
    data = cfg.to_dict()
    data.update(
        peft_type=PEFT_TYPE, task_type="CAUSAL_LM", base_model_name_or_path=base_name or None, revision=None,
        inference_mode=True, auto_mapping=None,
    )
    peft = sys.modules.get("peft")  # imported by `import sspeft` when installed; never imported here
    if peft is not None:
        data["peft_version"] = peft.__version__
    return data


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the adapter of ``model`` (sspeft-injected or a PeftModel) to directory ``path``, atomically."""
    path = Path(path)
    if _is_sspeft_peft_model(model):
        model.save_pretrained(str(path))
        return path
    # sspeft.inject'ed layers, possibly inside a PeftModel that carries another method (LoRA on other modules): names
    # are saved as in the user's model, without PeftModel's prefix, so the adapter loads onto the plain base.
    cfg = adapter_config(model, adapter_name)
    cfg = dataclasses.replace(cfg, layers={_user_name(k): v for k, v in cfg.layers.items()})
    tensors = {}
    for full_name, layer in adapted_layers(model).items():
        name = _user_name(full_name)
        a = adapter_name or layer.active_adapter
        coeff = layer.sspeft_coefficients[a]
        with weights.gathered(coeff):
            tensors[f"{KEY_PREFIX}{name}.sspeft_coefficients"] = coeff.detach().float().cpu().contiguous().clone()
        tensors[f"{KEY_PREFIX}{name}.sspeft_positions"] = layer.sspeft_positions[a].detach().long().cpu().contiguous()
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "sspeft_method": cfg.method})
    (tmp / CONFIG_NAME).write_text(json.dumps(_config_json(cfg, base_name), indent=2, sort_keys=True))
    if path.exists():
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            os.replace(tmp / f, path / f)
        tmp.rmdir()
    else:
        os.replace(tmp, path)
    return path


def _is_sspeft_peft_model(model: nn.Module) -> bool:
    """A PeftModel whose adapters are sspeft's (PEFT's save_pretrained writes our format); False for LoRA & co."""
    configs = getattr(model, "peft_config", None)
    return (
        hasattr(model, "save_pretrained") and isinstance(configs, dict) and bool(configs)
        and all(getattr(c, "peft_type", None) == PEFT_TYPE for c in configs.values())
    )


def _user_name(name: str) -> str:
    return name.removeprefix(KEY_PREFIX)


class AdapterFileError(ValueError):
    """An adapter directory that cannot be loaded as it is; the message names the file and the entry."""


class AdapterNotFoundError(AdapterFileError, FileNotFoundError):
    """The adapter directory lacks one of its two files."""


def read_adapter(path: str | os.PathLike) -> tuple[SpectralConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter directory: (config, {module name: tensor}) without touching any model."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f, what in ((cfg_file, "adapter config"), (weights_file, "adapter weights")):
        if not f.is_file():
            raise AdapterNotFoundError(
                f"{what} {f} does not exist; an sspeft adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(written by sspeft.save_adapter or PeftModel.save_pretrained)"
            )
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{cfg_file} is not valid JSON ({exc}); the adapter directory is corrupt") from exc
    cfg = config_from_json(data, cfg_file)
    if not cfg.layers:
        raise AdapterFileError(f"{cfg_file}: field 'layers' is empty; expected the adapted modules with their "
                               "shapes (written when the adapter is saved)")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(
            f"{weights_file} is not a readable safetensors file ({exc}); the adapter is corrupt"
        ) from exc
    check_adapter(cfg, tensors, weights_file)
    return cfg, tensors


def config_from_json(data: object, source: str | os.PathLike) -> SpectralConfig:
    """The SpectralConfig of an adapter_config.json's content; every entry the loader uses checked for its type."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: holds a JSON {type(data).__name__}; expected an object")
    if data.get("peft_type") != PEFT_TYPE:
        raise AdapterFileError(
            f"{source}: peft_type={data.get('peft_type')!r}, expected {PEFT_TYPE!r} (an sspeft adapter)"
        )
    values = {k: v for k, v in data.items() if k not in _PEFT_FIELDS}
    for f in dataclasses.fields(SpectralConfig):
        if f.name in values and f.name != "layers":
            _check_json_type(source, f.name, values[f.name], str(f.type))
    _check_layer_entries(source, values.get("layers", {}))
    try:
        return SpectralConfig.from_saved(values, source=str(source))
    except (TypeError, ValueError) as exc:
        message = str(exc)
        raise AdapterFileError(message if message.startswith(str(source)) else f"{source}: {message}") from exc


_JSON_TYPES = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


def _check_json_type(source, name: str, value, annotation: str) -> None:
    """A field's JSON value against its annotation (`int | None`, `list[str] | str`, ...); others pass unchecked."""
    options = [a.strip() for a in annotation.split("|")]
    if not all(o in _JSON_TYPES for o in options):
        return
    if not any(_JSON_TYPES[o](value) for o in options):
        expected = " or ".join("null" if o == "None" else ("a finite number" if o == "float" else o) for o in options)
        raise AdapterFileError(f"{source}: field {name!r} is {value!r}; expected {expected}")


def _check_layer_entries(source, layers) -> None:
    """`layers` maps module names to {"shape": [out, in], "n": count, "fingerprint": str, ...}."""
    if not isinstance(layers, dict):
        raise AdapterFileError(
            f"{source}: field 'layers' is a {type(layers).__name__}; expected an object mapping each adapted "
            'module name to {"shape": [out, in], "n": ...}'
        )
    for name, info in layers.items():
        where = f"{source}: layers[{name!r}]"
        if not isinstance(info, dict):
            raise AdapterFileError(f"{where} is {info!r}; expected an object with 'shape' and 'n'")
        shape = info.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_JSON_TYPES["int"](d) and d > 0 for d in shape)):
            raise AdapterFileError(f"{where}.shape is {shape!r}; expected [out_features, in_features], two "
                                   "positive integers")
        n = info.get("n")
        if not (_JSON_TYPES["int"](n) and n >= 0):
            raise AdapterFileError(f"{where}.n is {n!r}; expected a non-negative integer (positions in the layer)")
        fp = info.get("fingerprint")
        if fp is not None and not isinstance(fp, str):
            raise AdapterFileError(f"{where}.fingerprint is {fp!r}; expected a string")


def check_adapter(cfg: SpectralConfig, tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Every recorded layer has both tensors with their recorded shapes, valid positions and finite coefficients,
    and no tensor belongs to an unrecorded layer. The one check every load route runs (sspeft.load_adapter,
    sspeft.read_adapter, PeftModel.from_pretrained/load_adapter, Trainer resumes)."""
    _check_layer_entries(source, cfg.layers)
    if not cfg.layers:
        raise AdapterFileError(f"{source}: the adapter config records no adapted layer")
    suffixes = (".sspeft_coefficients", ".sspeft_positions")
    recorded = {f"{KEY_PREFIX}{name}{s}" for name in cfg.layers for s in suffixes}
    stray = sorted(k for k in tensors if k not in recorded)
    if stray:
        raise AdapterFileError(
            f"{source}: holds tensor {stray[0]!r} that the adapter config's layers do not record "
            f"({len(stray)} such tensor(s)); expected only <module>.sspeft_coefficients and "
            "<module>.sspeft_positions of the recorded layers"
        )
    for name, info in cfg.layers.items():
        missing = [KEY_PREFIX + name + s for s in suffixes if KEY_PREFIX + name + s not in tensors]
        if missing:
            raise AdapterFileError(f"{source}: lacks tensor {missing[0]!r} of recorded layer {name!r}; the "
                                   "adapter file is incomplete")
        problem = methods.tensor_problem(cfg, tuple(info["shape"]), info["n"],
                                         tensors[f"{KEY_PREFIX}{name}.sspeft_positions"],
                                         tensors[f"{KEY_PREFIX}{name}.sspeft_coefficients"])
        if problem is not None:
            raise AdapterFileError(f"{source}: layer {name!r} {problem}")


def load_adapter(base_model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Inject the adapter saved at ``path`` into ``base_model`` (in place) with its saved positions and coefficients.

    Raises if a saved layer is missing or has another shape; warns when a base weight's fingerprint differs from the
    one recorded at training time (SSH/LFMA positions were chosen from that weight).
    """
    cfg, tensors = read_adapter(path)
    weights.prepare_4bit(base_model)  # before anything dequantizes or runs a forward
    targets, plan, mismatched = saved_layers(cfg, tensors, base_model, path)
    if mismatched:
        warn_base_mismatch(mismatched, f"at {path}", stacklevel=2)
    cfg.layers = {}  # recorded again as each layer is built
    return apply_plan(base_model, cfg, targets, plan, adapter_name)


def saved_layers(
    cfg: SpectralConfig, tensors: dict[str, torch.Tensor], model: nn.Module, source: str | os.PathLike,
    onto_spectral: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, tuple[torch.Tensor, torch.Tensor, str]], list[str]]:
    """The layers of a saved adapter (``cfg`` and ``tensors`` as `read_adapter` returns them) on ``model``: shared
    by `load_adapter` and the PEFT tuner, so both build the same layers.

    Returns ({module name in ``model``: base Linear}, {module name: (saved positions, saved coefficients, recorded
    fingerprint)}, [recorded names whose base weight has another fingerprint]). A recorded name is looked up as it
    is and under PeftModel's prefix (a PeftModel base carrying LoRA on other modules). Every recorded layer must be
    an unadapted Linear of the recorded shape (with ``onto_spectral``, a layer carrying sspeft adapters adds one
    more, as PEFT's multi-adapter API does); nothing is chosen or initialised: the saved tensors are the adapter.
    """
    modules = dict(model.named_modules())
    targets, plan, mismatched = {}, {}, []
    for name, info in cfg.layers.items():
        key = name if name in modules or KEY_PREFIX + name not in modules else KEY_PREFIX + name
        module = modules.get(key)
        if onto_spectral and isinstance(module, SpectralLinear):
            module = module.base_layer
        elif module is not None and is_adapter_layer(module):
            raise ValueError(f"{source}: {already_adapted(name, module)}")
        if module is None or not weights.is_supported_base(module):
            raise ValueError(
                f"{source}: adapted layer {name!r} does not exist as a Linear layer in the base model "
                f"({type(module).__name__ if module is not None else 'missing'})"
            )
        shape = [module.out_features, module.in_features]
        if shape != list(info["shape"]):
            raise ValueError(
                f"{source}: layer {name!r} was trained on a {info['shape'][0]}×{info['shape'][1]} weight, the base "
                f"model's is {shape[0]}×{shape[1]}; load the adapter onto the base it was trained on"
            )
        coeff = tensors[f"{KEY_PREFIX}{name}.sspeft_coefficients"]
        positions = tensors[f"{KEY_PREFIX}{name}.sspeft_positions"].long()
        fp = weights.fingerprint(weights.dense_weight(module))
        if info.get("fingerprint") and fp != info["fingerprint"]:
            mismatched.append(name)
        targets[key] = module
        plan[key] = (positions, coeff, info.get("fingerprint", fp))
    return targets, plan, mismatched
