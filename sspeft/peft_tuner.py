"""sspeft as a PEFT tuner (peft_type "SSPEFT"), so transformers' Trainer and TRL's SFTTrainer accept a model with
sspeft adapters on a 4-bit base, and `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained` and
`merge_and_unload` work. One PEFT type serves all five methods (the method is a config field), under a name of our
own that never collides with PEFT's FOURIERFT/SHIRA/WAVEFT.

`SspeftPeftConfig` is a PEFT config like PEFT's own: a dataclass subclass of PeftConfig whose other fields are
derived from SpectralConfig's (same names, types and defaults), converted by `spectral()` and `from_spectral()`.

Loading (`PeftModel.from_pretrained`, `PeftModel.load_adapter` of a new adapter name): `SspeftPeftConfig.from_pretrained`
reads the adapter directory with `sspeft.read_adapter` (every check) and keeps its tensors on the config; the tuner
builds each recorded layer from its saved positions and coefficients with `sspeft.io.saved_layers`, the step
`sspeft.load_adapter` uses, so nothing is chosen again on load. A config without saved tensors (built in code, or taken
from another model) makes a new adapter, its positions chosen as `sspeft.inject` chooses them. A Trainer resume loads
saved tensors into the existing adapter; `_check_loaded_state` runs `sspeft.io.check_adapter` on them first.

Registration: PEFT's `register_peft_method` accepts only names in its closed `PeftType` enum; `_extend_peft_type` adds
the member SSPEFT through the internals of Python's Enum. The supported PEFT range is pinned below, and
tests/test_sspeft_peft.py fails if the extension stops working. Loading a saved adapter with PEFT needs `import sspeft`
first.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import peft
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType

from . import weights
from .config import SpectralConfig
from .io import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, check_adapter, config_from_json, read_adapter, saved_layers
from .layer import SpectralLinear
from .model import already_adapted, find_targets, plan_positions, record_layer, warn_base_mismatch

PEFT_TYPE_NAME = "SSPEFT"
SUPPORTED_PEFT = ((0, 21), (0, 22))  # [lower, upper)


def _extend_peft_type() -> None:
    """Add the member SSPEFT to PEFT's closed `PeftType` enum (idempotent): what `Enum` itself records for a member
    (name and value maps, member list, class attribute), so `PeftType("SSPEFT")` and `PeftType.SSPEFT` work."""
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


SPECTRAL_FIELDS = tuple(f.name for f in dataclasses.fields(SpectralConfig))


def _spectral_field_specs() -> list[tuple[str, Any, dataclasses.Field]]:
    """SpectralConfig's fields as `make_dataclass` entries: same names, order, types and defaults. ``method`` has no
    default, so it is keyword-only (PeftConfig's own fields, which come first, all have defaults)."""
    specs = []
    for f in dataclasses.fields(SpectralConfig):
        if f.default is not dataclasses.MISSING:
            spec = field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory)
        else:
            spec = field(kw_only=True)
        specs.append((f.name, f.type, spec))
    return specs


_SpectralPeftFields = dataclasses.make_dataclass("_SpectralPeftFields", _spectral_field_specs(), bases=(PeftConfig,))
"""PeftConfig's fields followed by SpectralConfig's, derived from SpectralConfig so a field added there is here."""


@dataclass
class SspeftPeftConfig(_SpectralPeftFields):
    """PEFT config for sspeft adapters: PEFT's fields plus SpectralConfig's, with SpectralConfig's names, types,
    defaults and meaning (see its field docs) and its validation on construction."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SSPEFT
        # (source, tensors) of the adapter `from_pretrained` read, handed to the tuner once by `take_saved`. An
        # attribute, not a dataclass field: never saved with the config, compared or printed.
        self._saved: tuple[str, dict] | None = None
        self.adopt(self.spectral(resolve=False))  # SpectralConfig validates every field, with its messages

    # ------------------------------------------------------------------ conversion
    def spectral(self, resolve: bool = True) -> SpectralConfig:
        """The SpectralConfig of these fields; ``resolve``: with every method default filled in."""
        values = {name: getattr(self, name) for name in SPECTRAL_FIELDS}
        if isinstance(values["target_modules"], (set, frozenset)):  # PEFT turns target lists into sets
            values["target_modules"] = sorted(values["target_modules"])
        values["layers"] = dict(values["layers"])
        cfg = SpectralConfig(**values)
        return cfg.resolved() if resolve else cfg

    @classmethod
    def from_spectral(cls, cfg: SpectralConfig, **peft_fields) -> "SspeftPeftConfig":
        """The PEFT config holding ``cfg``'s fields, plus PEFT's own given as keywords (task_type, ...)."""
        return cls(**{name: getattr(cfg, name) for name in SPECTRAL_FIELDS}, **peft_fields)

    def adopt(self, cfg: SpectralConfig) -> None:
        """Take every SpectralConfig field from ``cfg`` (validated values, resolved defaults, layer records)."""
        for name in SPECTRAL_FIELDS:
            setattr(self, name, getattr(cfg, name))

    # ------------------------------------------------------------------ PEFT's loading hooks
    @classmethod
    def check_kwargs(cls, **kwargs):
        """A saved config's entries, checked as `sspeft.read_adapter` checks them; fields an older file left out are
        filled in as they were when it was written (see SpectralConfig.saved_fields)."""
        config_from_json(kwargs, CONFIG_NAME)
        return SpectralConfig.saved_fields(kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's config loading, after the whole adapter (a local directory, or both files fetched from the Hub) has
        passed `sspeft.read_adapter`; the config keeps the saved tensors for the tuner to build the layers from."""
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if not os.path.isdir(path):
            from huggingface_hub import hf_hub_download

            hub_kwargs, _, _ = cls._split_kwargs(kwargs)
            files = [hf_hub_download(pretrained_model_name_or_path, name, subfolder=subfolder, **hub_kwargs)
                     for name in (CONFIG_NAME, WEIGHTS_NAME)]
            path = os.path.dirname(files[-1])
        _, tensors = read_adapter(path)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._saved = (os.path.join(path, WEIGHTS_NAME), tensors)
        return config

    def take_saved(self) -> tuple[str, dict] | None:
        """(source, tensors) of the adapter this config was read with, once; None for a config built in code."""
        saved, self._saved = self._saved, None
        return saved


class PeftSpectralLinear(SpectralLinear, BaseTunerLayer):
    """SpectralLinear as a PEFT tuner layer (same attributes; PEFT's adapter switching applies)."""

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: list[str] | None):
        """PEFT's unload hook (`merge_and_unload`, `unload`): PEFT keeps the returned layer's weight from
        `base_layer`, so merging happens there. Inside `disable_adapter()` merging still gives W0 + ΔW, as for PEFT's
        LoRA: the leaving layer drops its pending merge-back, is enabled, then merges the adapters asked for."""
        if merge:
            if self.disable_adapters:
                if self.merge_pending:
                    self.unmerge()  # on a disabled layer: cancels the merge-back
                self.set_disabled(False)
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()


class SspeftTuner(BaseTuner):
    prefix: str = "sspeft_"
    tuner_layer_cls = PeftSpectralLinear
    target_module_mapping: dict = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_pre_hook(_check_loaded_state)

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("SspeftPeftConfig.target_modules is None; name the modules to adapt, e.g. ['q_proj', 'v_proj']")
        return peft_config

    def _prepare_model(self, peft_config, model):
        # Before anything dequantizes or runs a forward: every Linear4bit of the model, adapted or not (gradients
        # flow back through the frozen ones too), gets bitsandbytes' AVX512-BF16 CPU repack switched off.
        weights.prepare_4bit(model)

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        # The layers' (positions, coefficients, fingerprint) are planned here for every layer that cannot be planned
        # alone: a saved adapter's recorded layers (checked against the model before anything is replaced) and SSH's
        # global budget (it ranks all target layers together); _create_and_replace plans the others one by one.
        peft_config = self.peft_config[adapter_name]
        weights.prepare_4bit(model)
        saved = peft_config.take_saved()
        mismatched = []
        if saved is not None:
            cfg = peft_config.spectral(resolve=False)  # a saved config is resolved; its version is the writer's
            source, tensors = saved
            _, plan, mismatched = saved_layers(cfg, tensors, model, source, onto_spectral=True)
            cfg.layers = {}  # recorded again as each layer is built
        else:
            cfg = peft_config.spectral()
            cfg.layers = {}  # a new adapter: records from another model's config are not this one's
            plan = plan_positions(cfg, find_targets(model, cfg)) if cfg.budget == "global" else {}
        self._sspeft_build = {"cfg": cfg, "plan": plan, "saved": saved is not None}
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            del self._sspeft_build
        unbuilt = sorted(set(plan) - set(cfg.layers))
        if saved is not None and unbuilt:
            raise ValueError(
                f"{saved[0]}: layer {unbuilt[0]!r} is recorded in the adapter but not selected by "
                f"target_modules={cfg.target_modules!r} ({len(unbuilt)} such layer(s)); the saved config is inconsistent"
            )
        peft_config.adopt(cfg)  # resolved defaults and the layer records, as save_pretrained writes them
        if mismatched:
            warn_base_mismatch(mismatched, repr(adapter_name), stacklevel=3)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        build = self._sspeft_build
        cfg, plan = build["cfg"], build["plan"]
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(target, BaseTunerLayer) and not isinstance(target, SpectralLinear):
            raise ValueError(already_adapted(current_key, target))
        if not weights.is_supported_base(base):
            raise TypeError(f"sspeft adapts nn.Linear and bitsandbytes Linear4bit, not {type(base).__name__} ({current_key})")
        weights.prepare_4bit(base)
        if current_key not in plan:
            if build["saved"]:
                raise ValueError(
                    f"module {current_key!r} is selected by target_modules={cfg.target_modules!r}, but the adapter "
                    f"being loaded records no layer of that name (it records {len(plan)}: {', '.join(sorted(plan)[:3])}"
                    f"{', ...' if len(plan) > 3 else ''}); load it onto the base it was trained on"
                )
            plan.update(plan_positions(cfg, {current_key: base}))
        positions, coefficients, fp = plan[current_key]
        record_layer(cfg, current_key, base, positions, fp)
        if isinstance(target, SpectralLinear):
            target.add_adapter(adapter_name, cfg, positions, coefficients)
            return
        new = PeftSpectralLinear(base, adapter_name, cfg, positions, coefficients)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)


def _check_loaded_state(tuner, state_dict, prefix, *_args) -> None:
    """load_state_dict pre-hook: the sspeft tensors of every adapter being loaded pass `check_adapter` (all present,
    recorded shapes, valid positions, finite coefficients) before PEFT copies any of them into the model.

    Not checked: an adapter whose coefficients are ZeRO-3 partitions and arrive as DeepSpeed's empty (numel 0) tensors
    (a ZeRO-3 checkpoint's module state holds no partitioned values; DeepSpeed restores them from its own
    per-rank partition files, which this hook never sees)."""
    names = ("sspeft_coefficients", "sspeft_positions")
    parts = [k.rsplit(".", 2) for k in state_dict if k.startswith(prefix)]
    loading = {p[2] for p in parts if len(p) == 3 and p[1] in names}
    for adapter in sorted(loading & set(tuner.peft_config)):
        cfg = tuner.peft_config[adapter].spectral(resolve=False)
        layers = {name: m for name, m in tuner.model.named_modules()
                  if isinstance(m, SpectralLinear) and adapter in m.sspeft_coefficients}
        if _zero3_empty_partitions(state_dict, adapter, layers.values()):
            continue
        cfg.layers = {name: {"shape": [m.out_features, m.in_features],
                             "n": int(m.sspeft_positions[adapter].shape[1])} for name, m in layers.items()}
        tensors = {}
        for key, value in state_dict.items():
            for what in names:
                head, tail = f"{prefix}model.", f".{what}.{adapter}"
                if key.startswith(head) and key.endswith(tail):
                    tensors[f"{KEY_PREFIX}{key[len(head):-len(tail)]}.{what}"] = value
        check_adapter(cfg, tensors, f"adapter weights of {adapter!r}")


def _zero3_empty_partitions(state_dict, adapter: str, layers) -> bool:
    """The adapter's coefficients are ZeRO-3 partitions here and every loaded coefficient tensor is empty."""
    partitioned = any(hasattr(m.sspeft_coefficients[adapter], "ds_id") for m in layers)
    loaded = [v for k, v in state_dict.items() if k.endswith(f".sspeft_coefficients.{adapter}")]
    return partitioned and bool(loaded) and all(v.numel() == 0 for v in loaded)


def peft_config(cfg: SpectralConfig, task_type: str | None = "CAUSAL_LM", **peft_kwargs) -> SspeftPeftConfig:
    """The PEFT config for ``cfg``: pass it to ``peft.get_peft_model`` or ``SFTTrainer(peft_config=...)``."""
    return SspeftPeftConfig.from_spectral(cfg, task_type=task_type, **peft_kwargs)


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
