"""What stages ask the library instead of matching names: the adapter parameters and positions of a model, and the
base Linears under the names of the model without adapters — the same answers for sspeft.inject, PEFT and LoRA."""

from __future__ import annotations

import pytest
import torch

import sspeft
from adapter_table import TARGETS, base_model, build
from conftest import require_module

BASE_NAMES = {*TARGETS, "out"}


@pytest.mark.parametrize("front", ["sspeft", "peft"])
def test_adapter_parameters_are_the_trainable_coefficients(front):
    model = build("ssh", "plain", front)
    found = sspeft.adapter_parameters(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(found) == trainable and len(found) == len(TARGETS)
    layers = sspeft.adapted_layers(model).values()
    assert {id(p) for p in found.values()} == {id(layer.coefficients) for layer in layers}


@pytest.mark.parametrize("front", ["sspeft", "peft"])
def test_adapter_positions_are_the_layers_position_buffers(front):
    model = build("waveft", "plain", front)
    found = sspeft.adapter_positions(model)
    buffers = dict(model.named_buffers())
    assert set(found) <= set(buffers) and len(found) == len(TARGETS)
    layers = sspeft.adapted_layers(model).values()
    assert {id(b) for b in found.values()} == {id(layer.positions) for layer in layers}
    assert all(b.dtype == torch.int64 and b.shape[0] == 2 for b in found.values())


def test_base_linears_are_named_as_in_the_model_without_adapters():
    plain = base_model("plain")
    assert set(sspeft.base_linears(plain)) == BASE_NAMES
    originals = {name: getattr(plain, name) for name in BASE_NAMES}
    injected = sspeft.inject(plain, sspeft.SpectralConfig(method="shira", n=4, target_modules=TARGETS))
    found = sspeft.base_linears(injected)
    assert set(found) == BASE_NAMES
    assert all(found[name] is originals[name] for name in BASE_NAMES), "an adapted layer's base was not found"


def test_base_linears_unwrap_peft_models_with_sspeft_or_lora():
    require_module("peft")
    import peft

    for model in (build("shira", "plain", "peft"),
                  peft.get_peft_model(base_model("plain"), peft.LoraConfig(r=2, target_modules=["q_proj", "out"]))):
        found = sspeft.base_linears(model)
        assert set(found) == BASE_NAMES
        assert all(isinstance(m, torch.nn.Linear) and not sspeft.model.is_adapter_layer(m) for m in found.values())
