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


# ---------------------------------------------------------------- one validation for every load route
Q = "model.layers.0.self_attn.q_proj"
KEY = f"base_model.model.{Q}"


def _set(tensors, key, fn):
    tensors[key] = fn(tensors[key].clone())


def _cfg_edit(fn):
    return ("config", fn)


def _w_edit(fn):
    return ("weights", fn)


def _bad_position(t):
    t[1, 0] = -1
    return t


def _col_out_of_range(t):
    t[1, 0] = 64
    return t


def _duplicate(t):
    t[:, 1] = t[:, 0]
    return t


def _nan(t):
    t[0] = float("nan")
    return t


def _inf(t):
    t[1] = float("inf")
    return t


CORRUPTIONS = {
    # each: what is changed, and the words the error must contain (file named in every message)
    "negative position": (_w_edit(lambda w: _set(w, f"{KEY}.sspeft_positions", _bad_position)),
                          r"adapter_model.safetensors: layer '.*q_proj' has positions outside its 64×64 .*"
                          r"cols in 0\.\.63"),
    "column out of range": (_w_edit(lambda w: _set(w, f"{KEY}.sspeft_positions", _col_out_of_range)),
                            r"positions outside its 64×64 coefficient matrix"),
    "duplicate position": (_w_edit(lambda w: _set(w, f"{KEY}.sspeft_positions", _duplicate)),
                           r"lists 1 position\(s\) twice; expected 6 distinct positions"),
    "float positions": (_w_edit(lambda w: _set(w, f"{KEY}.sspeft_positions", lambda t: t.float() + 0.5)),
                        r"positions have dtype torch.float32; expected an integer dtype"),
    "NaN coefficient": (_w_edit(lambda w: _set(w, f"{KEY}.sspeft_coefficients", _nan)),
                        r"holds 1 non-finite coefficient\(s\) \(NaN or inf\); expected finite"),
    "inf coefficient": (_w_edit(lambda w: _set(w, f"{KEY}.sspeft_coefficients", _inf)),
                        r"holds 1 non-finite coefficient"),
    "missing coefficients": (_w_edit(lambda w: w.pop(f"{KEY}.sspeft_coefficients")),
                             r"lacks tensor '.*q_proj.sspeft_coefficients' of recorded layer"),
    "missing positions": (_w_edit(lambda w: w.pop(f"{KEY}.sspeft_positions")),
                          r"lacks tensor '.*q_proj.sspeft_positions'"),
    "short coefficients": (_w_edit(lambda w: _set(w, f"{KEY}.sspeft_coefficients", lambda t: t[:-1])),
                           r"holds \(5,\) coefficients at \(2, 6\) positions; the config records n=6"),
    "stray tensor": (_w_edit(lambda w: w.__setitem__("base_model.model.lm_head.sspeft_coefficients", torch.ones(2))),
                     r"holds tensor 'base_model.model.lm_head.sspeft_coefficients' that the adapter config"),
    "layer without shape": (_cfg_edit(lambda c: c["layers"][Q].pop("shape")),
                            r"adapter_config.json: layers\['.*q_proj'\].shape is None; expected \[out_features"),
    "layers as a list": (_cfg_edit(lambda c: c.__setitem__("layers", list(c["layers"]))),
                         r"adapter_config.json: field 'layers' is a list; expected an object"),
    "n as a string": (_cfg_edit(lambda c: c.__setitem__("n", "6")),
                      r"adapter_config.json: field 'n' is '6'; expected int or null"),
    "layer n as a string": (_cfg_edit(lambda c: c["layers"][Q].__setitem__("n", "6")),
                            r"layers\['.*q_proj'\].n is '6'; expected a non-negative integer"),
    "scaling as a string": (_cfg_edit(lambda c: c.__setitem__("scaling", "25")),
                            r"field 'scaling' is '25'; expected a finite number or null"),
    "layer entry a number": (_cfg_edit(lambda c: c["layers"].__setitem__(Q, 3)),
                             r"layers\['.*q_proj'\] is 3; expected an object with 'shape' and 'n'"),
    "three-dimensional shape": (_cfg_edit(lambda c: c["layers"][Q].__setitem__("shape", [64, 64, 1])),
                                r"shape is \[64, 64, 1\]; expected \[out_features, in_features\]"),
    "no layers": (_cfg_edit(lambda c: c.__setitem__("layers", {})),
                  r"adapter_config.json: field 'layers' is empty; expected the adapted modules"),
    "flat positions": (_w_edit(lambda w: _set(w, f"{KEY}.sspeft_positions", lambda t: t.flatten())),
                       r"at \(12,\) positions; the config records n=6, so expected \(6,\) coefficients at \(2, 6\)"),
    "unknown method": (_cfg_edit(lambda c: c.__setitem__("method", "lora")),
                       r"adapter_config.json: SpectralConfig.method='lora' is not a spectral method"),
}


@pytest.fixture(scope="module")
def saved_peft_adapter(tmp_path_factory):
    """A PEFT-saved sspeft adapter on a tiny LLaMA (q_proj, v_proj, n=6) with nonzero coefficients."""
    pytest.importorskip("peft")
    from peft import get_peft_model

    from sspeft_helpers import tiny_llama

    path = tmp_path_factory.mktemp("peft_adapter") / "adapter"
    cfg = sspeft.SpectralConfig(method="ssh", n=6, target_modules=["q_proj", "v_proj"], init="normal")
    model = get_peft_model(tiny_llama(), sspeft.peft_config(cfg))
    model.save_pretrained(str(path))
    return path


def _corrupt(src, dst, case):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (kind, fn), _ = CORRUPTIONS[case]
    if kind == "config":
        data = json.loads((dst / "adapter_config.json").read_text())
        fn(data)
        (dst / "adapter_config.json").write_text(json.dumps(data))
    else:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        fn(tensors)
        save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _applies(case: str, route: str) -> bool:
    # loading into an existing adapter (PeftModel.load_adapter) reads only the weights of the model's own layers:
    # the config is the model's, and PEFT drops tensors of modules the model lacks
    return route != "PeftModel.load_adapter" or not (CORRUPTIONS[case][0][0] == "config" or case == "stray tensor")


@pytest.mark.parametrize("case,route", [
    (case, route) for route in ("sspeft.load_adapter", "PeftModel.from_pretrained", "PeftModel.load_adapter")
    for case in CORRUPTIONS if _applies(case, route)])
def test_every_load_route_refuses_a_corrupt_adapter(saved_peft_adapter, tmp_path, case, route):
    from peft import PeftModel, get_peft_model

    from sspeft_helpers import tiny_llama

    path = _corrupt(saved_peft_adapter, tmp_path / "bad", case)
    pattern = CORRUPTIONS[case][1]
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    if route == "PeftModel.load_adapter":
        # what Trainer does on resume: the adapter exists, PEFT reads only the weights
        cfg = sspeft.SpectralConfig(method="ssh", n=6, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(base, sspeft.peft_config(cfg))
        pattern = pattern.replace("adapter_model.safetensors", "adapter weights of 'default'")
        with pytest.raises(sspeft.AdapterFileError, match=pattern):
            model.load_adapter(str(path), adapter_name="default")
        return
    with pytest.raises(sspeft.AdapterFileError, match=pattern):
        if route == "sspeft.load_adapter":
            sspeft.load_adapter(base, path)
        else:
            PeftModel.from_pretrained(base, str(path))
    assert not sspeft.adapted_layers(base), "nothing may be injected before the check"
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_valid_adapter_loads_the_same_by_every_route(saved_peft_adapter):
    """The check passes a sound file, and both routes hold the same positions and coefficients."""
    from peft import PeftModel

    from sspeft_helpers import tiny_llama

    cfg, tensors = sspeft.read_adapter(saved_peft_adapter)
    assert set(cfg.layers) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    direct = sspeft.adapted_layers(sspeft.load_adapter(tiny_llama(), saved_peft_adapter))
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(saved_peft_adapter))
    via_peft = {k.removeprefix("base_model.model."): v for k, v in sspeft.adapted_layers(peft_model).items()}
    assert set(direct) == set(via_peft) == set(cfg.layers)
    for name, layer in direct.items():
        assert torch.equal(layer.sspeft_positions["default"], tensors[f"base_model.model.{name}.sspeft_positions"])
        assert torch.equal(via_peft[name].sspeft_positions["default"], layer.sspeft_positions["default"])
        assert torch.equal(via_peft[name].sspeft_coefficients["default"], layer.sspeft_coefficients["default"])
        assert layer.sspeft_coefficients["default"].abs().sum() > 0

