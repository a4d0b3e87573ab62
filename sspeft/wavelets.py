"""Single-level 2-D inverse wavelet transform (periodization mode) as a sparse synthesis.

The coefficient matrix C (m'×n', both even) is laid out like ``pywt.idwt2`` subbands stacked as
``[[cA, cV], [cH, cD]]``: rows [0, m'/2) are low-pass along the rows, [m'/2, m') high-pass; likewise for columns.
With orthogonal filters and periodic extension the synthesis is an orthonormal basis, so
IDWT2(C) = R_m · C · R_nᵀ, where column i of R_N is a filter of length L placed at 2·i − (L/2 − 1) modulo N.
Each coefficient therefore writes one L×L (wrapped) block of ΔW: with p coefficients the update has at most p·L²
non-zeros, and we build it by scattering those blocks instead of running a dense transform.
Checked against PyWavelets (``mode="periodization"``) in the tests.
"""

from __future__ import annotations

import torch

# Reconstruction low-pass filters (rec_lo) of the orthogonal families the WaveFT paper evaluates. Values are the
# standard published coefficients; rec_hi[k] = (−1)^k · rec_lo[L−1−k].
_REC_LO: dict[str, tuple[float, ...]] = {
    "db1": (0.7071067811865476, 0.7071067811865476),
    "db2": (0.48296291314453416, 0.8365163037378079, 0.2241438680420134, -0.12940952255126037),
    "db3": (0.33267055295008263, 0.8068915093110925, 0.45987750211849154, -0.13501102001025458,
            -0.08544127388202666, 0.03522629188570953),
    "sym2": (0.48296291314469025, 0.836516303737469, 0.22414386804185735, -0.12940952255092145),
    "sym3": (0.3326705529509569, 0.8068915093133388, 0.4598775021193313, -0.13501102001039084,
             -0.08544127388224149, 0.035226291882100656),
    "sym4": (0.0322231006040427, -0.012603967262037833, -0.09921954357684722, 0.29785779560527736,
             0.8037387518059161, 0.49761866763201545, -0.02963552764599851, -0.07576571478927333),
    "coif1": (-0.07273261951252645, 0.3378976624574818, 0.8525720202116004, 0.3848648468648578,
              -0.07273261951252645, -0.015655728135791993),
    "coif2": (0.01638733646320364, -0.04146493678687178, -0.0673725547237256, 0.3861100668227629,
              0.8127236354494135, 0.4170051844232391, -0.07648859907828076, -0.05943441864643109,
              0.02368017194684777, 0.005611434819368834, -0.0018232088709110323, -0.000720549445520347),
}
_ALIASES = {"haar": "db1"}
SUPPORTED_WAVELETS = tuple(sorted(_REC_LO)) + tuple(sorted(_ALIASES))


def canonical_wavelet(name: str) -> str:
    """The canonical family name, or a ValueError listing the supported ones."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REC_LO:
        raise ValueError(
            f"SpectralConfig.wavelet={name!r} is not supported; expected one of {', '.join(SUPPORTED_WAVELETS)}"
        )
    return key


def filters(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rec_lo, rec_hi) in float64."""
    lo = torch.tensor(_REC_LO[canonical_wavelet(name)], dtype=torch.float64)
    length = lo.numel()
    sign = torch.tensor([(-1.0) ** k for k in range(length)], dtype=torch.float64)
    hi = sign * lo.flip(0)
    return lo, hi


def padded_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Coefficient-matrix shape for an m×n weight: both sizes rounded up to even."""
    m, n = shape
    return m + (m % 2), n + (n % 2)


def atoms(name: str, size: int, index: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and values of synthesis atoms ``index`` (coefficient indices along one axis of length ``size``).

    Returns (support, values), each (len(index), L): atom i has ``values[i, t]`` at row ``support[i, t]``.
    """
    lo, hi = filters(name)
    length = lo.numel()
    half = size // 2
    index = index.to(device=device)
    band_hi = index >= half
    j = torch.where(band_hi, index - half, index)
    taps = torch.arange(length, device=device)
    support = (2 * j[:, None] - (length // 2 - 1) + taps[None, :]) % size
    bank = torch.stack([lo, hi]).to(device=device, dtype=torch.float32)
    values = bank[band_hi.long()]
    return support, values


def idwt2_sparse(
    values: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int], wavelet: str
) -> torch.Tensor:
    """IDWT2 of the padded coefficient matrix holding ``values`` at ``positions``, cropped to ``shape`` (m, n).

    Linear in ``values`` and differentiable; costs O(p·L²) instead of a dense transform.
    """
    m, n = shape
    mp, np_ = padded_shape(shape)
    device = values.device
    row_sup, row_val = atoms(wavelet, mp, positions[0], device)
    col_sup, col_val = atoms(wavelet, np_, positions[1], device)
    length = row_sup.shape[1]
    # block[k, a, b] = values[k] · row_val[k, a] · col_val[k, b] at (row_sup[k, a], col_sup[k, b])
    block = values.float()[:, None, None] * row_val[:, :, None] * col_val[:, None, :]
    rows = row_sup[:, :, None].expand(-1, length, length)
    cols = col_sup[:, None, :].expand(-1, length, length)
    out = torch.zeros((mp, np_), dtype=torch.float32, device=device)
    out = out.index_put((rows.reshape(-1), cols.reshape(-1)), block.reshape(-1), accumulate=True)
    return out[:m, :n]


def dwt2_dense(x: torch.Tensor, wavelet: str) -> torch.Tensor:
    """Forward single-level DWT2 (periodization) of a padded-shape matrix, as the stacked coefficient matrix.

    The adjoint of the synthesis above (orthonormal, so also its inverse). Used to project a dense update onto the
    wavelet basis (tests, analysis); not on the training path.
    """
    mp, np_ = x.shape
    r = synthesis_matrix(wavelet, mp, x.device)
    c = synthesis_matrix(wavelet, np_, x.device)
    return r.T @ x.float() @ c


def synthesis_matrix(wavelet: str, size: int, device=None) -> torch.Tensor:
    """Dense R_N (size×size) whose column i is synthesis atom i; for tests and small analyses only."""
    idx = torch.arange(size, device=device)
    support, values = atoms(wavelet, size, idx, device)
    out = torch.zeros((size, size), dtype=torch.float32, device=device)
    cols = idx[:, None].expand_as(support)
    return out.index_put((support.reshape(-1), cols.reshape(-1)), values.reshape(-1), accumulate=True)
