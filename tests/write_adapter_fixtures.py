"""Write the adapter files that tests/test_sspeft_compat.py loads: one sspeft adapter per way of building ΔW and one
PEFT adapter, each on `adapter_table.Tiny`, with seeded non-zero coefficients and the outputs they gave when written.

    PYTHONPATH=<checkout> python tests/write_adapter_fixtures.py tests/data/adapters

Run it with the code whose files must keep loading; the test then checks that the current code loads every file and
reproduces its recorded outputs. Tiny keeps the whole directory under 100 KB.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

import sspeft  # noqa: E402
from adapter_table import CONSTRUCTIONS, config, front_end, base_model  # noqa: E402

PEFT_VARIANT = "waveft-periodic"
"""The variant also written through PEFT's save_pretrained."""

OUTPUTS = "outputs.safetensors"


def probe_input(seed: int = 7) -> torch.Tensor:
    """The seeded input whose outputs are recorded beside each adapter."""
    return torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(seed))


def fill_coefficients(model, seed: int = 11) -> None:
    """Seeded non-zero coefficients in every adapted layer (zero-initialised methods would otherwise record W0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(sspeft.adapted_layers(model).items()):
            coeff = layer.coefficients
            coeff.copy_(0.5 * torch.randn(coeff.shape, generator=gen))


def write(variant: str, front: str, folder: Path) -> None:
    """Add ``variant``'s adapter through ``front``, fill it, save it into ``folder`` with its recorded outputs."""
    model = front_end(front).add(base_model("plain"), config(variant))
    fill_coefficients(model)
    front_end(front).save(model, folder)
    with torch.no_grad():
        save_file({"x": probe_input(), "y": model(probe_input()).contiguous()}, str(folder / OUTPUTS))


def main(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    for variant in CONSTRUCTIONS:
        write(variant, "sspeft", out / "sspeft" / variant)
    write(PEFT_VARIANT, "peft", out / "peft" / PEFT_VARIANT)
    (out / "peft" / PEFT_VARIANT / "README.md").unlink()  # PEFT's model card: not part of the adapter


if __name__ == "__main__":
    main(Path(sys.argv[1]))
