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


WAVELET_SHAPES = [(8, 8), (6, 12), (7, 5), (16, 4), (9, 13)]


def _all_positions(rows: int, cols: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r.reshape(-1), c.reshape(-1)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", WAVELET_SHAPES)
def test_periodic_idwt2_matches_pywavelets(family, shape):
    m, n = shape
    mp, np_ = wavelets.padded_shape(shape, family, "periodic")
    coeffs = torch.randn(mp, np_, dtype=torch.float64)
    half_r, half_c = mp // 2, np_ // 2
    ca, cv = coeffs[:half_r, :half_c], coeffs[:half_r, half_c:]
    ch, cd = coeffs[half_r:, :half_c], coeffs[half_r:, half_c:]
    expected = pywt.idwt2((ca.numpy(), (ch.numpy(), cv.numpy(), cd.numpy())), family, mode="periodization")[:m, :n]
    got = wavelets.idwt2_sparse(coeffs.reshape(-1).float(), _all_positions(mp, np_), shape, family, "periodic")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", WAVELET_SHAPES)
def test_reference_idwt2_matches_pywavelets_zero_mode(family, shape):
    """Positions in the m×n grid, centred in the filter-padded matrix, [[cA, cH], [cV, cD]], waverec2 with zero
    boundaries, centre crop."""
    m, n = shape
    big_m, big_n = wavelets.padded_shape(shape, family, "reference")
    length = wavelets.filter_length(family)
    assert (big_m, big_n) == tuple(s + length - 2 + (s + length - 2) % 2 for s in shape)
    values = torch.randn(m * n, dtype=torch.float64)
    dense = torch.zeros(big_m, big_n, dtype=torch.float64)
    r0, c0 = (big_m - m) // 2, (big_n - n) // 2
    dense[r0:r0 + m, c0:c0 + n] = values.reshape(m, n)
    h, w = big_m // 2, big_n // 2
    ca, ch, cv, cd = (b.numpy() for b in (dense[:h, :w], dense[:h, w:], dense[h:, :w], dense[h:, w:]))
    full = pywt.idwt2((ca, (ch, cv, cd)), family, mode="zero")
    sr, sc = (full.shape[0] - m) // 2, (full.shape[1] - n) // 2
    expected = full[sr:sr + m, sc:sc + n]
    got = wavelets.idwt2_sparse(values.float(), _all_positions(m, n), shape, family, "reference")
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("construction", wavelets.CONSTRUCTIONS)
@pytest.mark.parametrize("family", ["db1", "db3", "coif1"])
def test_analysis_is_the_adjoint_of_the_synthesis(construction, family):
    """analysis(g)[key_j] = ⟨g, atom_j⟩ along each axis, for every coefficient (what the sampled gradients read)."""
    shape = (11, 6)
    grid = wavelets.position_grid(shape, construction)
    positions = _all_positions(*grid)
    (r_key, r_sup, r_val), (c_key, c_sup, c_val) = wavelets.synthesis_atoms(family, shape, positions, construction)
    g, x = torch.randn(3, shape[0]), torch.randn(3, shape[1])
    for v, key, sup, val in ((g, r_key, r_sup, r_val), (x, c_key, c_sup, c_val)):
        size = v.shape[1]
        inside = (sup >= 0) & (sup < size)
        direct = (v[:, sup.clamp(0, size - 1)] * (val * inside)).sum(-1)  # (3, p)
        torch.testing.assert_close(wavelets.analysis(v, family, size, construction)[:, key], direct, atol=1e-5, rtol=0)


def test_haar_constructions_are_a_relabelling_at_even_sizes():
    """Haar at even sizes: both constructions write the same 2×2 blocks; reference (r, c) is periodic (c', r'')
    with the quadrant's role swapped: cH (top right) is high-pass along the rows."""
    positions = torch.tensor([[1], [6]])  # row 1, col 6 of 8 (right half): cH — high-pass rows, low-pass columns
    ref = wavelets.idwt2_sparse(torch.tensor([1.0]), positions, (8, 8), "haar", "reference")
    per = wavelets.idwt2_sparse(torch.tensor([1.0]), torch.tensor([[5], [2]]), (8, 8), "haar", "periodic")
    torch.testing.assert_close(ref, per, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_synthesis_is_orthonormal(family):
    r = wavelets.synthesis_matrix(family, 12).double()
    torch.testing.assert_close(r.T @ r, torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)


def test_haar_coefficient_writes_one_2x2_block():
    positions = torch.tensor([[1], [6]])  # row 1 (low band), col 6 (high band of 8 columns)
    delta = wavelets.idwt2_sparse(torch.tensor([2.0]), positions, (8, 8), "haar", "periodic")
    assert int((delta != 0).sum()) == 4
    nz = delta.nonzero()
    assert set(nz[:, 0].tolist()) == {2, 3} and set(nz[:, 1].tolist()) == {4, 5}
    assert delta.abs().max().item() == pytest.approx(1.0)  # 2 · (1/√2)²


def test_unsupported_wavelet_lists_supported():
    with pytest.raises(ValueError, match=r"wavelet='db7'.*expected one of.*coif2.*haar"):
        wavelets.canonical_wavelet("db7")
