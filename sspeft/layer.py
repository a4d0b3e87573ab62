"""SpectralLinear: a Linear (plain or bitsandbytes 4-bit) plus sparse spectral adapters (update rule in the class
docstring).

Adapters are kept per name (ParameterDict / buffer dict), with the attribute names PEFT's BaseTunerLayer expects,
so the same class serves `sspeft.inject` and the PEFT tuner (see peft_tuner.py). Coefficients are fp32 Parameters
whatever the model dtype (LFMA: (n, 2) real/imag pairs); transforms run in fp32. A cast of them made outside sspeft
(TRL casts trainable parameters of 4-bit models to bf16 when its trainer is built) is undone by `restore_fp32`,
called once after it; the forward only warns about it.

Merge state is explicit: `merge` and `unmerge` change it, and disabling the adapters (`enable_adapters(False)`,
`set_disabled(True)`) unmerges first and enabling merges back, so a disabled layer never holds a merged ΔW. The
forward never changes the layer; how each adapter's term is computed (one of several equal-valued execution paths,
chosen per call) lives in forward.py behind `adapter_output`.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import nn

from . import methods, weights
from .config import SpectralConfig
from .forward import adapter_output


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


def deepspeed_owns(param: torch.Tensor) -> bool:
    """Whether DeepSpeed manages ``param`` (a ZeRO-3 parameter, or any parameter once DeepSpeed is initialised): its
    dtype is then the engine's business, not sspeft's."""
    return hasattr(param, "ds_id") or _deepspeed_active()


FP32_FIX = ("call sspeft.restore_fp32(model) once after the trainer is built, or pass "
            "callbacks=[sspeft.KeepFP32Callback()] to it")
"""How to undo an outside cast of the coefficients (named by the warnings about one)."""


class SpectralLinear(nn.Module):
    """A target Linear wrapped with sparse spectral adapters. Works on nn.Linear and bitsandbytes Linear4bit.

    For input x (..., in) and each active adapter a, not merged::

        y = base(x) + Σₐ αₐ · x · T⁻¹(Sₐ)ᵀ

    where base(x) = x·W0ᵀ + b is the wrapped layer (4-bit or not, untouched), αₐ is the adapter's ``config.scaling``,
    Sₐ is the coefficient matrix of `methods.coefficient_grid` — zero except the trainable ``coefficients`` at
    ``positions`` — and T⁻¹ is the method's inverse transform (2-D DHT for SSH, inverse FFT for LFMA/FourierFT,
    inverse DWT for WaveFT, identity for SHiRA); ΔWₐ = αₐ·T⁻¹(Sₐ) is `delta_weight(a)`, (out, in) in fp32. Disabled
    or merged, y = base(x) (merged: W0 + ΔW sits in the base).

    Args:
        base_layer: the wrapped layer (nn.Linear or bitsandbytes Linear4bit); frozen by the caller.
        adapter_name: name of the first adapter ("default" for `sspeft.inject`).
        config: a *resolved* SpectralConfig (every method default filled in; finite ``scaling``).
        positions: (2, n) integer (row, col) positions in the coefficient matrix, in range and distinct.
        coefficients: initial coefficients, a float tensor of shape (n,), or (n, 2) real/imag pairs for LFMA,
            all finite; stored as an fp32 Parameter.

    Raises:
        TypeError: ``base_layer`` is not a supported Linear.
        ValueError: ``config`` is not resolved or its scaling is not finite; ``positions`` or ``coefficients`` have
            the wrong shape or dtype, positions out of range or repeated, non-finite coefficients.
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
        self._merge_on_enable: list[str] = []  # adapters unmerged by disabling, merged back by enabling
        self._quantized_stash: list[nn.Module] = []  # the 4-bit base while merged (a list: not a submodule)
        self._warned_low_precision: set[str] = set()  # adapters whose non-fp32 coefficients were warned about
        self.kwargs: dict = {}
        self.add_adapter(adapter_name, config, positions, coefficients)

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self, name: str, config: SpectralConfig, positions: torch.Tensor, coefficients: torch.Tensor
    ) -> None:
        """Add adapter ``name`` (arguments as in the class docstring), checked before anything is stored."""
        self._check_adapter(name, config, positions, coefficients)
        device = self.base_layer.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        param = nn.Parameter(coefficients.detach().float().to(device), requires_grad=True)
        self.sspeft_coefficients[name] = param
        self.sspeft_positions[name] = positions.detach().long().to(device)
        self.sspeft_config[name] = config
        self._fp32_master[name] = param.data

    def _check_adapter(
        self, name: str, config: SpectralConfig, positions: torch.Tensor, coefficients: torch.Tensor
    ) -> None:
        where = f"SpectralLinear adapter {name!r} on a {self.out_features}×{self.in_features} layer"
        if not isinstance(config, SpectralConfig):
            raise TypeError(f"{where}: config is a {type(config).__name__}; expected a resolved SpectralConfig")
        if config.scaling is None or config.normalization is None:
            raise ValueError(f"{where}: config has scaling={config.scaling!r}, normalization="
                             f"{config.normalization!r}; expected a resolved config (SpectralConfig.resolved())")
        if not math.isfinite(float(config.scaling)):
            raise ValueError(f"{where}: config.scaling={config.scaling!r}; expected a finite number")
        if not isinstance(positions, torch.Tensor) or not isinstance(coefficients, torch.Tensor):
            raise TypeError(f"{where}: positions and coefficients are {type(positions).__name__} and "
                            f"{type(coefficients).__name__}; expected torch tensors")
        if positions.dim() != 2:
            raise ValueError(f"{where} has positions of shape {tuple(positions.shape)}; expected (2, n)")
        problem = methods.tensor_problem(config, self.shape, int(positions.shape[1]), positions, coefficients)
        if problem is not None:
            raise ValueError(f"{where} {problem}")

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
    def merge_pending(self) -> bool:
        """Disabled with adapters that enabling will merge back (`unmerge` cancels that)."""
        return bool(self._merge_on_enable)

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
        """Undo an outside cast of the coefficients to another dtype (TRL casts trainable parameters of 4-bit models
        to bf16 when its trainer is built; call this once after that). The exact fp32 values come back while the cast
        values are those fp32 values rounded (no update since the cast); otherwise the cast values are upcast, with a
        warning. Coefficients already fp32 are left as they are; skipped where DeepSpeed owns the parameters."""
        for name, param in self.sspeft_coefficients.items():
            if param.dtype == torch.float32:
                self._fp32_master[name] = param.data
                continue
            if deepspeed_owns(param):
                continue
            master = self._fp32_master.get(name)
            if master is not None and master.shape == param.shape:
                master = master.to(param.device)
                if torch.equal(master.to(param.dtype), param.data):
                    param.data = master
                    continue
            warnings.warn(
                f"sspeft: the {param.dtype} coefficients of adapter {name!r} changed since they were fp32; upcast "
                f"to fp32, the values lost by the cast cannot be recovered (call sspeft.restore_fp32 right after "
                f"the cast, before any update)", stacklevel=3)
            param.data = param.data.float()
            self._fp32_master[name] = param.data

    def low_precision_adapters(self) -> list[str]:
        """Active adapters whose coefficients are not fp32 though sspeft owns their dtype (not DeepSpeed)."""
        return [name for name in self.active_adapters if name in self.sspeft_coefficients
                and self.sspeft_coefficients[name].dtype != torch.float32
                and not deepspeed_owns(self.sspeft_coefficients[name])]

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
        """y = base(x) + Σₐ αₐ·x·T⁻¹(Sₐ)ᵀ over the active adapters; base(x) alone when disabled or merged."""
        if self.disable_adapters and self.merged:
            raise RuntimeError(
                f"sspeft: adapters {self.merged_adapters} are merged into a layer whose adapters are disabled, so "
                f"its forward would not run the base; disable adapters with enable_adapters(False), set_disabled(True) "
                f"or sspeft.disabled(model), which unmerge first")
        names = [a for a in self.active_adapters if a in self.sspeft_coefficients]
        if self.disable_adapters or self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        self._warn_low_precision()
        # base(x) plus each adapter's term, every path giving `delta_weight`'s numbers (see forward.py)
        return adapter_output(self, names, x, *args, **kwargs)

    def _warn_low_precision(self) -> None:
        """Warn, once per adapter, about active coefficients cast away from fp32 outside sspeft (used as they are)."""
        for name in self.low_precision_adapters():
            if name in self._warned_low_precision:
                continue
            self._warned_low_precision.add(name)
            dtype = self.sspeft_coefficients[name].dtype
            warnings.warn(
                f"sspeft: the coefficients of adapter {name!r} are {dtype}, not fp32 (cast outside sspeft: TRL casts "
                f"trainable parameters of 4-bit models to bf16); small updates to them are lost. Used as they are: "
                f"{FP32_FIX}", stacklevel=4)

    # ------------------------------------------------------------------ enable / disable
    def set_disabled(self, disabled: bool) -> None:
        """Run the base layer alone (True) or with the active adapters (False). Disabling unmerges the merged
        adapters and enabling merges those of them still active back, so a disabled layer never holds a merged
        ΔW; which coefficients train is unchanged."""
        if disabled and not self._disable_adapters:
            merged = list(self.merged_adapters)
            if merged:
                self.unmerge()
            self._merge_on_enable = merged
            self._disable_adapters = True
        elif not disabled and self._disable_adapters:
            pending, self._merge_on_enable = self._merge_on_enable, []
            self._disable_adapters = False
            names = [a for a in pending if a in self.active_adapters]
            if names:
                self.merge(adapter_names=names)

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch (BaseTunerLayer.enable_adapters): `set_disabled(not enabled)`, then, as PEFT does,
        disabling freezes every adapter's coefficients and enabling makes the active adapters' trainable."""
        self.set_disabled(not enabled)
        for name, param in self.sspeft_coefficients.items():
            param.requires_grad_(enabled and name in self.active_adapters)

    # ------------------------------------------------------------------ merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters' ΔW to the base weight. A 4-bit base is swapped for a dense copy (dequantized
        W0 + ΔW) and restored exactly by `unmerge`; a dense base is updated in place. Raises on a disabled layer
        (enable the adapters first)."""
        if self.disable_adapters:
            raise RuntimeError("sspeft: cannot merge adapters into a layer whose adapters are disabled; enable them "
                               "first (enable_adapters(True), set_disabled(False), or leave sspeft.disabled)")
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
                self.base_layer = weights.dense_linear(self.base_layer, dense).requires_grad_(False)  # frozen, as W0
            else:
                weight = self.base_layer.weight
                with weights.gathered(weight):
                    merged = weight.data.float() + delta.to(weight.device)
                    if safe_merge and not torch.isfinite(merged).all():
                        raise ValueError("merged weight has non-finite values")
                    weight.data.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take the merged adapters' ΔW out of the base weight again (a 4-bit base gets its quantized layer back).
        On a disabled layer, cancels the merge that enabling it would restore."""
        if not self.merged:
            if self._merge_on_enable:
                self._merge_on_enable = []
                return
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
