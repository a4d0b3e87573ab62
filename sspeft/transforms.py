"""The 2-D transforms behind the adapters, always computed in fp32 (torch.fft has no bf16 on CPU, and cuFFT's half
precision needs power-of-two sizes).

Normalisation follows torch.fft's names for a forward/inverse pair:
  * ``"backward"``: forward unscaled, inverse divided by m·n (torch's default; FourierFT and LFMA as published);
  * ``"ortho"``:    both divided by √(m·n), so the transform preserves norms and each basis atom has unit norm;
  * ``"forward"``:  forward divided by m·n, inverse unscaled.
"""

from __future__ import annotations

import math

import torch

NORMALIZATIONS = ("backward", "ortho", "forward")
DHT_VARIANTS = ("standard", "separable")


def inverse_factor(norm: str, m: int, n: int) -> float:
    """The factor applied by the inverse transform under ``norm``."""
    if norm == "backward":
        return 1.0 / (m * n)
    if norm == "ortho":
        return 1.0 / math.sqrt(m * n)
    return 1.0


def _forward_factor(norm: str, m: int, n: int) -> float:
    if norm == "forward":
        return 1.0 / (m * n)
    if norm == "ortho":
        return 1.0 / math.sqrt(m * n)
    return 1.0


def _cas_of_fft(f: torch.Tensor, variant: str) -> torch.Tensor:
    """Hartley spectrum from the complex Fourier spectrum ``f`` of a real matrix (unnormalised)."""
    if variant == "standard":
        # H[k,l] = Σ W[p,q]·cas(2π(kp/m + lq/n)) = Re F − Im F
        return f.real - f.imag
    # separable: H = C_m W C_n = Re F[k, −l mod n] − Im F[k, l]
    flipped_cols = torch.roll(torch.flip(f.real, dims=(-1,)), shifts=1, dims=-1)
    return flipped_cols - f.imag


def dht2(x: torch.Tensor, variant: str = "standard", norm: str = "ortho") -> torch.Tensor:
    """2-D discrete Hartley transform of the last two dims of a real tensor, in fp32.

    ``variant="standard"`` is the textbook (non-separable) 2-D DHT with kernel cas(2π(kp/m + lq/n)); ``"separable"`` is
    C_m·X·C_n with the 1-D cas matrices (what the official SSH code computes). Both are their own inverse up to m·n.
    """
    m, n = x.shape[-2:]
    h = _cas_of_fft(torch.fft.fft2(x.float()), variant)
    return h * _forward_factor(norm, m, n)


def idht2(s: torch.Tensor, variant: str = "standard", norm: str = "ortho") -> torch.Tensor:
    """Inverse of :func:`dht2` under the same normalisation."""
    m, n = s.shape[-2:]
    h = _cas_of_fft(torch.fft.fft2(s.float()), variant)
    return h * inverse_factor(norm, m, n)


def cas_matrix(size: int, device=None) -> torch.Tensor:
    """The 1-D Hartley kernel C[k, p] = cas(2πkp/size) = cos + sin (fp32), as an explicit matrix for tests."""
    idx = torch.arange(size, device=device, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(idx, idx) / size
    return (torch.cos(angle) + torch.sin(angle)).float()


def scatter_dense(values: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A dense ``shape`` matrix, zero except ``values`` at ``positions`` (2, n). Differentiable in ``values``."""
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_put((positions[0], positions[1]), values, accumulate=True)
