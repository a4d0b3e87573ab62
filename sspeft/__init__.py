"""sspeft: sparse spectral adapters (SSH, LFMA, WaveFT, FourierFT, SHiRA) for LLaMA-family models.

    import sspeft
    cfg = sspeft.SpectralConfig(method="ssh", n=750, target_modules=["q_proj", "v_proj"], seed=0)
    model = sspeft.inject(model, cfg)          # in place; nn.Linear and bitsandbytes Linear4bit targets
    sspeft.save_adapter(model, "adapter/")
    model = sspeft.load_adapter(base_model, "adapter/")
    merged = sspeft.merge_and_unload(model)

With PEFT installed (tested range 0.21.x), importing sspeft registers the "SSPEFT" tuner, so
``peft.get_peft_model(model, sspeft.peft_config(cfg))``, TRL's ``SFTTrainer(peft_config=...)`` and
``PeftModel.from_pretrained`` work; loading a saved adapter through PEFT needs ``import sspeft`` first. TRL casts
the coefficients of a 4-bit model to bf16 when its trainer is built: pass ``callbacks=[sspeft.KeepFP32Callback()]``
(needs transformers) or call ``sspeft.restore_fp32(trainer.model)`` once after.
"""

from __future__ import annotations

import importlib.util
import warnings

from .config import METHOD_DEFAULTS, METHODS, VERSION as __version__, SpectralConfig  # noqa: E402
from .export import export_lora  # noqa: E402
from .io import AdapterFileError, load_adapter, read_adapter, save_adapter  # noqa: E402
from .layer import SpectralLinear  # noqa: E402
from .model import (  # noqa: E402
    adapted_layers,
    adapter_config,
    adapter_parameters,
    adapter_positions,
    base_linears,
    count_trainable,
    disabled,
    inject,
    merge,
    merge_and_unload,
    restore_fp32,
    unmerge,
)
from .weights import prepare_4bit  # noqa: E402

PEFT_REGISTERED = False
if importlib.util.find_spec("peft") is not None:
    try:
        from .peft_tuner import peft_config, register as _register_peft

        PEFT_REGISTERED = _register_peft()
    except ImportError as exc:  # a broken PEFT install must not break the torch-only library
        warnings.warn(f"sspeft: PEFT could not be imported ({exc}); PEFT registration skipped", stacklevel=2)


def _peft_missing(*_args, **_kwargs):
    raise ImportError("sspeft.peft_config needs PEFT 0.21.x: pip install 'sspeft[peft]'")


if not PEFT_REGISTERED:
    peft_config = _peft_missing  # type: ignore[assignment]


def __getattr__(name: str):
    if name == "KeepFP32Callback":  # imports transformers: only on first use
        from .callbacks import KeepFP32Callback

        return KeepFP32Callback
    raise AttributeError(f"module 'sspeft' has no attribute {name!r}")


__all__ = [
    "METHODS", "METHOD_DEFAULTS", "SpectralConfig", "SpectralLinear", "inject", "adapted_layers", "adapter_config",
    "AdapterFileError", "save_adapter", "load_adapter", "read_adapter", "merge", "unmerge", "merge_and_unload",
    "disabled", "count_trainable", "restore_fp32", "KeepFP32Callback", "prepare_4bit", "peft_config", "PEFT_REGISTERED",
    "export_lora", "adapter_parameters", "adapter_positions", "base_linears",
]
