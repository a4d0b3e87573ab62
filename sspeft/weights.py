"""Base-layer access that works for plain nn.Linear, bitsandbytes Linear4bit and ZeRO-3-partitioned weights.

bitsandbytes and deepspeed are never imported here: a model that holds their layers has imported them already, so
looking them up in sys.modules keeps `import sspeft` torch-only.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch
from torch import nn


def loaded_bitsandbytes():
    """The bitsandbytes module if something has imported it, else None (never imports it)."""
    return sys.modules.get("bitsandbytes")


def is_linear4bit(module: nn.Module) -> bool:
    bnb = loaded_bitsandbytes()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_linear4bit(module)


def prepare_4bit(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU repack of 4-bit weights for a bf16 kernel on every Linear4bit.

    On AVX512-BF16 CPUs the first no-grad eval forward repacks each weight; afterwards dequantize_4bit returns
    garbage and gradients through the frozen base are silently wrong. Must run before any forward; a layer that was
    already repacked is unpacked again (with a warning: its absmax went through bf16, so it is close, not exact).
    Returns the number of Linear4bit layers seen.
    """
    count, repaired = 0, []
    for name, module in model.named_modules():
        if is_linear4bit(module):
            module.support_avx512bf16_for_cpu = False
            if _unpack_cpu_repack(module):
                repaired.append(name or type(module).__name__)
            count += 1
    if repaired:
        warnings.warn(
            f"sspeft: {len(repaired)} Linear4bit layer(s) (first: {repaired[0]!r}) had already been repacked by "
            "bitsandbytes for its AVX512-BF16 CPU kernel (an eval-mode forward ran before sspeft.prepare_4bit); "
            "they were unpacked, but their quantization scales passed through bf16, so weights differ slightly "
            "from the checkpoint. Call sspeft.prepare_4bit(model) right after loading to avoid this.",
            stacklevel=2,
        )
    return count


def _unpack_cpu_repack(module: nn.Module) -> bool:
    """Undo bitsandbytes' AVX512-BF16 CPU packing of a Linear4bit in place; True if it was packed."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
    if not state.nested and state.absmax.dim() == 2:  # the inverse restores the layout of nested absmax only
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    module.weight.data = data
    module.weight.quant_state = state
    module.quant_state = state
    return True


@contextlib.contextmanager
def gathered(weight: torch.Tensor):
    """Gather a ZeRO-3-partitioned parameter for the duration of the block (no-op otherwise).

    A parameter some module's ZeRO-3 hook has already fetched (status AVAILABLE) is used as it is: gathering it
    again would re-partition it on exit while that module still holds it, which DeepSpeed refuses.
    """
    if hasattr(weight, "ds_id") and "deepspeed" in sys.modules:
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if getattr(weight, "ds_status", None) == ZeroParamStatus.AVAILABLE:
            yield weight
            return
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            yield weight
    else:
        yield weight


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's (out, in) weight as a dense fp32 tensor: dequantized if 4-bit, gathered under ZeRO-3."""
    weight = base.weight
    with gathered(weight):
        if is_linear4bit(base):
            bnb = loaded_bitsandbytes()
            if getattr(base, "support_avx512bf16_for_cpu", False) or getattr(
                weight.quant_state, "packing_format_for_cpu", False
            ):
                prepare_4bit(base)
            state = weight.quant_state
            dense = bnb.functional.dequantize_4bit(weight.data, state)
            return dense.float().reshape(base.out_features, base.in_features).clone()
        return weight.detach().float().clone()


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base layer computes in (a 4-bit layer's compute dtype, else its weight's dtype)."""
    if is_linear4bit(base):
        return getattr(base, "compute_dtype", None) or torch.float32
    return base.weight.dtype


def dense_linear(base: nn.Module, weight: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear with ``weight`` (fp32, out×in) and the base layer's bias, in ``dtype``."""
    dtype = dtype or compute_dtype(base)
    bias = getattr(base, "bias", None)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(dtype))
        if bias is not None:
            with gathered(bias):
                out.bias.copy_(bias.detach().to(dtype))
    return out


def fingerprint(weight: torch.Tensor) -> str:
    """A short hash of a dense fp32 weight (a strided sample plus its shape): tells same-shape bases apart."""
    import hashlib

    flat = weight.detach().float().flatten()
    step = max(1, flat.numel() // 65536)
    sample = flat[::step].contiguous().cpu().numpy().tobytes()
    h = hashlib.sha256(sample)
    h.update(str(tuple(weight.shape)).encode())
    return h.hexdigest()[:16]
