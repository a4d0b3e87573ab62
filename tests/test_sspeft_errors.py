"""Bad input gets a clear error naming the field, the value and what is allowed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sspeft


def _model(out_f: int = 8, in_f: int = 6) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.q_proj = nn.Linear(in_f, out_f)
    m.emb = nn.Embedding(10, 4)
    return m


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(method="sshh"), r"method='sshh'.*expected one of ssh, lfma, waveft, fourierft, shira.*did you mean 'ssh'"),
        (dict(method="ssh", n=0), r"n=0 must be a positive integer"),
        (dict(method="ssh", n=-3), r"n=-3 must be a positive integer"),
        (dict(method="ssh", delta=1.5), r"delta=1.5 must lie in \[0, 1\]"),
        (dict(method="ssh", delta=-0.1), r"delta=-0.1 must lie in \[0, 1\]"),
        (dict(method="waveft", wavelet="morlet"), r"wavelet='morlet' is not supported; expected one of .*db1.*haar"),
        (dict(method="ssh", dht="fast"), r"dht='fast'; expected one of standard, separable"),
        (dict(method="lfma", n=10, top_k_ratio=0.1), r"either n or top_k_ratio"),
        (dict(method="ssh", normalization="unit"), r"normalization='unit'; expected one of backward, ortho, forward"),
        (dict(method="ssh", init="weight"), r"init='weight' is not an init of ssh; expected one of zeros, normal"),
        (dict(method="fourierft", budget="global"), r"budget='global' is an SSH option"),
        (dict(method="ssh", scaling=0), r"scaling=0 must be > 0"),
    ],
)
def test_config_rejects(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sspeft.SpectralConfig(**kwargs)


def test_n_larger_than_layer():
    with pytest.raises(ValueError, match=r"n=49 is larger than the 8×6=48 coefficient positions available for module 'q_proj'"):
        sspeft.inject(_model(), sspeft.SpectralConfig(method="ssh", n=49, target_modules=["q_proj"]))


def test_targets_matching_nothing_list_what_exists():
    with pytest.raises(ValueError, match=r"target_modules=\['k_proj'\] matched no Linear layer; .* named: q_proj"):
        sspeft.inject(_model(), sspeft.SpectralConfig(method="ssh", n=4, target_modules=["k_proj"]))


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match=r"matched only unsupported layer types: emb \(Embedding\)"):
        sspeft.inject(_model(), sspeft.SpectralConfig(method="ssh", n=4, target_modules=["emb"]))


def test_injecting_twice_on_the_same_module_raises():
    model = sspeft.inject(_model(), sspeft.SpectralConfig(method="ssh", n=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries an sspeft adapter"):
        sspeft.inject(model, sspeft.SpectralConfig(method="shira", n=4, target_modules=["q_proj"]))


def test_loading_onto_other_shapes(tmp_path):
    model = sspeft.inject(_model(), sspeft.SpectralConfig(method="ssh", n=4, target_modules=["q_proj"]))
    sspeft.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"layer 'q_proj' was trained on a 8×6 weight, the base model's is 8×7"):
        sspeft.load_adapter(_model(8, 7), tmp_path / "a")


def test_loading_onto_other_weights_warns(tmp_path):
    model = sspeft.inject(_model(), sspeft.SpectralConfig(method="ssh", n=4, target_modules=["q_proj"]))
    sspeft.save_adapter(model, tmp_path / "a")
    other = _model()
    with torch.no_grad():
        other.q_proj.weight.add_(1.0)
    with pytest.warns(UserWarning, match="differ from those the adapter"):
        sspeft.load_adapter(other, tmp_path / "a")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter config .*adapter_config.json does not exist"):
        sspeft.load_adapter(_model(), tmp_path / "nowhere")
    model = sspeft.inject(_model(), sspeft.SpectralConfig(method="ssh", n=4, target_modules=["q_proj"]))
    path = sspeft.save_adapter(model, tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sspeft.load_adapter(_model(), path)
    weights.write_bytes(good)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sspeft.load_adapter(_model(), path)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="peft_type='LORA', expected 'SSPEFT'"):
        sspeft.load_adapter(_model(), path)


def test_unknown_config_field_names_closest(tmp_path):
    with pytest.raises(ValueError, match=r"unknown SpectralConfig field 'scalling' \(did you mean 'scaling'\?\)"):
        sspeft.SpectralConfig.from_dict({"method": "ssh", "scalling": 2.0})


def test_save_without_adapter_raises(tmp_path):
    with pytest.raises(ValueError, match="carries no sspeft adapter"):
        sspeft.save_adapter(_model(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_second_inject_on_other_modules_raises():
    model = _model()
    model.k_proj = nn.Linear(6, 8)
    sspeft.inject(model, sspeft.SpectralConfig(method="ssh", n=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries an sspeft adapter .* one SpectralConfig per model"):
        sspeft.inject(model, sspeft.SpectralConfig(method="ssh", n=4, target_modules=["k_proj"]))
    assert sspeft.adapted_layers(model)["q_proj"].coefficients.requires_grad
