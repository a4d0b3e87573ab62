"""The five methods: how many positions a layer gets, where they are, how coefficients start, and the reference ΔW.

Everything here runs in fp32 on a dense (dequantized, gathered) copy of the base weight, once per layer at injection;
`delta_weight` is the reference definition that every execution path must reproduce.
"""

from __future__ import annotations

import math
import zlib

import torch

from .config import SpectralConfig
from .transforms import dht2, idht2, scatter_dense
from .wavelets import idwt2_sparse, position_grid


def _seeded(cfg: SpectralConfig, key: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(cfg.seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return g


def generator_for(cfg: SpectralConfig, module_name: str, shape: tuple[int, int]) -> torch.Generator:
    """Seeded generator for one layer's positions: per module name, or per shape when positions are shared."""
    return _seeded(cfg, f"{shape[0]}x{shape[1]}" if cfg.shared_positions else module_name)


def coefficient_grid(cfg: SpectralConfig, shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of the coefficient matrix S in which positions live."""
    m, n = shape
    if cfg.method == "waveft":
        return position_grid(shape, cfg.construction)
    if cfg.method == "lfma" and cfg.half_spectrum:
        return m, n // 2 + 1
    return m, n


def tensor_problem(
    cfg: SpectralConfig, shape: tuple[int, int], n: int, positions: torch.Tensor, coefficients: torch.Tensor
) -> str | None:
    """What is wrong with one layer's adapter tensors, or None: (2, n) integer positions, in range of the
    coefficient grid and distinct; float coefficients of shape (n,) ((n, 2) for LFMA), all finite. The check shared
    by adding an adapter to a layer and reading one from disk; the text completes a sentence naming the layer."""
    want = (n, 2) if cfg.method == "lfma" else (n,)
    if tuple(positions.shape) != (2, n) or tuple(coefficients.shape) != want:
        return (f"holds {tuple(coefficients.shape)} coefficients at {tuple(positions.shape)} positions; the config "
                f"records n={n}, so expected {want} coefficients at (2, {n}) positions")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        return f"positions have dtype {positions.dtype}; expected an integer dtype (int64)"
    if not coefficients.is_floating_point():
        return f"coefficients have dtype {coefficients.dtype}; expected a float dtype (float32)"
    bad = int((~torch.isfinite(coefficients)).sum())
    if bad:
        return (f"holds {bad} non-finite coefficient(s) (NaN or inf); expected finite values: the training run "
                "diverged or the file is corrupt")
    rows, cols = coefficient_grid(cfg, tuple(shape))
    positions = positions.long()
    if n and (positions.min() < 0 or positions[0].max() >= rows or positions[1].max() >= cols):
        return (f"has positions outside its {rows}×{cols} coefficient matrix (rows "
                f"{int(positions[0].min())}..{int(positions[0].max())}, cols {int(positions[1].min())}.."
                f"{int(positions[1].max())}); expected rows in 0..{rows - 1} and cols in 0..{cols - 1}")
    distinct = (positions[0] * cols + positions[1]).unique().numel()
    if distinct != n:
        return f"lists {n - distinct} position(s) twice; expected {n} distinct positions"
    return None


def num_positions(cfg: SpectralConfig, shape: tuple[int, int], module_name: str = "") -> int:
    """Trainable positions for a layer of ``shape`` (validated against the grid size)."""
    m, n = shape
    rows, cols = coefficient_grid(cfg, shape)
    if cfg.method == "shira" and cfg.r is not None:
        count = cfg.r * (m + n)
    elif cfg.method == "lfma" and cfg.top_k_ratio is not None:
        count = max(1, int(math.floor(cfg.top_k_ratio * m * n)))
    else:
        count = int(cfg.n)
    if count > rows * cols:
        where = f" for module {module_name!r}" if module_name else ""
        raise ValueError(
            f"SpectralConfig.n={count} is larger than the {rows}×{cols}={rows * cols} coefficient positions "
            f"available{where} (weight {m}×{n}); choose n ≤ {rows * cols}"
        )
    return count


def parameters_per_position(cfg: SpectralConfig) -> int:
    """Trainable real scalars per position (an LFMA coefficient is complex: 2)."""
    return 2 if cfg.method == "lfma" else 1


def sample_excluding(total: int, count: int, exclude: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    """``count`` distinct flat indices in [0, total), none in ``exclude``, seeded; memory O(count) for big grids."""
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    excluded = set() if exclude is None else set(exclude.tolist())
    if total <= 4_000_000 or count > total // 4:
        perm = torch.randperm(total, generator=g)
        if excluded:
            keep = torch.ones(total, dtype=torch.bool)
            keep[torch.tensor(sorted(excluded), dtype=torch.long)] = False
            perm = perm[keep[perm]]
        return perm[:count].clone()
    chosen: list[int] = []
    seen = set(excluded)
    while len(chosen) < count:
        for v in torch.randint(total, (2 * (count - len(chosen)) + 16,), generator=g).tolist():
            if v not in seen:
                seen.add(v)
                chosen.append(v)
                if len(chosen) == count:
                    break
    return torch.tensor(chosen, dtype=torch.long)


def _to_positions(flat: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.stack([flat // cols, flat % cols]).long()


def ssh_energy(weight: torch.Tensor, cfg: SpectralConfig) -> torch.Tensor:
    """Energy of the Hartley spectrum of the pretrained weight, E = H(W0)², fp32, on the CPU.

    Computed on the weight's device; returned on the CPU because position selection mixes it with seeded CPU draws
    (positions are moved to the layer's device when the adapter is built)."""
    return dht2(weight.float(), cfg.dht, "ortho").pow(2).cpu()


def select_positions(
    cfg: SpectralConfig, weight: torch.Tensor, module_name: str, count: int | None = None
) -> torch.Tensor:
    """(2, n) LongTensor of (row, col) positions in the coefficient matrix, for the layer with base ``weight``."""
    shape = tuple(weight.shape)
    rows, cols = coefficient_grid(cfg, shape)
    count = num_positions(cfg, shape, module_name) if count is None else count
    g = generator_for(cfg, module_name, shape)
    if cfg.method == "ssh":
        top = int(round(cfg.delta * count))
        energy = ssh_energy(weight, cfg).flatten()
        by_energy = torch.topk(energy, top, sorted=True).indices if top else torch.empty(0, dtype=torch.long)
        rest = sample_excluding(rows * cols, count - top, by_energy, g)
        return _to_positions(torch.cat([by_energy, rest]), cols)
    if cfg.method == "lfma":
        spectrum = lfma_init_spectrum(cfg, weight, g)
        flat = torch.topk(spectrum.abs().flatten(), count, sorted=True).indices
        return _to_positions(flat, cols)
    if cfg.method in ("fourierft", "waveft") and cfg.shared_positions and (rows, cols) == shape:
        # PEFT's FourierFT and WaveFT draw randperm(m·n) from a generator seeded with the seed alone.
        perm = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(int(cfg.seed)))
        return _to_positions(perm[:count], cols)
    return _to_positions(sample_excluding(rows * cols, count, None, g), cols)


def lfma_init_spectrum(cfg: SpectralConfig, weight: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """F = FFT(ΔW_init): ΔW_init = init_scale·W0 ('weight') or a seeded Gaussian of std init_scale ('gaussian')."""
    if cfg.init == "weight":
        delta_init = cfg.init_scale * weight.float()
    else:
        delta_init = torch.randn(weight.shape, generator=g) * cfg.init_scale
    if cfg.half_spectrum:
        return torch.fft.rfft2(delta_init, norm=cfg.normalization)
    return torch.fft.fft2(delta_init, norm=cfg.normalization)


def init_coefficients(
    cfg: SpectralConfig, weight: torch.Tensor, positions: torch.Tensor, module_name: str
) -> torch.Tensor:
    """Initial coefficient values, fp32: (n,) real, or (n, 2) (real, imag) for LFMA."""
    count = positions.shape[1]
    # Always per module, also when positions are shared: same-shape layers must not start from one random ΔW
    # (PEFT and the official FourierFT code draw each layer's coefficients independently).
    g = _seeded(cfg, module_name + "#init")
    if cfg.method == "lfma":
        # the paper's init: the selected coefficients start at their values in FFT(ΔW_init)
        spectrum = lfma_init_spectrum(cfg, weight, generator_for(cfg, module_name, tuple(weight.shape)))
        picked = spectrum[positions[0], positions[1]]
        return torch.view_as_real(picked.to(torch.complex64)).contiguous().float()
    if cfg.init == "zeros":
        return torch.zeros(count)
    return torch.randn(count, generator=g) * cfg.init_scale


def delta_weight(
    cfg: SpectralConfig, coefficients: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Reference ΔW = scaling · T⁻¹(S) in the torch (out, in) layout, fp32, differentiable in ``coefficients``."""
    c = coefficients.float()
    grid = coefficient_grid(cfg, shape)
    if cfg.method == "ssh":
        return idht2(scatter_dense(c, positions, grid), cfg.dht, cfg.normalization) * cfg.scaling
    if cfg.method == "fourierft":
        return torch.fft.ifft2(scatter_dense(c, positions, grid), norm=cfg.normalization).real * cfg.scaling
    if cfg.method == "lfma":
        spectrum = scatter_dense(torch.view_as_complex(c.contiguous()), positions, grid)
        if cfg.half_spectrum:
            return torch.fft.irfft2(spectrum, s=shape, norm=cfg.normalization) * cfg.scaling
        return torch.fft.ifft2(spectrum, norm=cfg.normalization).real * cfg.scaling
    if cfg.method == "waveft":
        return idwt2_sparse(c, positions, shape, cfg.wavelet, cfg.construction) * cfg.scaling
    return scatter_dense(c, positions, grid) * cfg.scaling  # shira: identity transform
