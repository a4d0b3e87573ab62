"""Where the positions are and how many parameters the methods train."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sspeft
from sspeft import methods
from sspeft.transforms import dht2


def _single(out_f: int, in_f: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.q_proj = nn.Linear(in_f, out_f, bias=False)
    return model


@pytest.mark.parametrize("variant", ["standard", "separable"])
def test_ssh_delta_one_takes_exactly_the_top_energy_positions(variant):
    model = _single(20, 30)
    weight = model.q_proj.weight.detach().clone()
    layer = sspeft.adapted_layers(
        sspeft.inject(model, sspeft.SpectralConfig(method="ssh", n=40, delta=1.0, dht=variant, target_modules=["q_proj"]))
    )["q_proj"]
    energy = dht2(weight, variant, "ortho").pow(2).flatten()
    expected = set(torch.topk(energy, 40).indices.tolist())
    got = set((layer.positions[0] * 30 + layer.positions[1]).tolist())
    assert got == expected


def test_ssh_mixes_energy_and_seeded_random_positions():
    cfg = sspeft.SpectralConfig(method="ssh", n=50, delta=0.7, seed=1).resolved()
    weight = torch.randn(32, 24)
    pos = methods.select_positions(cfg, weight, "layers.0.q_proj")
    flat = (pos[0] * 24 + pos[1]).tolist()
    assert len(set(flat)) == 50
    top = torch.topk(dht2(weight, "standard", "ortho").pow(2).flatten(), 35).indices.tolist()
    assert flat[:35] == top  # round(0.7·50) by energy, in energy order
    assert not set(flat[35:]) & set(top)
    again = methods.select_positions(cfg, weight, "layers.0.q_proj")
    other_layer = methods.select_positions(cfg, weight, "layers.1.q_proj")
    other_seed = methods.select_positions(sspeft.SpectralConfig(method="ssh", n=50, seed=2).resolved(), weight, "layers.0.q_proj")
    assert torch.equal(again, pos)
    assert not torch.equal(other_layer[:, 35:], pos[:, 35:])
    assert not torch.equal(other_seed[:, 35:], pos[:, 35:])


@pytest.mark.parametrize("half", [False, True])
def test_lfma_takes_exactly_the_top_k_magnitudes(half):
    model = _single(16, 12)
    weight = model.q_proj.weight.detach().clone()
    cfg = sspeft.SpectralConfig(method="lfma", n=10, half_spectrum=half, target_modules=["q_proj"])
    layer = sspeft.adapted_layers(sspeft.inject(model, cfg))["q_proj"]
    spectrum = (torch.fft.rfft2 if half else torch.fft.fft2)(0.01 * weight, norm="ortho")
    cols = spectrum.shape[1]
    expected = set(torch.topk(spectrum.abs().flatten(), 10).indices.tolist())
    assert set((layer.positions[0] * cols + layer.positions[1]).tolist()) == expected
    # coefficients start at the selected spectrum values (the paper's init), 2 reals each
    picked = spectrum[layer.positions[0], layer.positions[1]]
    torch.testing.assert_close(torch.view_as_complex(layer.coefficients.detach()), picked.to(torch.complex64))
    assert sspeft.count_trainable(model) == 20


@pytest.mark.parametrize("half", [False, True])
def test_lfma_full_spectrum_top_k_spans_half_its_trainable_reals(half):
    """|FFT(W0)| of a real W0 is conjugate-symmetric, so full-spectrum top-k picks frequencies in pairs (f, −f) whose
    real inverse parts span the same ΔW: 2k trainable reals reach ~k dimensions. The rfft2 half-plane does not."""
    model = _single(16, 12, seed=3)
    cfg = sspeft.SpectralConfig(method="lfma", n=20, half_spectrum=half, target_modules=["q_proj"])
    layer = sspeft.adapted_layers(sspeft.inject(model, cfg))["q_proj"]
    rows, cols = layer.positions.tolist()
    chosen = set(zip(rows, cols))
    paired = sum(((-r) % 16, (-c) % 12) in chosen for r, c in chosen)
    jac = torch.autograd.functional.jacobian(lambda c: methods.delta_weight(
        layer.sspeft_config["default"], c, layer.positions, (16, 12)), layer.coefficients.detach())
    dims = torch.linalg.matrix_rank(jac.reshape(16 * 12, -1).double()).item()
    assert sspeft.count_trainable(model) == 40
    if half:  # pairs remain only inside rfft2's self-conjugate columns (0 and n/2); each costs 2 reals
        assert all(c in (0, 6) for r, c in chosen if ((-r) % 16, (-c) % 12) in chosen)
        assert paired <= 6 and dims >= 40 - 2 * paired
    else:
        assert paired >= 18 and dims <= 22


def test_lfma_top_k_ratio_and_shira_rank_counts():
    lfma = sspeft.inject(_single(40, 50), sspeft.SpectralConfig(method="lfma", top_k_ratio=0.01, target_modules=["q_proj"]))
    assert sspeft.adapted_layers(lfma)["q_proj"].positions.shape[1] == math.floor(0.01 * 40 * 50)
    shira = sspeft.inject(_single(40, 50), sspeft.SpectralConfig(method="shira", r=2, target_modules=["q_proj"]))
    assert sspeft.count_trainable(shira) == 2 * (40 + 50)


@pytest.mark.parametrize("construction, grid", [("reference", (7, 9)), ("periodic", (8, 10))])
def test_waveft_positions_live_in_their_grid(construction, grid):
    """Reference: drawn in the m×n weight grid (PEFT, official code); periodic: in the even-padded matrix."""
    cfg = sspeft.SpectralConfig(method="waveft", n=63, target_modules=["q_proj"], construction=construction)
    pos = sspeft.adapted_layers(sspeft.inject(_single(7, 9), cfg))["q_proj"].positions
    flat = set((pos[0] * grid[1] + pos[1]).tolist())
    assert pos[0].max() < grid[0] and pos[1].max() < grid[1] and len(flat) == 63
    with pytest.raises(ValueError, match=r"n=64 is larger than the 7×9=63 coefficient positions"):
        sspeft.inject(_single(7, 9), sspeft.SpectralConfig(method="waveft", n=64, target_modules=["q_proj"]))


def test_fourierft_initial_coefficients_are_drawn_per_layer():
    """Positions shared by same-shape layers (PEFT's rule), initial coefficients per layer, reproducible per seed."""
    cfg = sspeft.SpectralConfig(method="fourierft", n=30, seed=7).resolved()
    weight = torch.randn(12, 20)
    pos = methods.select_positions(cfg, weight, "a.q_proj")
    a = methods.init_coefficients(cfg, weight, pos, "a.q_proj")
    b = methods.init_coefficients(cfg, weight, pos, "b.q_proj")
    assert not torch.equal(a, b) and torch.equal(a, methods.init_coefficients(cfg, weight, pos, "a.q_proj"))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.6


def test_fourierft_shared_positions_follow_peft_rule():
    cfg = sspeft.SpectralConfig(method="fourierft", n=30, seed=7).resolved()
    weight = torch.randn(12, 20)
    pos = methods.select_positions(cfg, weight, "a.q_proj")
    assert torch.equal(pos, methods.select_positions(cfg, torch.randn(12, 20), "b.q_proj"))  # same in every layer
    flat = torch.randperm(12 * 20, generator=torch.Generator().manual_seed(7))[:30]
    assert torch.equal(pos, torch.stack([flat // 20, flat % 20]))


def test_ssh_global_budget_ranks_energy_across_layers():
    torch.manual_seed(0)
    model = nn.Module()
    model.a = nn.Linear(16, 16, bias=False)
    model.b = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        model.b.weight.mul_(10)  # far more energy: the energy share should go to b
    weights = {"a": model.a.weight.detach().clone(), "b": model.b.weight.detach().clone()}
    cfg = sspeft.SpectralConfig(method="ssh", n=20, delta=1.0, budget="global", target_modules=["a", "b"])
    layers = sspeft.adapted_layers(sspeft.inject(model, cfg))
    assert sum(l.positions.shape[1] for l in layers.values()) == 40
    all_energy = torch.cat([dht2(weights[k], "standard", "ortho").pow(2).flatten() for k in ("a", "b")])
    threshold = torch.topk(all_energy, 40).values.min()
    for name, layer in layers.items():
        e = dht2(weights[name], "standard", "ortho").pow(2)
        assert (e[layer.positions[0], layer.positions[1]] >= threshold).all()
    assert layers["b"].positions.shape[1] > layers["a"].positions.shape[1]


def test_parameter_count_matches_ssh_abstract():
    """SSH n=750 on q,v of a 32-layer LLaMA-shaped model = 48,000 (the 0.048M of the SSH abstract)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32,
    )
    model = transformers.LlamaForCausalLM(cfg)
    sspeft.inject(model, sspeft.SpectralConfig(method="ssh", n=750, target_modules=["q_proj", "v_proj"]))
    assert sspeft.count_trainable(model) == 48_000
    assert len(sspeft.adapted_layers(model)) == 64
    assert set(sspeft.adapted_layers(model)) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(32) for p in ("q_proj", "v_proj")
    }


def test_all_linear_excludes_the_head():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=40)
    model = sspeft.inject(transformers.LlamaForCausalLM(cfg), sspeft.SpectralConfig(method="shira", n=10, target_modules="all-linear"))
    leaves = {n.split(".")[-1] for n in sspeft.adapted_layers(model)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
