"""Separable atoms: each method's ΔW written as a sum of row × column atoms, with the index tables the fast
paths in `forward.py` need. Built once per (layer, adapter, positions) and cached; nothing here is out×in sized.

Fourier family (ssh, fourierft, lfma). Every one of them is, exactly,

    ΔW[p, q] = Re Σ_a z_a · exp(i·2π·(k_a·p/m + l_a·q/n)),    z_a = γ_a · ĉ_{j(a)}

with ĉ the coefficients as complex numbers (real methods: imaginary part 0), γ_a a complex constant holding the
scaling, the normalisation and the transform's kernel (cas θ = Re((1−i)·e^{iθ}) for the standard DHT; the separable
DHT is two atoms per position: cos(a−b) + sin(a+b)). So
  * a dense ΔW is one irfft2 of a half spectrum holding ≤ 2 entries per atom;
  * x·ΔWᵀ per token is rfft along the input features, a gather at l_a, a scatter at k_a and an irfft along the
    output features (no out×in tensor);
  * ∂L/∂z_a = conj Σ_t X̃[t, l_a]·G̃[t, k_a] with X̃, G̃ the per-token spectra of x and of the output gradient:
    the coefficient gradient is sampled from two per-token FFTs instead of the full Gᵀ·X product.

Sparse family (shira, waveft): ΔW = α·Σ_j c_j·r_j·c_jᵀ with r_j, c_j the row and column synthesis atoms of
coefficient j (L taps each, cropped to the weight; unit vectors for SHiRA; see sspeft/wavelets.py), so ΔW has at
most n·L² non-zero entries, and ∂L/∂c_j = α·Σ_t (g·r_j)[t]·(x·c_j)[t] — a sampled dense-dense product of two
per-token 1-D analyses.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .config import SpectralConfig
from .transforms import inverse_factor
from . import wavelets

FOURIER_METHODS = ("ssh", "fourierft", "lfma")
PLAN_FIELDS = ("method", "scaling", "normalization", "dht", "half_spectrum", "wavelet", "construction")
"""The SpectralConfig fields a plan is built from (fourier_plan, sparse_plan); a change to any of them rebuilds it."""


def plan_inputs(cfg: SpectralConfig) -> tuple:
    return tuple(getattr(cfg, f) for f in PLAN_FIELDS)


# ---------------------------------------------------------------------------------------------------- Fourier plan
def cmul(ar, ai, br, bi):
    """(ar + i·ai)(br + i·bi) as (real, imaginary) parts."""
    return ar * br - ai * bi, ar * bi + ai * br


@dataclass
class FourierPlan:
    """ΔW of an ssh/fourierft/lfma adapter as A complex atoms (see the module docstring).

    Atoms are stored canonically with l ≤ n/2 (an atom (k, l, z) equals (−k, −l, conj z)), so the per-token input
    spectrum at every atom is read straight from ihfft(x) and only the output side needs a conjugation sign.
    """

    shape: tuple[int, int]
    coef: torch.Tensor
    """(A,) coefficient feeding each atom."""
    k: torch.Tensor
    """(A,) output-side (row) frequency of each atom, in [0, m)."""
    l: torch.Tensor
    """(A,) input-side (column) frequency, in [0, n/2] after canonicalisation."""
    gamma: torch.Tensor
    """(A, 2) complex constant (re, im) of each atom."""
    conj_coef: torch.Tensor
    """(A,) −1 where the atom was flipped and takes the conjugate coefficient (LFMA), else +1."""
    complex_coefficients: bool
    """LFMA: coefficients are (n, 2) real/imag pairs."""
    cas_scale: float | None
    """Separable DHT only: ΔW = cas_scale·Σ_j c_j·cas(2π·k_j·p/m)·cas(2π·l_j·q/n), a real rank-n factorisation."""
    cas_rows: torch.Tensor | None = None
    cas_cols: torch.Tensor | None = None

    def __post_init__(self) -> None:
        m, n = self.shape
        k = self.k
        low = k <= m // 2
        self.k_index = torch.where(low, k, m - k)
        # output side: irfft's half spectrum takes w/2 at k ≤ m/2, conj(w)/2 at m − k, and Re w at bins 0 and m/2
        self.k_sign = torch.stack([torch.ones_like(k, dtype=torch.float32), torch.where(low, 1.0, -1.0)], -1)
        self.k_scale = torch.where((k == 0) | (2 * k == m), 1.0, 0.5)
        self.l_scale = torch.where((self.l == 0) | (2 * self.l == n), 1.0, 0.5)
        self._build_2d_entries()

    @property
    def atoms(self) -> int:
        return int(self.k.numel())

    @property
    def factor_rank(self) -> int:
        """Real rank of the factorised path: n for the separable DHT (cas·cas), 2·atoms otherwise (cos and sin)."""
        return int(self.cas_rows.numel()) if self.cas_scale is not None else 2 * self.atoms

    # ------------------------------------------------------------------ coefficients → atom weights (autograd)
    def atom_weights(self, coefficients: torch.Tensor) -> torch.Tensor:
        """z (A, 2) as (re, im), differentiable in the coefficients (tiny: A values)."""
        c = coefficients.float()
        gr, gi = self.gamma[:, 0], self.gamma[:, 1]
        if not self.complex_coefficients:
            cr = c[self.coef]
            return torch.stack([gr * cr, gi * cr], dim=-1)
        zr, zi = cmul(gr, gi, c[self.coef, 0], c[self.coef, 1] * self.conj_coef)
        return torch.stack([zr, zi], dim=-1)

    # ------------------------------------------------------------------ dense ΔW (merged path)
    def _build_2d_entries(self) -> None:
        m, n = self.shape
        k, l = self.k, self.l  # l ≤ n/2 already
        half = n // 2 + 1
        self_conj_col = (l == 0) | (2 * l == n)
        src = torch.arange(self.atoms, device=k.device)
        # inner columns: z/2 at (k, l) (irfft2 supplies the mirror); bins 0 and n/2: z/2 and conj(z)/2 at (±k, l)
        rows = torch.cat([k, ((m - k) % m)[self_conj_col]])
        cols = torch.cat([l, l[self_conj_col]])
        self.e_flat = (rows * half + cols).long()
        self.e_src = torch.cat([src, src[self_conj_col]])
        self.e_imag = torch.cat([torch.ones(self.atoms, device=k.device),
                                 -torch.ones(int(self_conj_col.sum()), device=k.device)])

    def dense_delta(self, z: torch.Tensor) -> torch.Tensor:
        """ΔW (m, n) fp32 from atom weights: one irfft2 of a half spectrum with ≤ 2 entries per atom."""
        m, n = self.shape
        z = z.detach().float()
        values = torch.stack([0.5 * z[self.e_src, 0], 0.5 * z[self.e_src, 1] * self.e_imag], dim=-1)
        spectrum = torch.zeros(m * (n // 2 + 1), 2, device=z.device)
        spectrum.index_add_(0, self.e_flat, values)
        spectrum = torch.view_as_complex(spectrum).view(m, n // 2 + 1)
        return torch.fft.irfft2(spectrum, s=(m, n), norm="forward")

    # ------------------------------------------------------------------ per-token spectra (split path, gradients)
    def analysis_in(self, x2: torch.Tensor) -> torch.Tensor:
        """X̃[t, a] = Σ_q x[t, q]·e^{+i2π·l_a·q/n}, complex (T, A)."""
        return torch.fft.ihfft(x2.float(), dim=-1, norm="forward").index_select(1, self.l)

    def analysis_out(self, g2: torch.Tensor) -> torch.Tensor:
        """G̃[t, a] = Σ_p g[t, p]·e^{+i2π·k_a·p/m}, complex (T, A)."""
        picked = torch.fft.ihfft(g2.float(), dim=-1, norm="forward").index_select(1, self.k_index).resolve_conj()
        return torch.view_as_complex(torch.view_as_real(picked) * self.k_sign)

    def synth_out(self, z: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
        """x·ΔWᵀ (T, m) from the input spectra at the atoms: scatter into a half spectrum, one irfft."""
        m = self.shape[0]
        w = xl * torch.view_as_complex((z * self.k_scale[:, None]).contiguous())
        half = torch.zeros(w.shape[0], m // 2 + 1, dtype=torch.complex64, device=w.device)
        torch.view_as_real(half).index_add_(1, self.k_index, torch.view_as_real(w.resolve_conj()) * self.k_sign)
        return torch.fft.irfft(half, n=m, dim=-1, norm="forward")

    def synth_in(self, z: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
        """g·ΔW (T, n) from the output-gradient spectra at the atoms."""
        n = self.shape[1]
        w = gk * torch.view_as_complex((z * self.l_scale[:, None]).contiguous())
        half = torch.zeros(w.shape[0], n // 2 + 1, dtype=torch.complex64, device=w.device)
        half.index_add_(1, self.l, w)
        return torch.fft.irfft(half, n=n, dim=-1, norm="forward")

    @staticmethod
    def atom_grad(xl: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
        """∂L/∂z (A, 2) = conj Σ_t X̃·G̃."""
        p = (xl * gk).sum(0)
        return torch.stack([p.real, -p.imag], dim=-1)

    # ------------------------------------------------------------------ factor matrices (factorised path)
    def factors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (m, r), V (n, r)) fp32, r = factor_rank: cas matrices for the separable DHT, [cos | sin] otherwise."""
        m, n = self.shape
        if self.cas_scale is not None:
            return cas(self.cas_rows.to(device), m), cas(self.cas_cols.to(device), n)
        # ΔW = Re Σ z e^{iα}e^{iβ} = Σ (zr·cos α − zi·sin α)·cos β − (zr·sin α + zi·cos α)·sin β:
        # U = [cos α | sin α], V = [cos β | sin β]; the z-dependent mixing happens between the two products.
        u_angle = _angles(self.k.to(device), m)
        v_angle = _angles(self.l.to(device), n)
        return torch.cat([u_angle.cos(), u_angle.sin()], 1), torch.cat([v_angle.cos(), v_angle.sin()], 1)


def _angles(freq: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2π·(idx·f mod size)/size (size, A) in `dtype`, exact integer reduction before the float angle."""
    idx = torch.arange(size, device=freq.device, dtype=torch.long)
    return (torch.outer(idx, freq.long()) % size).to(dtype) * (2 * math.pi / size)


def cas(freq: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """cas(2π·idx·f/size) = cos + sin (size, A) of the frequencies `freq` (A,), computed in `dtype`."""
    a = _angles(freq, size, dtype)
    return a.cos() + a.sin()


def fourier_plan(cfg: SpectralConfig, positions: torch.Tensor, shape: tuple[int, int]) -> FourierPlan:
    """The atom table of an ssh/fourierft/lfma layer with ``positions`` (2, n)."""
    m, n = shape
    rows, cols = positions[0].long(), positions[1].long()
    count = rows.numel()
    device = rows.device
    j = torch.arange(count, device=device)
    scale = float(cfg.scaling)
    one = torch.ones(count, device=device)
    zero = torch.zeros(count, device=device)
    cas_scale = None
    if cfg.method == "ssh":
        f = scale * inverse_factor(cfg.normalization, m, n)
        if cfg.dht == "standard":  # cas θ = Re((1 − i)·e^{iθ})
            k, l, coef, gamma = rows, cols, j, torch.stack([f * one, -f * one], -1)
        else:  # cas a·cas b = cos(a − b) + sin(a + b) = Re(e^{i(a−b)}) + Re(−i·e^{i(a+b)})
            k = torch.stack([rows, rows], 1).flatten()
            l = torch.stack([(n - cols) % n, cols], 1).flatten()
            coef = torch.stack([j, j], 1).flatten()
            gamma = torch.stack([torch.stack([f * one, zero], -1), torch.stack([zero, -f * one], -1)], 1)
            gamma = gamma.reshape(-1, 2)
            cas_scale = f
    elif cfg.method == "fourierft" or (cfg.method == "lfma" and not cfg.half_spectrum):
        f = scale * inverse_factor(cfg.normalization, m, n)
        k, l, coef, gamma = rows, cols, j, torch.stack([f * one, zero], -1)
    elif cfg.method == "lfma":  # irfft2 of the half plane: inner columns count twice, bins 0 and n/2 once
        f = scale * inverse_factor(cfg.normalization, m, n)
        weight = torch.where((cols == 0) | (2 * cols == n), 1.0, 2.0).to(device)
        k, l, coef, gamma = rows, cols, j, torch.stack([f * weight, zero], -1)
    else:
        raise ValueError(f"fourier_plan: method {cfg.method!r} is not a Fourier-family method")
    flip = l > n // 2  # canonical atoms: (k, l, z) ≡ (−k, −l, conj z) puts every l in [0, n/2]
    k = torch.where(flip, (m - k) % m, k)
    l = torch.where(flip, n - l, l)
    gamma = gamma.float().clone()
    gamma[:, 1] = torch.where(flip, -gamma[:, 1], gamma[:, 1])
    return FourierPlan(
        shape=(m, n), coef=coef, k=k, l=l, gamma=gamma, conj_coef=torch.where(flip, -1.0, 1.0),
        complex_coefficients=cfg.method == "lfma", cas_scale=cas_scale,
        cas_rows=rows if cas_scale is not None else None, cas_cols=cols if cas_scale is not None else None,
    )


# ---------------------------------------------------------------------------------------------------- sparse plan
@dataclass
class SparsePlan:
    """ΔW of a shira/waveft adapter: its non-zero entries, and per coefficient the L taps of its row and column
    synthesis atoms (cropped taps carry weight 0), so analyses are sampled at the positions only."""

    shape: tuple[int, int]
    grid: tuple[int, int]
    wavelet: str | None
    """None for SHiRA (identity transform)."""
    construction: str | None
    k: torch.Tensor
    """(count,) row key of each coefficient: its index in the [low | high] row analysis (SHiRA: its row)."""
    l: torch.Tensor
    """(count,) column key, likewise."""
    scale: float
    entries: torch.Tensor
    """(E,) distinct flat indices into the m×n weight that ΔW touches."""
    contrib_entry: torch.Tensor
    contrib_coef: torch.Tensor
    contrib_weight: torch.Tensor
    row_taps: tuple[torch.Tensor, torch.Tensor]
    """(index (L, count) clamped into [0, m), weight (L, count)) of each coefficient's row atom, tap-major."""
    col_taps: tuple[torch.Tensor, torch.Tensor]

    def entry_values(self, coefficients: torch.Tensor) -> torch.Tensor:
        """ΔW at `entries` (E,) fp32."""
        c = coefficients.detach().float() * self.scale
        out = torch.zeros(self.entries.numel(), device=c.device)
        return out.index_add_(0, self.contrib_entry, c[self.contrib_coef] * self.contrib_weight)

    @staticmethod
    def _sample(v: torch.Tensor, taps) -> torch.Tensor:
        """Σ_tap v[:, index[tap]]·weight[tap] (T, count): a 1-D analysis evaluated at the positions only."""
        index, weight = taps
        v = v.float()
        if index.shape[0] == 1 and bool((weight == 1).all()):
            return v.index_select(1, index[0])
        return sum(v.index_select(1, index[t]) * weight[t] for t in range(index.shape[0]))

    @staticmethod
    def _scatter(values: torch.Tensor, taps, size: int) -> torch.Tensor:
        index, weight = taps
        out = torch.zeros(values.shape[0], size, device=values.device)
        for t in range(index.shape[0]):
            out.index_add_(1, index[t], values * weight[t])
        return out

    def sampled_in(self, x2: torch.Tensor) -> torch.Tensor:
        """(x·R_n)[t, l_j] (T, count)."""
        return self._sample(x2, self.col_taps)

    def sampled_out(self, g2: torch.Tensor) -> torch.Tensor:
        """(g·R_m)[t, k_j] (T, count)."""
        return self._sample(g2, self.row_taps)

    def synth_out(self, coefficients: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """x·ΔWᵀ (T, m) from `sampled_in(x)`."""
        return self._scatter(xs * (coefficients.float() * self.scale), self.row_taps, self.shape[0])

    def synth_in(self, coefficients: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        """g·ΔW (T, n) from `sampled_out(g)`."""
        return self._scatter(gs * (coefficients.float() * self.scale), self.col_taps, self.shape[1])

    def coefficient_grad(self, g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """∂L/∂c_j = scale·Σ_t (g·R_m)[t, k_j]·(x·R_n)[t, l_j], a sampled dense-dense product."""
        count = self.k.numel()
        if count >= _CSR_MIN:
            ga = _analysis(g2.float(), self, self.shape[0])
            xa = _analysis(x2.float(), self, self.shape[1])
            return sampled_dot(ga, xa, self.k, self.l, self) * self.scale
        out = torch.zeros(count, device=g2.device)
        taps = self.row_taps[0].shape[0] + self.col_taps[0].shape[0]
        step = max(1, _GATHER_BLOCK // max(count * taps, 1))
        for start in range(0, g2.shape[0], step):
            rows = slice(start, start + step)
            out += (self.sampled_out(g2[rows]) * self.sampled_in(x2[rows])).sum(0)
        return out * self.scale


def sparse_plan(cfg: SpectralConfig, positions: torch.Tensor, shape: tuple[int, int]) -> SparsePlan:
    m, n = shape
    rows, cols = positions[0].long(), positions[1].long()
    device = rows.device
    count = rows.numel()
    if cfg.method == "shira":
        grid, wavelet, construction = (m, n), None, None
        r_key, r_sup, r_val = rows, rows[:, None], torch.ones(count, 1, device=device)
        c_key, c_sup, c_val = cols, cols[:, None], torch.ones(count, 1, device=device)
    else:
        wavelet, construction = cfg.wavelet, cfg.construction
        grid = wavelets.padded_shape(shape, wavelet, construction)
        (r_key, r_sup, r_val), (c_key, c_sup, c_val) = wavelets.synthesis_atoms(wavelet, shape, positions, construction)
    taps_r, taps_c = r_sup.shape[1], c_sup.shape[1]
    er = r_sup[:, :, None].expand(-1, taps_r, taps_c).reshape(-1)
    ec = c_sup[:, None, :].expand(-1, taps_r, taps_c).reshape(-1)
    ew = (r_val[:, :, None] * c_val[:, None, :]).reshape(-1)
    ej = torch.arange(count, device=device)[:, None].expand(-1, taps_r * taps_c).reshape(-1)
    keep = (er >= 0) & (er < m) & (ec >= 0) & (ec < n)  # crop the padded grid back to the weight
    flat = er[keep] * n + ec[keep]
    entries, inverse = torch.unique(flat, return_inverse=True)
    return SparsePlan(
        shape=(m, n), grid=grid, wavelet=wavelet, construction=construction, k=r_key, l=c_key,
        scale=float(cfg.scaling), entries=entries, contrib_entry=inverse, contrib_coef=ej[keep],
        contrib_weight=ew[keep].float(), row_taps=_cropped(r_sup, r_val, m), col_taps=_cropped(c_sup, c_val, n),
    )


def _cropped(support: torch.Tensor, values: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps outside the weight (padding the crop removes) become weight-0 taps at index 0."""
    outside = (support < 0) | (support >= size)
    index = torch.where(outside, 0, support).t().contiguous()
    return index, torch.where(outside, 0.0, values.float()).t().contiguous()


def _analysis(v: torch.Tensor, plan: "SparsePlan", size: int) -> torch.Tensor:
    """v·R along the last dim in the layout of the plan's keys; identity for SHiRA."""
    return v if plan.wavelet is None else wavelets.analysis(v, plan.wavelet, size, plan.construction)


# ---------------------------------------------------------------------------------------------------- sampled products
_GATHER_BLOCK = 1 << 22  # elements per gathered block: bounds the transient memory of a sampled product
_CSR_MIN = 4096  # from this many samples, torch.sparse.sampled_addmm beats gathering columns


def sampled_dot(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, owner) -> torch.Tensor:
    """Σ_t a[t, rows_j]·b[t, cols_j] for every j (a sampled dense-dense product, SDDMM), fp32, through
    torch.sparse.sampled_addmm on a CSR pattern cached on ``owner`` (duplicate pairs computed once)."""
    pattern = getattr(owner, "_csr", None)
    if pattern is None or pattern[0].device != a.device:
        pattern = _csr_pattern(rows, cols, a.shape[1], b.shape[1])
        owner._csr = pattern
    csr, inverse = pattern
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        values = torch.sparse.sampled_addmm(csr, a.t().contiguous(), b.contiguous(), beta=0.0).values()
    return values[inverse]


def _csr_pattern(rows, cols, n_rows: int, n_cols: int):
    flat, inverse = torch.unique(rows * n_cols + cols, return_inverse=True)
    r, c = flat // n_cols, flat % n_cols
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(r, minlength=n_rows).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, c, torch.zeros(flat.numel(), device=rows.device), size=(n_rows, n_cols),
                                      check_invariants=True)
    return csr, inverse
