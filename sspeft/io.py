"""The one adapter format: PEFT's layout, so `save_adapter`, Trainer checkpoints (PEFT's save_pretrained),
`load_adapter` and `PeftModel.from_pretrained` all read and write the same files.

    adapter_config.json        peft_type "SSPEFT", every SpectralConfig field (resolved), per-layer shapes,
                               n and base-weight fingerprints, sspeft version
    adapter_model.safetensors  base_model.model.<module>.sspeft_coefficients  fp32
                               base_model.model.<module>.sspeft_positions     int64 (2, n)

Loading never unpickles and never re-derives positions (SSH/LFMA positions depend on the base weight).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import methods, quant
from .config import SpectralConfig
from .model import _apply_plan, adapted_layers, adapter_config, find_targets

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
        with quant.gathered(coeff):
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


def read_adapter(path: str | os.PathLike) -> tuple[SpectralConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter directory: (config, {module name: tensor}) without touching any model."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f, what in ((cfg_file, "adapter config"), (weights_file, "adapter weights")):
        if not f.is_file():
            raise FileNotFoundError(
                f"{what} {f} does not exist; an sspeft adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                f"(written by sspeft.save_adapter or PeftModel.save_pretrained)"
            )
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_file} is not valid JSON ({exc}); the adapter directory is corrupt") from exc
    if data.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{cfg_file}: peft_type={data.get('peft_type')!r}, expected {PEFT_TYPE!r} (an sspeft adapter)")
    cfg = SpectralConfig.from_saved({k: v for k, v in data.items() if k not in _PEFT_FIELDS}, source=str(cfg_file))
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_file} is not a readable safetensors file ({exc}); the adapter is corrupt") from exc
    return cfg, tensors


def load_adapter(base_model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Inject the adapter saved at ``path`` into ``base_model`` (in place) with its saved positions and coefficients.

    Raises if a saved layer is missing or has another shape; warns when a base weight's fingerprint differs from the
    one recorded at training time (SSH/LFMA positions were chosen from that weight).
    """
    cfg, tensors = read_adapter(path)
    layers = cfg.layers
    if not layers:
        raise ValueError(f"{path}: adapter config records no adapted layer")
    quant.prepare_4bit(base_model)  # before anything dequantizes or runs a forward
    modules = dict(base_model.named_modules())
    targets, plan, mismatched = {}, {}, []
    for name, info in layers.items():
        # a PeftModel base (e.g. LoRA on other modules) holds the user's modules under its own prefix
        key = name if name in modules or KEY_PREFIX + name not in modules else KEY_PREFIX + name
        module = modules.get(key)
        if module is not None and _is_wrapped(module):
            raise ValueError(
                f"{path}: module {name!r} already carries an adapter ({type(module).__name__}); sspeft adapters and "
                "LoRA may sit on different modules of one model, not on the same one"
            )
        if module is None or not quant.is_supported_base(module):
            raise ValueError(
                f"{path}: adapted layer {name!r} does not exist as a Linear layer in the base model "
                f"({type(module).__name__ if module is not None else 'missing'})"
            )
        shape = [module.out_features, module.in_features]
        if shape != list(info["shape"]):
            raise ValueError(
                f"{path}: layer {name!r} was trained on a {info['shape'][0]}×{info['shape'][1]} weight, the base "
                f"model's is {shape[0]}×{shape[1]}; load the adapter onto the base it was trained on"
            )
        try:
            coeff = tensors[f"{KEY_PREFIX}{name}.sspeft_coefficients"]
            positions = tensors[f"{KEY_PREFIX}{name}.sspeft_positions"].long()
        except KeyError as exc:
            raise ValueError(f"{path}: adapter weights lack {exc.args[0]!r}; the adapter file is incomplete") from exc
        _check_layer_tensors(path, name, cfg, shape, info["n"], positions, coeff)
        fp = quant.fingerprint(quant.dense_weight(module))
        if info.get("fingerprint") and fp != info["fingerprint"]:
            mismatched.append(name)
        targets[key] = module
        plan[key] = (positions, coeff, info.get("fingerprint", fp))
    if mismatched:
        warnings.warn(
            f"sspeft: {len(mismatched)} base weight(s) differ from those the adapter at {path} was trained on "
            f"(first: {mismatched[0]!r}); its positions were chosen from the original weights, so results will "
            f"differ. Load the same base (same checkpoint and quantization) to reproduce them.",
            stacklevel=2,
        )
    cfg.layers = {}
    return _apply_plan(base_model, cfg, targets, plan, adapter_name)


def _check_layer_tensors(path, name, cfg, shape, n, positions, coeff) -> None:
    """Shapes, dtypes and position ranges of one saved layer, checked before anything is injected."""
    want = (n, 2) if cfg.method == "lfma" else (n,)
    if tuple(positions.shape) != (2, n) or tuple(coeff.shape) != want:
        raise ValueError(
            f"{path}: layer {name!r} holds {tuple(coeff.shape)} coefficients at {tuple(positions.shape)} positions; "
            f"config says n={n}, so expected {want} coefficients at (2, {n}) positions"
        )
    if not coeff.is_floating_point():
        raise ValueError(f"{path}: layer {name!r} coefficients have dtype {coeff.dtype}; expected a float dtype")
    rows, cols = methods.coefficient_grid(cfg, tuple(shape))
    if n and (positions.min() < 0 or positions[0].max() >= rows or positions[1].max() >= cols):
        raise ValueError(
            f"{path}: layer {name!r} has positions outside its {rows}×{cols} coefficient matrix "
            f"(rows {int(positions[0].min())}..{int(positions[0].max())}, cols {int(positions[1].min())}.."
            f"{int(positions[1].max())}); the adapter file is corrupt"
        )


def _is_wrapped(module: nn.Module) -> bool:
    return hasattr(type(module), "adapter_layer_names")
