"""sspeft on a real bitsandbytes NF4 tiny LLaMA (CPU): merge_and_unload keeping the layers it did not adapt in 4 bits,
and the AVX512-BF16 repack guard. The per-method contracts on an NF4 base (equivalence with the dequantized dense
path, merging, bf16 compute) run over the shared table in test_sspeft_contract.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sspeft
from conftest import require_module

require_module("bitsandbytes")
import bitsandbytes as bnb  # noqa: E402

from sspeft_helpers import dense_twin, dequantized, linear4bit_layers, tiny_llama_4bit  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]  # square 64×64, GQA 32×64, MLP 64×128


def config(method: str, **kw) -> sspeft.SpectralConfig:
    return sspeft.SpectralConfig(method=method, n=24, target_modules=TARGETS, seed=5, **kw)


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every adapter non-trivial coefficients (zero-init methods would otherwise test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sspeft.adapted_layers(model).values():
            c = layer.coefficients
            c.copy_(torch.randn(c.shape, generator=g) * scale * (c.abs().max().clamp_min(0.05)))


def tokens(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def coefficient_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: layer.coefficients.grad.clone() for n, layer in sspeft.adapted_layers(model).items()}


def test_merge_and_unload_keeps_other_4bit_layers_when_asked():
    q = tiny_llama_4bit()
    sspeft.inject(q, config("ssh"))
    randomize(q)
    ids = tokens()
    with torch.no_grad():
        before = q(ids).logits
    merged = sspeft.merge_and_unload(q, dequantize_all=False)
    remaining = linear4bit_layers(merged)
    assert remaining and not any(n.endswith(tuple(TARGETS)) for n in remaining)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- AVX512-BF16 guard
def emulate_avx512bf16_cpu(model: nn.Module) -> int:
    """Set the flag bitsandbytes sets on AVX512-BF16 CPUs (`has_avx512bf16()`), so every Linear4bit repacks its
    weight at the first eval-mode no-grad forward, as on such a CPU. The repack itself is plain torch and happens on
    any CPU, and dequantize_4bit / the backward then go wrong on any CPU, so these tests fail without the guard here
    too. On a real AVX512-BF16 CPU bitsandbytes sets the flag itself and the same assertions apply."""
    layers = linear4bit_layers(model)
    for module in layers.values():
        module.support_avx512bf16_for_cpu = True
    return len(layers)


def assert_guarded(model: nn.Module) -> None:
    layers = linear4bit_layers(model)
    assert layers
    flagged = [n for n, m in layers.items() if getattr(m, "support_avx512bf16_for_cpu", False)]
    assert not flagged, f"repack still enabled on {flagged[:3]}"


def dequantized_by_layer(model: nn.Module) -> dict[int, torch.Tensor]:
    """{id(Linear4bit): its dequantized weight}; ids survive injection, which renames targets to *.base_layer."""
    return {id(m): dequantized(m) for m in linear4bit_layers(model).values()}


def eval_forward_then_check(model: nn.Module, weights_before: dict[int, torch.Tensor]) -> None:
    """An eval-mode no-grad forward (what triggers the repack), then the 4-bit weights must dequantize unchanged."""
    model.eval()
    with torch.no_grad():
        model(tokens())
    for name, module in linear4bit_layers(model).items():
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False), f"{name} was repacked"
        assert torch.equal(dequantized(module), weights_before[id(module)]), f"{name}: dequantized weight changed"


def test_repack_guard_host_flag_is_what_bitsandbytes_detects():
    """Where this CPU has AVX512-BF16, bitsandbytes enables the repack on every new Linear4bit (and inject must turn
    it off); elsewhere it does not, and the tests below emulate such a CPU by setting the flag."""
    q = tiny_llama_4bit()
    host = bool(bnb.functional.has_avx512bf16())
    assert all(m.support_avx512bf16_for_cpu == host for m in linear4bit_layers(q).values())
    sspeft.inject(q, config("ssh"))
    assert_guarded(q)


def test_repack_guard_inject_keeps_weights_and_gradients_exact():
    q = tiny_llama_4bit()
    emulate_avx512bf16_cpu(q)
    d = dense_twin(q)
    before = dequantized_by_layer(q)
    sspeft.inject(q, config("fourierft"))  # non-zero init: the adapter path has a gradient through every block
    sspeft.inject(d, config("fourierft"))
    assert_guarded(q)
    eval_forward_then_check(q, before)
    ids = tokens(seed=4)
    q.train(), d.train()
    gq, gd = coefficient_grads(q, ids), coefficient_grads(d, ids)
    for name in gq:  # gradients flow back through frozen 4-bit layers (o/gate/up/down, k) of later blocks
        torch.testing.assert_close(gq[name], gd[name], rtol=1e-4, atol=1e-6)


def test_repack_guard_load_adapter(tmp_path):
    trained = tiny_llama_4bit()
    sspeft.inject(trained, config("ssh"))
    randomize(trained)
    sspeft.save_adapter(trained, tmp_path / "adapter")
    base = tiny_llama_4bit()
    emulate_avx512bf16_cpu(base)
    before = dequantized_by_layer(base)
    loaded = sspeft.load_adapter(base, tmp_path / "adapter")
    assert_guarded(loaded)
    eval_forward_then_check(loaded, before)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, trained.eval()(tokens()).logits, rtol=0, atol=0)


def test_repack_guard_merge_and_unload_keeping_4bit_layers():
    q = tiny_llama_4bit()
    sspeft.inject(q, config("ssh"))
    emulate_avx512bf16_cpu(q)  # e.g. layers re-created by a framework after injection
    before = dequantized_by_layer(q)
    merged = sspeft.merge_and_unload(q, dequantize_all=False)
    assert_guarded(merged)
    eval_forward_then_check(merged, before)


def test_prepare_4bit_repairs_an_already_repacked_layer():
    """A model evaluated before sspeft saw it (repack already done): prepare_4bit undoes the packing, with a
    warning, so dequantize_4bit and the backward are sound again (absmax went through bf16: close, not exact)."""
    q = tiny_llama_4bit()
    emulate_avx512bf16_cpu(q)
    before = {n: dequantized(m) for n, m in linear4bit_layers(q).items()}
    with torch.no_grad():
        q.eval()(tokens())
    assert all(m.weight.quant_state.packing_format_for_cpu for m in linear4bit_layers(q).values())
    with pytest.warns(UserWarning, match="repacked"):
        count = sspeft.prepare_4bit(q)
    assert count == len(before)
    assert_guarded(q)
    for name, module in linear4bit_layers(q).items():
        torch.testing.assert_close(dequantized(module), before[name], rtol=1e-2, atol=2e-3)
    x = torch.randn(2, 64, requires_grad=True)
    layer = q.model.layers[0].self_attn.q_proj.train()
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 64) @ dequantized(layer), rtol=1e-5, atol=1e-5)
