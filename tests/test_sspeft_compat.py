"""Adapter files kept in tests/data/adapters load and give the outputs recorded beside them, so a file saved by any
release that wrote them keeps its numbers.

tests/write_adapter_fixtures.py writes them (one sspeft adapter per ΔW construction, one PEFT adapter); each
directory holds the adapter and the probe input and output recorded when it was saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sspeft
from adapter_table import CONSTRUCTIONS, base_model
from conftest import require_module
from write_adapter_fixtures import OUTPUTS, PEFT_VARIANT

DATA = Path(__file__).parent / "data" / "adapters"


def _check_outputs(model, folder: Path) -> None:
    recorded = load_file(str(folder / OUTPUTS))
    with torch.no_grad():
        y = model(recorded["x"])
    torch.testing.assert_close(y, recorded["y"], rtol=1e-5, atol=1e-6)
    with torch.no_grad(), sspeft.disabled(model):
        assert not torch.allclose(model(recorded["x"]), recorded["y"], atol=1e-3), "the adapter changed nothing"


@pytest.mark.parametrize("variant", CONSTRUCTIONS)
def test_kept_sspeft_adapter_loads_with_its_recorded_outputs(variant):
    folder = DATA / "sspeft" / variant
    model = sspeft.load_adapter(base_model("plain"), folder)
    _check_outputs(model, folder)


def test_kept_peft_adapter_loads_with_its_recorded_outputs():
    require_module("peft")
    import peft

    folder = DATA / "peft" / PEFT_VARIANT
    model = peft.PeftModel.from_pretrained(base_model("plain"), str(folder))
    _check_outputs(model, folder)
