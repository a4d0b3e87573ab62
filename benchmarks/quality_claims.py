"""The claims the quality benchmark judges, each as its paper states it and where the paper states it.

Papers (markdown copies under the shared directory's papers/):
  SSH    — "SSH: Sparse Spectrum Adaptation via Discrete Hartley Transformation", arXiv 2502.05539
  LFMA   — "Parameter-Efficient Fine-Tuning via Layerwise Fourier Masked Adapter with Top-k Frequency Selection"
  WaveFT — "Exploring Sparsity for Parameter Efficient Fine Tuning Using Wavelets" (Bilican et al.)

Relations (`benchmarks.quality_verdicts`): beats (a lower test loss than b), matches (comparable: equivalent within
the margin), at_least (a matches or beats b). Coverage claims compare captured gradient fractions instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    title: str
    """The claim as its source states it."""
    source: str
    """Paper and the table or section that states it."""
    part: str
    """coverage (captured gradient fraction, higher is better) or train (test loss, lower is better)"""
    a: str
    b: str
    relation: str
    """beats | matches | at_least (see the module docstring)"""
    context: tuple[str, str] | None = None
    """Another coverage pair (a, b) reported beside the verdict, where it explains it."""


SSH_SRC = "SSH paper (arXiv 2502.05539), Key Results: LLaMA3.1-8B instruction tuning vs LoRA and FourierFT"
WAVEFT_NLP = ("WaveFT paper §4.1 \"Cross-domain predictions\" (NLP: FourierFT > SHiRA ≈ WaveFT) and App. A.3.3 "
              "Table 5 (GLUE, RoBERTa-base: LoRA 85.2, FourierFT 85.0, SHiRA 84.2, WaveFT 83.9)")

FOURIERFT_INIT = ("PEFT's FourierFTConfig (init_weights=False, the default: spectrum drawn from a standard normal; "
                  "True: zeros) and sspeft's FourierFT default `init=\"normal\"`; zero init is `init=\"zeros\"`")

CLAIMS = (
    Claim("SSH matches or beats LoRA at an equal parameter budget", SSH_SRC, "train", "SSH δ=0.7", "LoRA r=1",
          "at_least"),
    Claim("SSH matches or beats FourierFT at an equal parameter budget", SSH_SRC, "train", "SSH δ=0.7",
          "FourierFT", "at_least"),
    Claim("Mixed selection (δ=0.7) beats all-random positions (δ=0)",
          "SSH paper, Mechanism 3 (δ = 0.7 optimal on GLUE)", "train", "SSH δ=0.7", "SSH δ=0", "beats"),
    Claim("Mixed selection (δ=0.7) beats all-energy positions (δ=1)",
          "SSH paper, Mechanism 3 (δ = 0.7 optimal on GLUE)", "train", "SSH δ=0.7", "SSH δ=1", "beats"),
    Claim("LFMA performs comparably to or better than FourierFT with fewer parameters",
          "LFMA paper §4.2, Tables 2–3 (GLUE, RoBERTa-base/large)", "train", "LFMA", "FourierFT", "at_least"),
    Claim("LFMA performs comparably to or better than LoRA",
          "LFMA paper §4.2, Table 2 (beats LoRA on MRPC and RTE, comparable elsewhere)", "train", "LFMA",
          "LoRA r=1", "at_least"),
    Claim("On language tasks FourierFT beats WaveFT", WAVEFT_NLP, "train", "FourierFT", "WaveFT", "beats"),
    Claim("On language tasks FourierFT beats SHiRA", WAVEFT_NLP, "train", "FourierFT", "SHiRA", "beats"),
    Claim("On language tasks WaveFT and SHiRA are comparable", WAVEFT_NLP, "train", "WaveFT", "SHiRA", "matches"),
    Claim("On language tasks WaveFT is slightly below LoRA", WAVEFT_NLP, "train", "LoRA r=1", "WaveFT", "beats"),
    Claim("LFMA's top-k frequencies hold more of the update than a random mask of the same size",
          "LFMA paper §3.2 (top-k frequency selection)", "coverage", "LFMA top-k", "LFMA random mask", "beats",
          context=("LFMA half-spectrum", "LFMA random mask")),
    Claim("Wavelet supports cover the gradient better than sparse weight supports (expected mainly when "
          "gradients are sparse, as in vision)", "WaveFT paper §4.1, Table 1 and Proposition 1", "coverage",
          "WaveFT", "SHiRA", "beats"),
    Claim("sspeft's FourierFT learns like PEFT's at the same α and lr", "this library (fidelity check)", "train",
          "FourierFT", "PEFT FourierFT", "matches"),
    Claim("FourierFT zero init vs random init (default): zero init learns better (at the lr chosen for random "
          "init)", FOURIERFT_INIT, "train",
          "FourierFT zero init", "FourierFT", "beats"),
    Claim("LFMA half-spectrum vs full-spectrum top-k (trained): half-spectrum, free of conjugate pairs, learns at "
          "least as well with the same scalars (at the lr chosen for full-spectrum)",
          "LFMA paper §3.2 (top-k over the 2-D spectrum); the library's `half_spectrum=True`", "train",
          "LFMA half-spectrum", "LFMA", "at_least"),
)

NOT_TRAINED = (
    ("SSH δ on a finer grid (0.3, 0.5, 0.9)", "part 2 trains δ = 0, 0.7 and 1"),
)
"""Contrasts the papers invite that the stored results cannot judge yet: (contrast, why), listed on the page."""
