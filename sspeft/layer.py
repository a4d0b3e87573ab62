"""SpectralLinear: a Linear (plain or bitsandbytes 4-bit) plus sparse spectral adapters.

    y = x·(W0 + ΔW)ᵀ + b,   ΔW = scaling · T⁻¹(S),   S zero except `coefficients` at `positions`

Adapters are kept per name (ParameterDict / buffer dict), with the attribute names PEFT's BaseTunerLayer expects,
so the same class serves `sspeft.inject` and the PEFT tuner (see peft_tuner.py). Coefficients are fp32 Parameters
whatever the model dtype (LFMA: (n, 2) real/imag pairs); transforms run in fp32.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from . import methods, weights
from .config import SpectralConfig


class PositionBuffers(nn.Module):
    """Adapter name → (2, n) int64 positions, registered as persistent buffers so they are saved, never re-derived."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if name in self._buffers:
            self._buffers[name] = value
        else:
            self.register_buffer(name, value, persistent=True)

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def keys(self):
        return self._buffers.keys()


def _deepspeed_active() -> bool:
    ds = sys.modules.get("deepspeed")
    return ds is not None and hasattr(ds, "comm") and ds.comm.is_initialized()


class SpectralLinear(nn.Module):
    """A target Linear wrapped with sparse spectral adapters. Works on nn.Linear and bitsandbytes Linear4bit.

    Args:
        base_layer: the wrapped layer; frozen by the caller.
        adapter_name: name of the first adapter ("default" for `sspeft.inject`).
        config: a *resolved* SpectralConfig.
        positions: (2, n) int64 positions in the coefficient matrix.
        coefficients: initial fp32 coefficients, (n,) or (n, 2) for LFMA.
    """

    adapter_layer_names = ("sspeft_coefficients",)
    other_param_names = ("sspeft_positions", "sspeft_config")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SpectralConfig,
        positions: torch.Tensor,
        coefficients: torch.Tensor,
    ) -> None:
        super().__init__()
        if not weights.is_supported_base(base_layer):
            raise TypeError(
                f"sspeft adapts nn.Linear and bitsandbytes Linear4bit layers, not {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.sspeft_coefficients = nn.ParameterDict()
        self.sspeft_positions = PositionBuffers()
        self.sspeft_config: dict[str, SpectralConfig] = {}
        self._fp32_master: dict[str, torch.Tensor] = {}
        self._active_adapter: str | list[str] = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._quantized_stash: list[nn.Module] = []  # the 4-bit base while merged (a list: not a submodule)
        self.kwargs: dict = {}
        self.add_adapter(adapter_name, config, positions, coefficients)

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self, name: str, config: SpectralConfig, positions: torch.Tensor, coefficients: torch.Tensor
    ) -> None:
        device = self.base_layer.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        param = nn.Parameter(coefficients.detach().float().to(device), requires_grad=True)
        self.sspeft_coefficients[name] = param
        self.sspeft_positions[name] = positions.detach().long().to(device)
        self.sspeft_config[name] = config
        self._fp32_master[name] = param.data

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def active_adapters(self) -> list[str]:
        a = self._active_adapter
        return [a] if isinstance(a, str) else list(a)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def positions(self) -> torch.Tensor:
        """(2, n) (row, col) positions of the active adapter in its coefficient matrix."""
        return self.sspeft_positions[self.active_adapter]

    @property
    def coefficients(self) -> nn.Parameter:
        """The active adapter's trainable fp32 coefficients ((n,) or (n, 2) for LFMA)."""
        return self.sspeft_coefficients[self.active_adapter]

    @property
    def config(self) -> SpectralConfig:
        return self.sspeft_config[self.active_adapter]

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def restore_fp32(self) -> None:
        """Undo an outside cast of the coefficients to a low-precision dtype (TRL casts trainable params of 4-bit
        models to bf16), restoring the exact fp32 values. Skipped once DeepSpeed owns the parameters."""
        for name, param in self.sspeft_coefficients.items():
            if param.dtype == torch.float32:
                self._fp32_master[name] = param.data
                continue
            if hasattr(param, "ds_id") or _deepspeed_active():
                continue
            master = self._fp32_master.get(name)
            if master is not None and master.shape == param.shape and master.device == param.device:
                param.data = master
            else:
                param.data = param.data.float()
                self._fp32_master[name] = param.data

    # ------------------------------------------------------------------ ΔW
    def delta_weight(self, adapter: str | None = None) -> torch.Tensor:
        """ΔW (out, in) in fp32, scaling included; differentiable in the coefficients."""
        name = adapter or self.active_adapter
        coeff = self.sspeft_coefficients[name]
        with weights.gathered(coeff):
            return methods.delta_weight(self.sspeft_config[name], coeff, self.sspeft_positions[name], self.shape)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:  # PEFT's name
        return self.delta_weight(adapter)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        self.restore_fp32()
        from . import forward  # execution paths (merged/split/factorized/reference), chosen per layer and call

        return forward.forward(self, x, *args, **kwargs)

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' ΔW to the base weight. A 4-bit base is swapped for a dense copy (dequantized
        W0 + ΔW) and restored exactly by `unmerge`; a dense base is updated in place."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.sspeft_coefficients]
        names = [a for a in names if a not in self.merged_adapters]
        if not names:
            return
        with torch.no_grad():
            delta = sum(self.delta_weight(a) for a in names)
            if not torch.isfinite(delta).all():
                raise ValueError(f"ΔW of adapters {names} has non-finite values; refusing to merge")
            if weights.is_linear4bit(self.base_layer):
                dense = weights.dense_weight(self.base_layer) + delta
                self._quantized_stash = [self.base_layer]
                self.base_layer = weights.dense_linear(self.base_layer, dense)
            else:
                weight = self.base_layer.weight
                with weights.gathered(weight):
                    merged = weight.data.float() + delta.to(weight.device)
                    if safe_merge and not torch.isfinite(merged).all():
                        raise ValueError("merged weight has non-finite values")
                    weight.data.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("sspeft: unmerge called on a layer with no merged adapter; nothing to do")
            return
        with torch.no_grad():
            if self._quantized_stash:
                self.base_layer = self._quantized_stash.pop()
            else:
                delta = sum(self.delta_weight(a) for a in self.merged_adapters)
                weight = self.base_layer.weight
                with weights.gathered(weight):
                    weight.data.copy_((weight.data.float() - delta.to(weight.device)).to(weight.dtype))
        self.merged_adapters = []

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding W0 (dequantized if 4-bit) + ΔW of the active adapters, in ``dtype``."""
        with torch.no_grad():
            base = self._quantized_stash[0] if self._quantized_stash else self.base_layer
            if self.merged and not self._quantized_stash:
                weight = weights.dense_weight(base)  # ΔW already inside
            else:
                weight = weights.dense_weight(base) + sum(
                    self.delta_weight(a) for a in self.active_adapters if a in self.sspeft_coefficients
                )
            return weights.dense_linear(base, weight, dtype)

    def extra_repr(self) -> str:
        cfg = self.sspeft_config.get(self.active_adapter)
        if cfg is None:
            return ""
        return f"method={cfg.method}, n={self.positions.shape[1]}, scaling={cfg.scaling}"
