"""SpectralConfig: every knob of every method, validated on construction and fully resolved before injection so a
saved adapter is unambiguous (the library's defaults may change; a checkpoint's settings never do)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from .transforms import DHT_VARIANTS, NORMALIZATIONS
from .wavelets import CONSTRUCTIONS, canonical_wavelet

VERSION = "0.1.0"
"""The sspeft version (`sspeft.__version__`), recorded in every config `SpectralConfig.resolved` returns."""

METHODS = ("ssh", "lfma", "waveft", "fourierft", "shira")

# Per-method defaults; the README's method table is generated from (and tested against) this dict.
# lr is the suggested AdamW learning rate for the default scaling: the lr part 2 of benchmarks.quality chose for the
# method at its defaults (an interior optimum of its grid; docs/results.md, "Learning rates").
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "ssh": dict(n=750, normalization="ortho", init="zeros", init_scale=0.0, scaling=1.0, lr=9e-2),
    "lfma": dict(n=500, normalization="ortho", init="weight", init_scale=0.01, scaling=1.0, lr=9e-2),
    "waveft": dict(n=1000, normalization="ortho", init="zeros", init_scale=0.0, scaling=25.0, lr=3e-3),
    "fourierft": dict(n=1000, normalization="backward", init="normal", init_scale=1.0, scaling=300.0, lr=9e-2),
    "shira": dict(n=1000, normalization="ortho", init="zeros", init_scale=0.0, scaling=1.0, lr=8.1e-2),
}
INITS = {
    "ssh": ("zeros", "normal"),
    "lfma": ("weight", "gaussian"),
    "waveft": ("zeros", "normal"),
    "fourierft": ("normal", "zeros"),
    "shira": ("zeros", "normal"),
}
BUDGETS = ("layer", "global")
# Execution paths of SpectralLinear.forward (sspeft/forward.py); every one gives the reference's numbers.
PATHS = ("auto", "reference", "merged", "split", "factorized")


def _closest(value: str, allowed) -> str:
    match = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass
class SpectralConfig:
    """Configuration of one sparse spectral adapter. ΔW = scaling · T⁻¹(S), S zero except the trainable
    coefficients at fixed positions; the layer computes x·(W0 + ΔW)ᵀ + b.

    The PEFT config `sspeft.peft_tuner.SspeftPeftConfig` derives its fields from these (same names, types and
    defaults): a field added here is added there."""

    method: str
    """One of ssh, lfma, waveft, fourierft, shira."""
    n: int | None = None
    """Trainable positions per layer (LFMA: complex coefficients, 2 reals each). None: the method's default."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module-name suffixes to adapt, a regex (full match) as a string, or "all-linear"."""
    exclude_modules: list[str] | None = None
    """Module-name suffixes never adapted (applied after target_modules)."""
    scaling: float | None = None
    """Multiplier α (WaveFT's λ) on the inverse transform. None: the method's default."""
    seed: int = 0
    """Seed for random positions and random inits; combined with each module's name."""
    init: str | None = None
    """Coefficient init: ssh/waveft/shira zeros|normal, fourierft normal|zeros, lfma weight|gaussian."""
    init_scale: float | None = None
    """Std of a normal init, LFMA's weight-guided factor (0.01·W0) or Gaussian std for ΔW_init."""
    normalization: str | None = None
    """Transform normalisation: backward (torch default), ortho (norm-preserving) or forward."""
    delta: float = 0.7
    """SSH: share of positions taken by energy; the rest are seeded-random."""
    dht: str = "standard"
    """SSH: 'standard' 2-D DHT (kernel cas(2π(kp/m+lq/n))) or 'separable' C_m·W·C_n (official SSH code)."""
    budget: str = "layer"
    """SSH: 'layer' = n positions per layer; 'global' = n × layers positions ranked by energy across all layers."""
    top_k_ratio: float | None = None
    """LFMA: k = floor(ratio · m · n) per layer instead of a fixed n."""
    half_spectrum: bool = False
    """LFMA: select on the rfft2 half-plane and rebuild with irfft2 (removes conjugate-pair redundancy)."""
    wavelet: str = "haar"
    """WaveFT: wavelet family (haar/db1, db2, db3, sym2, sym3, sym4, coif1, coif2)."""
    construction: str = "reference"
    """WaveFT: 'reference' = waverec2 under zero boundaries on the centred, filter-padded coefficient matrix with
    positions in the weight grid (the official code and PEFT's WaveFT); 'periodic' = periodised orthonormal atoms with
    positions in the even-padded grid (sspeft/wavelets.py). A saved config without this field is 'periodic'."""
    r: int | None = None
    """SHiRA: give n as r·(m + n) per layer, the parameter count of a rank-r LoRA."""
    shared_positions: bool | None = None
    """Same random positions in every layer of one shape (FourierFT's PEFT-compatible default); others: per layer."""
    # Execution settings (forward.py): they change speed and memory, never the numbers.
    path: str = "auto"
    """Execution path: auto (per layer and call, see docs/speed.md), reference, merged, split, factorized (ssh/lfma/fourierft)."""
    cache_delta: bool = False
    """Merged path: keep each layer's ΔW between forward and backward of a step (out×in fp32 memory per layer)."""
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Filled by inject: per adapted module, its shape, n, parameter count and a fingerprint of the base weight."""
    version: str = ""
    """sspeft version that resolved this config."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"SpectralConfig.method={self.method!r} is not a spectral method; expected one of "
                f"{', '.join(METHODS)}{_closest(self.method, METHODS)} (LoRA is PEFT's LoraConfig)"
            )
        if self.n is not None and (not isinstance(self.n, int) or isinstance(self.n, bool) or self.n <= 0):
            raise ValueError(f"SpectralConfig.n={self.n!r} must be a positive integer")
        if not 0.0 <= float(self.delta) <= 1.0:
            raise ValueError(f"SpectralConfig.delta={self.delta!r} must lie in [0, 1]")
        if self.dht not in DHT_VARIANTS:
            raise ValueError(f"SpectralConfig.dht={self.dht!r}; expected one of {', '.join(DHT_VARIANTS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"SpectralConfig.budget={self.budget!r}; expected one of {', '.join(BUDGETS)}")
        if self.budget == "global" and self.method != "ssh":
            raise ValueError(f"SpectralConfig.budget='global' is an SSH option; method is {self.method!r}")
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"SpectralConfig.normalization={self.normalization!r}; expected one of {', '.join(NORMALIZATIONS)}"
            )
        if self.init is not None and self.init not in INITS[self.method]:
            raise ValueError(
                f"SpectralConfig.init={self.init!r} is not an init of {self.method}; expected one of "
                f"{', '.join(INITS[self.method])}"
            )
        if self.scaling is not None and not float(self.scaling) > 0:
            raise ValueError(f"SpectralConfig.scaling={self.scaling!r} must be > 0")
        if self.top_k_ratio is not None:
            if self.method != "lfma":
                raise ValueError(f"SpectralConfig.top_k_ratio is an LFMA option; method is {self.method!r}")
            if not 0.0 < float(self.top_k_ratio) <= 1.0:
                raise ValueError(f"SpectralConfig.top_k_ratio={self.top_k_ratio!r} must lie in (0, 1]")
            if self.n is not None:
                raise ValueError("SpectralConfig: give either n or top_k_ratio for LFMA, not both")
        if self.r is not None:
            if self.method != "shira":
                raise ValueError(f"SpectralConfig.r is a SHiRA option; method is {self.method!r}")
            if not isinstance(self.r, int) or self.r <= 0:
                raise ValueError(f"SpectralConfig.r={self.r!r} must be a positive integer")
            if self.n is not None:
                raise ValueError("SpectralConfig: give either n or r for SHiRA, not both")
        if self.path not in PATHS:
            raise ValueError(f"SpectralConfig.path={self.path!r}; expected one of {', '.join(PATHS)}{_closest(self.path, PATHS)}")
        if self.path == "factorized" and self.method not in ("ssh", "lfma", "fourierft"):
            raise ValueError(f"SpectralConfig.path='factorized' is for ssh, lfma and fourierft; method is {self.method!r}")
        if self.half_spectrum and self.method != "lfma":
            raise ValueError(f"SpectralConfig.half_spectrum is an LFMA option; method is {self.method!r}")
        if self.method == "waveft":
            self.wavelet = canonical_wavelet(self.wavelet)
        if self.construction not in CONSTRUCTIONS:
            raise ValueError(
                f"SpectralConfig.construction={self.construction!r}; expected one of {', '.join(CONSTRUCTIONS)}"
                f"{_closest(self.construction, CONSTRUCTIONS)}"
            )
        if self.construction != "reference" and self.method != "waveft":
            raise ValueError(f"SpectralConfig.construction is a WaveFT option; method is {self.method!r}")
        if not self.target_modules:
            raise ValueError("SpectralConfig.target_modules is empty; name at least one module (or 'all-linear')")

    # ------------------------------------------------------------------ defaults
    def resolved(self) -> "SpectralConfig":
        """A copy with every method default filled in, as it is saved with the adapter."""
        d = METHOD_DEFAULTS[self.method]
        out = dataclasses.replace(self, layers=dict(self.layers))
        if out.n is None and not (self.method == "lfma" and out.top_k_ratio is not None) and out.r is None:
            out.n = d["n"]
        for key in ("scaling", "normalization", "init", "init_scale"):
            if getattr(out, key) is None:
                setattr(out, key, d[key])
        if out.init_scale == 0.0 and out.init == "normal":
            out.init_scale = 1.0
        if out.method == "lfma" and self.init_scale is None and out.init == "gaussian":
            out.init_scale = 1e-3
        if out.shared_positions is None:
            out.shared_positions = self.method == "fourierft"
        out.version = VERSION
        return out

    def suggested_lr(self) -> float:
        return METHOD_DEFAULTS[self.method]["lr"]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def saved_fields(data: dict[str, Any]) -> dict[str, Any]:
        """The fields of a config read from a saved adapter, with what an older file left out filled in as it was
        when that file was written: a WaveFT config without ``construction`` was trained with 'periodic'."""
        if data.get("method") == "waveft" and "construction" not in data:
            return dict(data, construction="periodic")
        return dict(data)

    @classmethod
    def from_saved(cls, data: dict[str, Any], source: str = "config") -> "SpectralConfig":
        """A config from a saved adapter's JSON fields (see :meth:`saved_fields`), validated like :meth:`from_dict`."""
        return cls.from_dict(cls.saved_fields(data), source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "SpectralConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{source}: unknown SpectralConfig field {unknown[0]!r}{_closest(unknown[0], names)}; "
                f"valid fields: {', '.join(sorted(names))}"
            )
        return cls(**data)
