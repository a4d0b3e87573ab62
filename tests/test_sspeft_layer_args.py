"""SpectralLinear checks an adapter's arguments when it is added (not only when one is read from disk): each bad
argument raises naming the adapter, the layer, the value and what was expected, and nothing is stored."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sspeft

SHAPE = (16, 24)  # (out, in)


def _layer_and_args(method: str = "shira", n: int = 4):
    cfg = sspeft.SpectralConfig(method=method, n=n, target_modules=["x"]).resolved()
    positions = torch.tensor([[0, 1, 2, 15], [0, 5, 23, 7]])[:, :n]
    coefficients = torch.zeros((n, 2) if method == "lfma" else (n,))
    torch.manual_seed(0)
    return nn.Linear(SHAPE[1], SHAPE[0]), cfg, positions, coefficients


def test_valid_arguments_are_stored_as_fp32_and_int64():
    base, cfg, positions, coefficients = _layer_and_args()
    layer = sspeft.SpectralLinear(base, "default", cfg, positions.int(), coefficients.double())
    assert layer.positions.dtype == torch.int64 and torch.equal(layer.positions, positions)
    assert layer.coefficients.dtype == torch.float32 and layer.coefficients.requires_grad


BAD = {
    "positions-rows": (dict(positions=torch.zeros(3, 4, dtype=torch.long)), r"expected \(4,\) coefficients at \(2, 4\)"),
    "positions-1d": (dict(positions=torch.arange(4)), r"positions of shape \(4,\); expected \(2, n\)"),
    "positions-float": (dict(positions=torch.tensor([[0.0, 1, 2, 3], [0, 1, 2, 3]])), r"dtype torch.float32; expected an integer"),
    "positions-row-range": (dict(positions=torch.tensor([[0, 1, 2, 16], [0, 1, 2, 3]])), r"outside its 16×24 .* rows in 0..15"),
    "positions-negative": (dict(positions=torch.tensor([[0, 1, 2, 3], [0, -1, 2, 3]])), r"outside its 16×24"),
    "positions-repeated": (dict(positions=torch.tensor([[0, 1, 1, 3], [0, 2, 2, 3]])), r"lists 1 position\(s\) twice"),
    "coefficients-shape": (dict(coefficients=torch.zeros(5)), r"holds \(5,\) coefficients .* expected \(4,\)"),
    "coefficients-int": (dict(coefficients=torch.zeros(4, dtype=torch.long)), r"dtype torch.int64; expected a float"),
    "coefficients-nan": (dict(coefficients=torch.tensor([0.0, math.nan, 0, 0])), r"1 non-finite coefficient"),
    "config-unresolved": (dict(config=sspeft.SpectralConfig(method="shira", n=4)), r"scaling=None.*resolved"),
    "config-scaling": (dict(config=sspeft.SpectralConfig(method="shira", n=4, scaling=math.inf).resolved()),
                       r"config.scaling=inf; expected a finite number"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_argument_is_refused_when_the_adapter_is_added(case):
    change, message = BAD[case]
    base, cfg, positions, coefficients = _layer_and_args()
    args = dict(config=cfg, positions=positions, coefficients=coefficients)
    args.update(change)
    with pytest.raises(ValueError, match=r"SpectralLinear adapter 'default' on a 16×24 layer.*" + message):
        sspeft.SpectralLinear(base, "default", args["config"], args["positions"], args["coefficients"])
    layer = sspeft.SpectralLinear(base, "default", cfg, positions, coefficients)
    with pytest.raises(ValueError, match=r"SpectralLinear adapter 'second'.*" + message):
        layer.add_adapter("second", args["config"], args["positions"], args["coefficients"])
    assert list(layer.sspeft_coefficients) == ["default"] and list(layer.sspeft_positions.keys()) == ["default"]
    assert list(layer.sspeft_config) == ["default"], "a refused adapter left something behind"


def test_lfma_coefficients_are_real_imaginary_pairs():
    base, cfg, positions, coefficients = _layer_and_args("lfma")
    sspeft.SpectralLinear(base, "default", cfg, positions, coefficients)
    with pytest.raises(ValueError, match=r"holds \(4,\) coefficients .* expected \(4, 2\)"):
        sspeft.SpectralLinear(base, "default", cfg, positions, torch.zeros(4))


def test_positions_of_a_periodic_waveft_adapter_live_in_the_padded_grid():
    """WaveFT 'periodic' draws positions in the even-padded grid: a row index m is valid for an odd m only there."""
    base = nn.Linear(7, 9)
    positions = torch.tensor([[9], [0]])
    periodic = sspeft.SpectralConfig(method="waveft", n=1, target_modules=["x"], construction="periodic").resolved()
    sspeft.SpectralLinear(base, "default", periodic, positions, torch.zeros(1))
    reference = sspeft.SpectralConfig(method="waveft", n=1, target_modules=["x"]).resolved()
    with pytest.raises(ValueError, match=r"outside its 9×7 coefficient matrix"):
        sspeft.SpectralLinear(base, "default", reference, positions, torch.zeros(1))
