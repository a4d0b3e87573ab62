"""Transform oracles: DHT (both definitions) against explicit cas-matrix products, FFT normalisations, every
wavelet family against PyWavelets, on square, non-square and odd shapes."""

import math

import numpy as np
import pytest
import torch

from sspeft import wavelets
from sspeft.transforms import cas_matrix, dht2, idht2

SHAPES = [(8, 8), (6, 10), (7, 5), (1, 9)]


def _cas_nonseparable(m: int, n: int) -> torch.Tensor:
    """Explicit (mn × mn) kernel cas(2π(kp/m + lq/n)) in float64, rows (k, l), columns (p, q)."""
    rows = 2 * math.pi * torch.outer(torch.arange(m), torch.arange(m)).double() / m  # [k, p]
    cols = 2 * math.pi * torch.outer(torch.arange(n), torch.arange(n)).double() / n  # [l, q]
    angle = rows[:, None, :, None] + cols[None, :, None, :]  # [k, l, p, q]
    return (torch.cos(angle) + torch.sin(angle)).reshape(m * n, m * n)


@pytest.mark.parametrize("shape", SHAPES)
def test_standard_dht_matches_explicit_cas_kernel(shape):
    m, n = shape
    w = torch.randn(m, n, dtype=torch.float64)
    expected = (_cas_nonseparable(m, n) @ w.reshape(-1)).reshape(m, n)
    got = dht2(w, "standard", norm="backward")
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_separable_dht_matches_cas_matrix_product(shape):
    m, n = shape
    w = torch.randn(m, n)
    expected = cas_matrix(m).double() @ w.double() @ cas_matrix(n).double()
    torch.testing.assert_close(dht2(w, "separable", norm="backward").double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["standard", "separable"])
@pytest.mark.parametrize("norm", ["backward", "ortho", "forward"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dht_inverse_and_norm(variant, norm, shape):
    w = torch.randn(*shape)
    torch.testing.assert_close(idht2(dht2(w, variant, norm), variant, norm), w, atol=1e-5, rtol=1e-5)
    if norm == "ortho":  # self-inverse and norm-preserving
        torch.testing.assert_close(dht2(dht2(w, variant, norm), variant, norm), w, atol=1e-5, rtol=1e-5)
        assert dht2(w, variant, norm).norm().item() == pytest.approx(w.norm().item(), rel=1e-5)


def test_dht_runs_in_fp32_for_bf16_input():
    w = torch.randn(6, 4).bfloat16()
    assert dht2(w).dtype == torch.float32


@pytest.mark.parametrize("norm", ["backward", "ortho"])
def test_fourier_normalisation_matches_numpy(norm):
    s = np.random.default_rng(0).normal(size=(5, 7))
    got = torch.fft.ifft2(torch.tensor(s), norm=norm).real.numpy()
    np.testing.assert_allclose(got, np.fft.ifft2(s, norm=norm).real, atol=1e-12)


pywt = pytest.importorskip("pywt")
FAMILIES = ["db1", "db2", "db3", "sym2", "sym3", "sym4", "coif1", "coif2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(8, 8), (6, 12), (7, 5), (16, 4)])
def test_sparse_idwt2_matches_pywavelets(family, shape):
    m, n = shape
    mp, np_ = wavelets.padded_shape(shape)
    coeffs = torch.randn(mp, np_, dtype=torch.float64)
    half_r, half_c = mp // 2, np_ // 2
    ca, cv = coeffs[:half_r, :half_c], coeffs[:half_r, half_c:]
    ch, cd = coeffs[half_r:, :half_c], coeffs[half_r:, half_c:]
    expected = pywt.idwt2((ca.numpy(), (ch.numpy(), cv.numpy(), cd.numpy())), family, mode="periodization")[:m, :n]
    rows, cols = torch.meshgrid(torch.arange(mp), torch.arange(np_), indexing="ij")
    positions = torch.stack([rows.reshape(-1), cols.reshape(-1)])
    got = wavelets.idwt2_sparse(coeffs.reshape(-1).float(), positions, shape, family)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_synthesis_is_orthonormal(family):
    r = wavelets.synthesis_matrix(family, 12).double()
    torch.testing.assert_close(r.T @ r, torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)


def test_haar_coefficient_writes_one_2x2_block():
    positions = torch.tensor([[1], [6]])  # row 1 (low band), col 6 (high band of 8 columns)
    delta = wavelets.idwt2_sparse(torch.tensor([2.0]), positions, (8, 8), "haar")
    assert int((delta != 0).sum()) == 4
    nz = delta.nonzero()
    assert set(nz[:, 0].tolist()) == {2, 3} and set(nz[:, 1].tolist()) == {4, 5}
    assert delta.abs().max().item() == pytest.approx(1.0)  # 2 · (1/√2)²


def test_unsupported_wavelet_lists_supported():
    with pytest.raises(ValueError, match=r"wavelet='db7'.*expected one of.*coif2.*haar"):
        wavelets.canonical_wavelet("db7")
