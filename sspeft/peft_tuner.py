"""sspeft as a PEFT tuner (peft_type "SSPEFT"), so transformers' Trainer and TRL's SFTTrainer accept a model with
sspeft adapters on a 4-bit base, and `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained` and
`merge_and_unload` work. One PEFT type serves all five methods (the method is a config field), under a name of our
own that never collides with PEFT's FOURIERFT/SHIRA/WAVEFT.

PEFT's `register_peft_method` accepts only names in its closed `PeftType` enum; `_extend_peft_type` adds ours. That
relies on PEFT internals: the supported PEFT range is pinned below and tests/test_sspeft_peft.py fails loudly if it
stops working. Loading a saved adapter with PEFT needs `import sspeft` first.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import field
from typing import Any

import peft
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType

from . import methods, weights
from .config import SpectralConfig
from .io import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, check_adapter, config_from_json, read_adapter
from .layer import SpectralLinear
from .model import already_adapted, find_targets, plan_positions, record_layer, warn_base_mismatch

PEFT_TYPE_NAME = "SSPEFT"
SUPPORTED_PEFT = ((0, 21), (0, 22))  # [lower, upper)


def _extend_peft_type() -> None:
    if PEFT_TYPE_NAME in PeftType.__members__:
        return
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)


_SPECTRAL_FIELDS = [f for f in dataclasses.fields(SpectralConfig)]


def _peft_field(f: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
    if f.name == "method":
        return (f.name, str, field(default="ssh"))
    if f.default is not dataclasses.MISSING:
        return (f.name, f.type, field(default=f.default))
    return (f.name, f.type, field(default_factory=f.default_factory))


SspeftPeftConfig = dataclasses.make_dataclass(
    "SspeftPeftConfig", [_peft_field(f) for f in _SPECTRAL_FIELDS], bases=(PeftConfig,), namespace={}
)


def _post_init(self) -> None:
    PeftConfig.__post_init__(self)
    self.peft_type = PeftType.SSPEFT
    spectral = self.spectral(resolve=False)  # validates every field with SpectralConfig's messages
    self.target_modules = spectral.target_modules


def _spectral(self, resolve: bool = True) -> SpectralConfig:
    values = {f.name: getattr(self, f.name) for f in _SPECTRAL_FIELDS}
    if isinstance(values["target_modules"], (set, tuple)):
        values["target_modules"] = sorted(values["target_modules"])
    cfg = SpectralConfig(**values)
    return cfg.resolved() if resolve else cfg


def _from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
    # A local adapter directory is validated as a whole (config entries and every tensor) before PEFT builds
    # anything from it; a Hub download is checked by `_check_kwargs` and, tensor by tensor, by the tuner's
    # load_state_dict hook.
    path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
    if os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        read_adapter(path)
    return PeftConfig.from_pretrained.__func__(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


def _check_kwargs(cls, **kwargs):
    config_from_json(kwargs, CONFIG_NAME)
    # fields an older file left out are filled in as they were when it was written (see SpectralConfig.saved_fields)
    return SpectralConfig.saved_fields(kwargs)


SspeftPeftConfig.__post_init__ = _post_init
SspeftPeftConfig.spectral = _spectral
SspeftPeftConfig.from_pretrained = classmethod(_from_pretrained)
SspeftPeftConfig.check_kwargs = classmethod(_check_kwargs)
SspeftPeftConfig.__doc__ = "PEFT config for sspeft adapters: SpectralConfig's fields plus PEFT's own."
SspeftPeftConfig.__module__ = __name__


class PeftSpectralLinear(SpectralLinear, BaseTunerLayer):
    """SpectralLinear as a PEFT tuner layer (same attributes; PEFT's adapter switching applies)."""


class SspeftTuner(BaseTuner):
    prefix: str = "sspeft_"
    tuner_layer_cls = PeftSpectralLinear
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("SspeftPeftConfig.target_modules is None; name the modules to adapt, e.g. ['q_proj', 'v_proj']")
        return peft_config

    def _prepare_model(self, peft_config, model):
        # Before anything dequantizes or runs a forward: every Linear4bit of the model, adapted or not (gradients
        # flow back through the frozen ones too), gets bitsandbytes' AVX512-BF16 CPU repack switched off.
        weights.prepare_4bit(model)

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        # Per-adapter state for _create_and_replace: the resolved config, SSH's global-budget plan (it ranks all
        # target layers together, so it cannot be made one layer at a time) and fingerprint mismatches (warned once).
        peft_config = self.peft_config[adapter_name]
        weights.prepare_4bit(model)
        cfg = peft_config.spectral()
        plan = {}
        if cfg.budget == "global" and not peft_config.layers:
            plan = plan_positions(cfg, find_targets(model, cfg))
        state = {"cfg": cfg, "plan": plan, "mismatched": []}
        self.__dict__.setdefault("_sspeft_state", {})[adapter_name] = state
        if not self.__dict__.get("_sspeft_load_check"):
            self.register_load_state_dict_pre_hook(_check_loaded_state)
            self.__dict__["_sspeft_load_check"] = True
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if state["mismatched"]:
            warn_base_mismatch(state["mismatched"], repr(adapter_name), stacklevel=3)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        state = self._sspeft_state[adapter_name]
        cfg = state["cfg"]
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(target, BaseTunerLayer) and not isinstance(target, SpectralLinear):
            raise ValueError(already_adapted(current_key, target))
        if not weights.is_supported_base(base):
            raise TypeError(f"sspeft adapts nn.Linear and bitsandbytes Linear4bit, not {type(base).__name__} ({current_key})")
        weights.prepare_4bit(base)
        recorded = (peft_config.layers or {}).get(current_key)
        if current_key in state["plan"]:
            positions, coefficients, fp = state["plan"][current_key]
        else:
            # Loading (recorded layers): positions are re-derived here only to build the layer; PEFT then loads the
            # saved positions and coefficients over them.
            weight = weights.dense_weight(base)
            positions = methods.select_positions(cfg, weight, current_key, recorded["n"] if recorded else None)
            coefficients = methods.init_coefficients(cfg, weight, positions, current_key)
            fp = weights.fingerprint(weight)
        if recorded and recorded.get("fingerprint"):
            if recorded["fingerprint"] != fp:
                state["mismatched"].append(current_key)
            fp = recorded["fingerprint"]  # the saved positions belong to the base they were chosen on
        record_layer(cfg, current_key, base, positions, fp)
        peft_config.layers = dict(cfg.layers)
        for key in ("n", "scaling", "normalization", "init", "init_scale", "shared_positions", "version"):
            setattr(peft_config, key, getattr(cfg, key))
        if isinstance(target, SpectralLinear):
            target.add_adapter(adapter_name, cfg, positions, coefficients)
            return
        new = PeftSpectralLinear(base, adapter_name, cfg, positions, coefficients)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)


def _check_loaded_state(tuner, state_dict, prefix, *_args) -> None:
    """load_state_dict pre-hook: the sspeft tensors of every adapter being loaded pass `check_adapter` (all present,
    recorded shapes, valid positions, finite coefficients) before PEFT copies any of them into the model."""
    names = ("sspeft_coefficients", "sspeft_positions")
    parts = [k.rsplit(".", 2) for k in state_dict if k.startswith(prefix)]
    loading = {p[2] for p in parts if len(p) == 3 and p[1] in names}
    for adapter in sorted(loading & set(tuner.peft_config)):
        cfg = tuner.peft_config[adapter].spectral(resolve=False)
        layers = {name: m for name, m in tuner.model.named_modules()
                  if isinstance(m, SpectralLinear) and adapter in m.sspeft_coefficients}
        cfg.layers = {name: {"shape": [m.out_features, m.in_features],
                             "n": int(m.sspeft_positions[adapter].shape[1])} for name, m in layers.items()}
        tensors = {}
        for key, value in state_dict.items():
            for what in names:
                head, tail = f"{prefix}model.", f".{what}.{adapter}"
                if key.startswith(head) and key.endswith(tail):
                    tensors[f"{KEY_PREFIX}{key[len(head):-len(tail)]}.{what}"] = value
        check_adapter(cfg, tensors, f"adapter weights of {adapter!r}")


def peft_config(cfg: SpectralConfig, task_type: str | None = "CAUSAL_LM", **peft_kwargs) -> "SspeftPeftConfig":
    """The PEFT config for ``cfg``: pass it to ``peft.get_peft_model`` or ``SFTTrainer(peft_config=...)``."""
    values = {f.name: getattr(cfg, f.name) for f in _SPECTRAL_FIELDS}
    return SspeftPeftConfig(task_type=task_type, **values, **peft_kwargs)


def register() -> bool:
    """Register the SSPEFT tuner with PEFT (idempotent). Returns False, with a warning, outside the tested range."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    version = tuple(int(p) for p in peft.__version__.split(".")[:2])
    if not SUPPORTED_PEFT[0] <= version < SUPPORTED_PEFT[1]:
        warnings.warn(
            f"sspeft: PEFT {peft.__version__} is outside the tested range "
            f"{'.'.join(map(str, SUPPORTED_PEFT[0]))} ≤ v < {'.'.join(map(str, SUPPORTED_PEFT[1]))}; PEFT "
            "registration skipped (sspeft.inject/save_adapter/load_adapter still work)",
            stacklevel=2,
        )
        return False
    _extend_peft_type()
    if PeftType.SSPEFT in PEFT_TYPE_TO_CONFIG_MAPPING:
        return True
    from peft.utils import register_peft_method

    register_peft_method(name="sspeft", config_cls=SspeftPeftConfig, model_cls=SspeftTuner, prefix="sspeft_")
    return True
