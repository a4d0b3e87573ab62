"""Single-level 2-D inverse wavelet transforms as sparse syntheses, in two constructions.

``reference`` (SpectralConfig's default; the official WaveFT code and PEFT's WaveFT): positions live in the m×n weight grid and
are placed, centred, in an M×N coefficient matrix padded by the filter length (M = m + L − 2, rounded up to even);
the matrix is split as ``[[cA, cH], [cV, cD]]`` and reconstructed with ``waverec2`` under zero boundaries
(PyWavelets' ``mode="zero"``; PEFT's vendored conv_transpose2d), and the result is cropped back to m×n. Row p of
the output takes ``rec[p − 2i + L − 2]`` from coefficient row i, so each coefficient writes one L×L block, truncated
at the edges. The band of the row filter is set by the coefficient's *column* half (cH is high-pass along the rows)
and vice versa.

``periodic``: the coefficient matrix is the weight rounded up to even sizes, laid out ``[[cA, cV], [cH, cD]]`` (the
row half sets the row band), reconstructed in PyWavelets' ``mode="periodization"``: an orthonormal basis whose atoms
wrap around, cropped to m×n. Adapters trained before the construction was recorded use it.

For Haar at even sizes the two are the same set of 2×2 blocks under a relabelling of positions. Either way a
coefficient touches at most L² entries of ΔW: with p coefficients the update has at most p·L² non-zeros, and it is
built by scattering those blocks instead of running a dense transform. Both are checked against PyWavelets and the
reference against PEFT in the tests. Every function that depends on the construction takes it as a required
argument, so no caller gets one it did not state.
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
CONSTRUCTIONS = ("reference", "periodic")


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


def filter_length(name: str) -> int:
    return len(_REC_LO[canonical_wavelet(name)])


def padded_shape(shape: tuple[int, int], wavelet: str, construction: str) -> tuple[int, int]:
    """Coefficient-matrix shape M×N for an m×n weight: padded by L − 2 (reference) and rounded up to even."""
    extra = filter_length(wavelet) - 2 if construction == "reference" else 0
    return tuple(s + extra + (s + extra) % 2 for s in shape)


def position_grid(shape: tuple[int, int], construction: str) -> tuple[int, int]:
    """Where WaveFT positions are drawn: the weight grid (reference) or the even-padded matrix (periodic)."""
    return tuple(shape) if construction == "reference" else padded_shape(shape, "haar", "periodic")  # any wavelet


def _axis_atoms(lo_hi: torch.Tensor, index: torch.Tensor, high: torch.Tensor, half: int, offset: int, size: int | None):
    """(key, support, values) of the atoms along one axis: coefficient ``index`` within its band, ``high`` band flag.
    Tap a sits at 2·index + a − offset, wrapped modulo ``size`` when given (periodic)."""
    taps = torch.arange(lo_hi.shape[1], device=index.device)
    support = 2 * index[:, None] - offset + taps[None, :]
    if size is not None:
        support = support % size
    return index + half * high.long(), support, lo_hi[high.long()]


def synthesis_atoms(wavelet: str, shape: tuple[int, int], positions: torch.Tensor, construction: str):
    """Row and column atoms of every coefficient at ``positions`` (2, p) of the position grid.

    Returns ((row_key, row_support, row_values), (col_key, col_support, col_values)); support and values are
    (p, L), a support outside [0, m) / [0, n) is a tap the crop removes. ``key`` indexes the [low | high] halves of
    :func:`analysis` along that axis, so ∂L/∂c = scale·Σ_t analysis(g)[t, row_key]·analysis(x)[t, col_key].
    """
    lo, hi = filters(wavelet)
    length = lo.numel()
    device = positions.device
    bank = torch.stack([lo, hi]).to(device=device, dtype=torch.float32)
    rows, cols = positions[0].long(), positions[1].long()
    big_m, big_n = padded_shape(shape, wavelet, construction)
    hm, hn = big_m // 2, big_n // 2
    if construction == "periodic":
        row_high, col_high = rows >= hm, cols >= hn
        row = _axis_atoms(bank, rows - hm * row_high.long(), row_high, hm, length // 2 - 1, big_m)
        col = _axis_atoms(bank, cols - hn * col_high.long(), col_high, hn, length // 2 - 1, big_n)
        return row, col
    r = rows + (big_m - shape[0]) // 2  # centred in the padded matrix
    c = cols + (big_n - shape[1]) // 2
    r_second, c_second = r >= hm, c >= hn  # bottom half (cV, cD), right half (cH, cD)
    row = _axis_atoms(bank, r - hm * r_second.long(), c_second, hm, length - 2, None)
    col = _axis_atoms(bank, c - hn * c_second.long(), r_second, hn, length - 2, None)
    return row, col


def idwt2_sparse(
    values: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int], wavelet: str, construction: str,
) -> torch.Tensor:
    """ΔW (m, n) of the coefficient matrix holding ``values`` at ``positions`` (of the position grid).

    Linear in ``values`` and differentiable; costs O(p·L²) instead of a dense transform.
    """
    m, n = shape
    (_, row_sup, row_val), (_, col_sup, col_val) = synthesis_atoms(wavelet, shape, positions.to(values.device),
                                                                   construction)
    length = row_sup.shape[1]
    # block[k, a, b] = values[k] · row_val[k, a] · col_val[k, b] at (row_sup[k, a], col_sup[k, b])
    block = values.float()[:, None, None] * row_val[:, :, None] * col_val[:, None, :]
    rows = row_sup[:, :, None].expand(-1, length, length).reshape(-1)
    cols = col_sup[:, None, :].expand(-1, length, length).reshape(-1)
    keep = (rows >= 0) & (rows < m) & (cols >= 0) & (cols < n)
    out = torch.zeros((m, n), dtype=torch.float32, device=values.device)
    return out.index_put((rows[keep], cols[keep]), block.reshape(-1)[keep], accumulate=True)


def analysis(v: torch.Tensor, wavelet: str, size: int, construction: str) -> torch.Tensor:
    """v·R along the last dim (length ``size`` of the weight): each synthesis atom's inner product with v, laid out
    [low | high] as the keys of :func:`synthesis_atoms`. The adjoint of the synthesis along one axis, fp32."""
    lo, hi = filters(wavelet)
    length = lo.numel()
    big = padded_shape((size, size), wavelet, construction)[0]
    v = v.float()
    if construction == "reference":
        # coefficient i reads v[2i + a − (L − 2)], zero outside [0, size): a stride-2 correlation of the padded v
        padded = torch.nn.functional.pad(v.reshape(-1, 1, size), (length - 2, big - size))
        bank = torch.stack([lo, hi]).float().to(v.device)[:, None, :]
        out = torch.nn.functional.conv1d(padded, bank, stride=2)  # (T, 2, big/2)
        return out.reshape(*v.shape[:-1], big)
    v = torch.nn.functional.pad(v, (0, big - size))
    halves = (v[..., 0::2], v[..., 1::2])  # tap t of atom j sits at (2j + s) mod big, s = t − (L/2 − 1)
    low = torch.zeros_like(halves[0])
    high = torch.zeros_like(halves[0])
    for t in range(length):
        s = t - (length // 2 - 1)
        src = halves[s % 2].roll(-(s // 2), dims=-1)
        low.add_(src, alpha=float(lo[t]))
        high.add_(src, alpha=float(hi[t]))
    return torch.cat([low, high], dim=-1)


def synthesis_matrix(wavelet: str, size: int, device=None) -> torch.Tensor:
    """Dense periodic R_N (size×size, even) whose column i is synthesis atom i; for tests and small analyses."""
    idx = torch.arange(size, device=device)
    lo, hi = filters(wavelet)
    bank = torch.stack([lo, hi]).to(device=device, dtype=torch.float32)
    high = idx >= size // 2
    _, support, values = _axis_atoms(bank, idx - size // 2 * high.long(), high, size // 2, lo.numel() // 2 - 1, size)
    out = torch.zeros((size, size), dtype=torch.float32, device=device)
    cols = idx[:, None].expand_as(support)
    return out.index_put((support.reshape(-1), cols.reshape(-1)), values.reshape(-1), accumulate=True)
