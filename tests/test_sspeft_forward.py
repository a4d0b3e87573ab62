"""Execution paths (sspeft/forward.py) against the reference: base(x) + x·ΔWᵀ with ΔW = methods.delta_weight.

Every path must give the reference's output, input gradient and coefficient gradient for every method, on square,
non-square and odd shapes, fp32 and bf16, under autocast and gradient checkpointing, on real bitsandbytes NF4 bases,
and must not keep any out×in tensor alive between forward and backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sspeft
from adapter_table import CONSTRUCTIONS, VARIANTS
from conftest import require_module
from sspeft import forward

CASES = {name: VARIANTS[name] for name in CONSTRUCTIONS}
FOURIER = {name for name, fields in CASES.items() if fields["method"] in ("ssh", "lfma", "fourierft")}
SHAPES = [(24, 24), (20, 36), (15, 9)]  # (out, in): square, non-square, odd
FAST_PATHS = ("merged", "split", "factorized")


def paths_for(case: str) -> tuple[str, ...]:
    return FAST_PATHS if case in FOURIER else ("merged", "split")


class One(nn.Module):
    def __init__(self, out_features: int, in_features: int, dtype=torch.float32, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def adapted(case: str, shape, dtype=torch.float32, n: int | None = None, seed: int = 0, **extra):
    """A one-Linear module with ``case``'s adapter, coefficients randomised so ΔW is far from zero."""
    torch.manual_seed(seed)
    model = One(*shape, dtype=dtype)
    count = n or min(30, shape[0] * shape[1] // 4)
    cfg = sspeft.SpectralConfig(target_modules=["proj"], n=count, seed=seed, **CASES[case], **extra)
    sspeft.inject(model, cfg)
    layer = sspeft.adapted_layers(model)["proj"]
    with torch.no_grad():
        layer.coefficients.copy_(torch.randn(layer.coefficients.shape, generator=torch.Generator().manual_seed(seed)))
    return model, layer


def set_path(layer, path: str) -> None:
    for cfg in layer.sspeft_config.values():
        cfg.path = path


def run(model, layer, path: str, x: torch.Tensor, g: torch.Tensor):
    """(output, input grad, coefficient grad, path used) for one forward/backward on ``path``."""
    set_path(layer, path)
    x = x.detach().clone().requires_grad_(True)
    layer.coefficients.grad = None
    y = model(x)
    (y.float() * g).sum().backward()
    return y.detach().float(), x.grad.float(), layer.coefficients.grad.clone(), forward.last_paths(layer)["default"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"{what}: max error {err:.2e} of max |value| {scale:.2e} (allowed {rel:.0e})"


def compare(model, layer, path, x, g, rel):
    ref = run(model, layer, "reference", x, g)
    out = run(model, layer, path, x, g)
    assert out[3] == path
    for a, b, what in zip(out[:3], ref[:3], ("output", "input gradient", "coefficient gradient")):
        assert_close(a, b, rel, f"{path} {what}")


# ---------------------------------------------------------------------------------------------------- fp32
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_path_equals_reference_fp32(case, shape):
    model, layer = adapted(case, shape)
    x = torch.randn(3, 5, shape[1])
    g = torch.randn(3, 5, shape[0])
    for path in paths_for(case):
        compare(model, layer, path, x, g, rel=2e-5)


@pytest.mark.parametrize("case", ["shira", "waveft-db3", "waveft-periodic"])
def test_many_positions_use_the_sampled_sparse_product(case):
    """≥ 4096 positions: the coefficient gradient is sampled with torch.sparse.sampled_addmm (CSR path) from the
    per-token analyses of x and of the output gradient."""
    model, layer = adapted(case, (96, 90), n=5000)
    x, g = torch.randn(7, 90), torch.randn(7, 96)
    for path in ("merged", "split"):
        compare(model, layer, path, x, g, rel=2e-5)


def test_input_without_grad_and_1d_input():
    model, layer = adapted("ssh", (20, 36))
    for path in FAST_PATHS:
        set_path(layer, path)
        layer.coefficients.grad = None
        x = torch.randn(36)  # a single token, no leading dims, no input gradient needed
        y = model(x)
        y.sum().backward()
        set_path(layer, "reference")
        assert_close(y.detach(), model(x).detach(), 2e-5, f"{path} 1-D output")
        assert layer.coefficients.grad is not None and layer.coefficients.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- bf16, autocast
@pytest.mark.parametrize("case", ["ssh", "lfma", "waveft", "shira"])
def test_bf16_model_paths_match_reference(case):
    model, layer = adapted(case, (32, 48), dtype=torch.bfloat16)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    g = torch.randn(4, 32)
    for path in paths_for(case):
        # bf16 rounds the output (reference) or W0 + ΔW (merged) once: agreement to a few bf16 ulps
        compare(model, layer, path, x, g, rel=3e-2)
        assert layer.coefficients.dtype == torch.float32


@pytest.mark.parametrize("case", ["ssh", "shira"])
def test_autocast_bf16_paths_match_reference(case):
    model, layer = adapted(case, (32, 48))
    x, g = torch.randn(4, 48), torch.randn(4, 32)
    results = {}
    for path in ("reference",) + paths_for(case):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[path] = run(model, layer, path, x, g)
        assert results[path][0].dtype == torch.float32  # run() upcasts; the layer itself returned bf16
    for path in paths_for(case):
        for a, b in zip(results[path][:3], results["reference"][:3]):
            assert_close(a, b, 3e-2, f"autocast {path}")


# ---------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_out_by_in_tensor_saved_for_backward(case):
    out_f, in_f = 32, 48
    model, layer = adapted(case, (out_f, in_f))
    x = torch.randn(6, in_f, requires_grad=True)  # 6 tokens: x itself is far smaller than out×in

    # references to the model's own parameters (nn.Linear keeps W0 for its input gradient, as with LoRA) cost no
    # memory; what must not exist is a new out×in tensor (ΔW, W0 + ΔW) held until backward
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_numels(path):
        set_path(layer, path)
        sizes = [0]

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        y.sum().backward()
        return sizes

    assert max(saved_numels("reference")) >= out_f * in_f  # the check can fail: PEFT's form keeps ΔW
    for path in paths_for(case):
        sizes = saved_numels(path)
        assert max(sizes) < out_f * in_f, f"{path} saved a tensor of {max(sizes)} elements"


@pytest.mark.parametrize("case", sorted(FOURIER))
def test_split_path_transforms_the_input_once_per_step(case):
    """Forward and backward of the split path run two forward FFTs in all (the input's, the output gradient's):
    backward reuses the input spectrum saved in forward instead of transforming the input again."""
    from torch.profiler import ProfilerActivity, profile

    model, layer = adapted(case, (24, 36))
    set_path(layer, "split")
    x = torch.randn(2, 5, 36, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    assert forward.last_paths(layer)["default"] == "split"
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::_fft_r2c", 0) == 2, f"forward FFTs: {counts.get('aten::_fft_r2c', 0)} (expected 2)"
    assert x.grad is not None and layer.coefficients.grad is not None


def test_merged_sparse_path_restores_the_base_weight_bitwise():
    model, layer = adapted("waveft", (15, 9))
    before = layer.base_layer.weight.detach().clone()
    version = layer.base_layer.weight._version
    run(model, layer, "merged", torch.randn(4, 9), torch.randn(4, 15))
    assert torch.equal(layer.base_layer.weight, before)
    assert layer.base_layer.weight._version == version


def test_cache_delta_is_refreshed_after_each_optimizer_step():
    shape = (24, 24)
    cached_model, cached = adapted("ssh", shape, cache_delta=True, path="merged")
    ref_model, ref = adapted("ssh", shape, path="reference")
    opts = [torch.optim.SGD([layer.coefficients], lr=0.1) for layer in (cached, ref)]
    for step in range(3):
        x, g = torch.randn(5, 24), torch.randn(5, 24)
        outs = []
        for model, layer, opt in zip((cached_model, ref_model), (cached, ref), opts):
            opt.zero_grad()
            y = model(x)
            (y * g).sum().backward()
            outs.append((y.detach(), layer.coefficients.grad.clone()))
            opt.step()
        assert_close(outs[0][0], outs[1][0], 2e-5, f"step {step} output")
        assert_close(outs[0][1], outs[1][1], 2e-5, f"step {step} gradient")
    assert forward.last_paths(cached)["default"] == "merged"


def _changes(case: str) -> list:
    """Public changes to an adapter after it has run; each must show in the next forward on every path."""
    def scaling(layer):
        layer.config.scaling *= 2

    def coefficients(layer):
        with torch.no_grad():
            layer.coefficients.mul_(-0.5).add_(0.1)

    def positions_in_place(layer):
        layer.positions.copy_(layer.positions.flip(1))

    def positions_replaced(layer):
        layer.sspeft_positions["default"] = layer.positions.roll(1, dims=1).clone()

    out = [scaling, coefficients, positions_in_place, positions_replaced]
    if case in FOURIER:
        out.append(lambda layer: setattr(layer.config, "normalization", "forward"))
    if case == "ssh":
        out.append(lambda layer: setattr(layer.config, "dht", "separable"))
    if case.startswith("waveft") and "periodic" not in case:
        out += [lambda layer: setattr(layer.config, "wavelet", "db2"),
                lambda layer: setattr(layer.config, "construction", "periodic")]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_follows_every_public_change(case):
    """forward == x·(W0 + delta_weight())ᵀ + b after each change to the config, positions or coefficients, on every
    path (cached plans and the cached ΔW are keyed on everything they are built from)."""
    shape = (20, 36)
    model, layer = adapted(case, shape, cache_delta=True)
    x = torch.randn(4, shape[1])
    for change in [None] + _changes(case):
        if change is not None:
            change(layer)
        with torch.no_grad():
            weight = layer.base_layer.weight + layer.delta_weight()
            expected = x @ weight.t() + layer.base_layer.bias
        for path in ("reference",) + paths_for(case):
            set_path(layer, path)
            with torch.no_grad():
                got = model(x)
            name = getattr(change, "__name__", "no change")
            assert_close(got, expected, 2e-5, f"{case} after {name}, path {path}")


# ---------------------------------------------------------------------------------------------------- choosing
def test_auto_choice_follows_tokens_and_method():
    _, fourier = adapted("ssh", (256, 256), n=200)
    assert forward.choose(fourier, "default", 8)[0] == "split"  # few tokens: per-token FFTs beat any d² transform
    assert forward.choose(fourier, "default", 1 << 16)[0] == "merged"  # many tokens: one irfft2 of ΔW is cheaper
    _, sparse = adapted("shira", (64, 64))
    assert forward.choose(sparse, "default", 512)[0] == "merged"
    sparse.base_layer.weight.requires_grad_(True)  # a trainable base needs autograd's own weight gradient
    assert forward.choose(sparse, "default", 512) == ("reference", "the base layer's parameters are trainable")


def test_unknown_path_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"SpectralConfig.path='fast'.*auto, reference, merged, split, factorized"):
        sspeft.SpectralConfig(method="ssh", path="fast")
    with pytest.raises(ValueError, match="path='factorized' is for ssh, lfma and fourierft"):
        sspeft.SpectralConfig(method="shira", path="factorized")


# ---------------------------------------------------------------------------------------------------- models
def llama_losses(method_kw: dict, path: str, checkpointing: str | None, dtype=torch.float32):
    from sspeft_helpers import tiny_llama

    model = tiny_llama(hidden=64, layers=2, dtype=dtype).train()
    sspeft.inject(model, sspeft.SpectralConfig(target_modules=["q_proj", "v_proj"], n=40, path=path, **method_kw))
    for i, layer in enumerate(sspeft.adapted_layers(model).values()):
        with torch.no_grad():
            layer.coefficients.copy_(0.3 * torch.randn(layer.coefficients.shape,
                                                       generator=torch.Generator().manual_seed(i)))
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: layer.coefficients.grad.clone() for n, layer in sspeft.adapted_layers(model).items()}
    used = {p for layer in sspeft.adapted_layers(model).values() for p in forward.last_paths(layer).values()}
    return loss.detach(), grads, used


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("case", ["ssh", "lfma", "waveft", "shira"])
def test_gradient_checkpointing_on_llama(case, checkpointing):
    ref_loss, ref_grads, _ = llama_losses(CASES[case], "reference", None)
    for path in paths_for(case):
        loss, grads, used = llama_losses(CASES[case], path, checkpointing)
        assert used == {path}
        assert_close(loss, ref_loss, 1e-5, f"{path} loss")
        for name in ref_grads:
            assert_close(grads[name], ref_grads[name], 1e-4, f"{path} {name} gradient")


# ---------------------------------------------------------------------------------------------------- 4-bit bases
@pytest.mark.parametrize("case", ["ssh", "fourierft", "lfma-half", "waveft-db3", "shira"])
def test_4bit_base_paths_match_reference(case):
    require_module("bitsandbytes")
    from sspeft_helpers import linear4bit_from

    torch.manual_seed(0)
    model = One(48, 64)
    model.proj = linear4bit_from(model.proj)  # a real NF4 Linear4bit (double quant), fp32 compute
    cfg = sspeft.SpectralConfig(target_modules=["proj"], n=40, **CASES[case])
    sspeft.inject(model, cfg)
    layer = sspeft.adapted_layers(model)["proj"]
    with torch.no_grad():
        layer.coefficients.copy_(torch.randn(layer.coefficients.shape))
    packed = layer.base_layer.weight.detach().clone()
    x, g = torch.randn(2, 5, 64), torch.randn(2, 5, 48)
    for path in paths_for(case):
        compare(model, layer, path, x, g, rel=2e-5)
    assert torch.equal(layer.base_layer.weight, packed)  # the packed 4-bit weight is never touched


def test_peft_multi_adapter_layers_sum_their_branches():
    """Two active adapters on one layer: each adds its own branch (merging needs exactly one)."""
    model, layer = adapted("ssh", (24, 24))
    second = copy.deepcopy(layer.sspeft_config["default"])
    layer.add_adapter("other", second, layer.positions.flip(1).clone(), torch.randn(layer.coefficients.shape))
    layer._active_adapter = ["default", "other"]
    x = torch.randn(4, 24)
    set_path(layer, "merged")
    y = model(x)
    assert set(forward.last_paths(layer).values()) == {"split"}
    set_path(layer, "reference")
    assert_close(y.detach(), model(x).detach(), 2e-5, "two adapters")
