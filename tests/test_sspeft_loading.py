"""Loading an sspeft adapter: the PEFT config is SpectralConfig's fields on a PeftConfig (converted both ways), and
every load route (sspeft.load_adapter, PeftModel.from_pretrained from a directory or the Hub, PeftModel.load_adapter,
a Trainer resume) builds the layers from the saved positions and coefficients without choosing anything again."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sspeft
from conftest import require_module
from sspeft_helpers import eval_logits, token_ids, tiny_llama

require_module("peft")
import peft  # noqa: E402
from peft import PeftConfig, PeftModel  # noqa: E402

from sspeft import methods  # noqa: E402
from sspeft.peft_tuner import SspeftPeftConfig  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
PEFT_PREFIX = "base_model.model."


def spectral(method: str, **kw) -> sspeft.SpectralConfig:
    kw.setdefault("n", 20)
    return sspeft.SpectralConfig(method=method, target_modules=TARGETS, seed=7, **kw)


def by_module(model) -> dict:
    return {n.removeprefix(PEFT_PREFIX): m for n, m in sspeft.adapted_layers(model).items()}


def randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sspeft.adapted_layers(model).values():
            layer.coefficients.copy_(torch.randn(layer.coefficients.shape, generator=g) * 0.05)


# Everything that chooses positions or initial coefficients; a load must call none of them.
CHOOSERS = ("select_positions", "init_coefficients", "ssh_energy", "lfma_init_spectrum")


@pytest.fixture
def forbid_choosing(monkeypatch):
    """Call to make every position/initial-coefficient choice raise from then on."""

    def forbid():
        for name in CHOOSERS:
            def refuse(*_a, _name=name, **_k):
                raise AssertionError(f"methods.{_name} was called while loading a saved adapter")

            monkeypatch.setattr(methods, name, refuse)

    return forbid


# ---------------------------------------------------------------------------------------------- the config
def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def test_peft_config_fields_are_spectral_configs():
    """SspeftPeftConfig declares SpectralConfig's fields (names, order, types, defaults) after PEFT's own."""
    peft_own = [f.name for f in dataclasses.fields(PeftConfig)]
    fields = dataclasses.fields(SspeftPeftConfig)
    assert [f.name for f in fields[:len(peft_own)]] == peft_own
    ours = fields[len(peft_own):]
    theirs = dataclasses.fields(sspeft.SpectralConfig)
    assert [f.name for f in ours] == [f.name for f in theirs]
    for a, b in zip(ours, theirs):
        assert a.type == b.type, (a.name, a.type, b.type)
        assert _default(a) == _default(b), (a.name, _default(a), _default(b))
    for cls in (sspeft.SpectralConfig, SspeftPeftConfig):  # the method is required by both
        with pytest.raises(TypeError, match="method"):
            cls()


# Per method, settings that differ from every default (together they cover every SpectralConfig field).
CHANGED = {
    "ssh": dict(n=12, target_modules=["q_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"], scaling=2.0,
                seed=5, init="normal", init_scale=0.1, normalization="backward", delta=0.5, dht="separable",
                budget="global", path="reference", cache_delta=True, layers={"m": {"shape": [4, 4], "n": 2}},
                version="0.0.1"),
    "lfma": dict(top_k_ratio=0.1, half_spectrum=True, init="gaussian", target_modules="all-linear"),
    "waveft": dict(wavelet="db2", construction="periodic", shared_positions=True),
    "shira": dict(r=2),
}


def test_conversion_both_ways_keeps_every_field():
    changed = set()
    for method, settings in CHANGED.items():
        cfg = sspeft.SpectralConfig(method=method, **settings)
        default = sspeft.SpectralConfig(method=method)
        changed |= {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
        converted = SspeftPeftConfig.from_spectral(cfg, task_type="CAUSAL_LM")
        assert converted.peft_type == peft.PeftType.SSPEFT and converted.task_type == "CAUSAL_LM"
        for f in dataclasses.fields(cfg):
            assert getattr(converted, f.name) == getattr(cfg, f.name), (method, f.name)
        assert converted.spectral(resolve=False) == cfg
        assert converted.spectral() == cfg.resolved()
        assert sspeft.peft_config(cfg) == converted
    assert changed == {f.name for f in dataclasses.fields(sspeft.SpectralConfig)} - {"method"}


@pytest.mark.parametrize("bad", [dict(method="ssh", delta=1.5), dict(method="sshh"), dict(method="lfma", r=2),
                                 dict(method="waveft", wavelet="db9"), dict(method="ssh", n=0)])
def test_peft_config_refuses_what_spectral_config_refuses(bad):
    with pytest.raises(ValueError) as theirs:
        sspeft.SpectralConfig(**bad)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        SspeftPeftConfig(**bad)


def test_peft_config_holds_the_validated_values():
    """What SpectralConfig normalises (a tuple of targets, a wavelet alias) is what the PEFT config holds and saves."""
    cfg = SspeftPeftConfig(method="waveft", wavelet="db1", target_modules=("v_proj", "q_proj"))
    assert cfg.wavelet == sspeft.SpectralConfig(method="waveft", wavelet="db1").wavelet
    assert cfg.target_modules == ["v_proj", "q_proj"]


# ---------------------------------------------------------------------------------------------- no choosing on load
def _save(writer: str, method: str, path) -> torch.Tensor:
    """An adapter with trained-looking coefficients written by ``writer``; returns its logits."""
    if writer == "peft":
        model = peft.get_peft_model(tiny_llama(), sspeft.peft_config(spectral(method)))
        randomize(model)
        model.save_pretrained(str(path))
    else:
        model = sspeft.inject(tiny_llama(), spectral(method))
        randomize(model)
        sspeft.save_adapter(model, path)
    return eval_logits(model)


def _load(loader: str, path, base=None, before_load=lambda: None):
    """(model, adapter name) of the adapter at ``path`` loaded by ``loader``; ``before_load`` runs right before the
    load itself (after any adapter the route needs first has been made)."""
    base = tiny_llama() if base is None else base
    if loader == "PeftModel.load_adapter":  # a new adapter name, on layers carrying another sspeft adapter
        model = peft.get_peft_model(base, sspeft.peft_config(spectral("shira", n=5)))
        before_load()
        model.load_adapter(str(path), adapter_name="saved")
        model.set_adapter("saved")
        return model, "saved"
    before_load()
    if loader == "sspeft.load_adapter":
        return sspeft.load_adapter(base, path), "default"
    return PeftModel.from_pretrained(base, str(path)), "default"


LOADERS = ("sspeft.load_adapter", "PeftModel.from_pretrained", "PeftModel.load_adapter")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("writer", ["peft", "sspeft"])
@pytest.mark.parametrize("method", sspeft.METHODS)
def test_loading_builds_layers_from_the_saved_tensors(method, writer, loader, tmp_path, forbid_choosing):
    """With every position/initial-coefficient choice raising, each load route gives the saved model's outputs,
    holds the saved positions and coefficients, and records the saved layers."""
    want = _save(writer, method, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    recorded = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layers"]
    model, adapter = _load(loader, tmp_path / "a", before_load=forbid_choosing)
    torch.testing.assert_close(eval_logits(model), want, rtol=0, atol=0)
    layers = by_module(model)
    assert sorted(layers) == sorted(recorded)
    for name, layer in layers.items():
        assert torch.equal(layer.sspeft_positions[adapter], tensors[f"{PEFT_PREFIX}{name}.sspeft_positions"]), name
        assert torch.equal(layer.sspeft_coefficients[adapter], tensors[f"{PEFT_PREFIX}{name}.sspeft_coefficients"])
        assert layer.sspeft_config[adapter].layers[name] == recorded[name], name


def test_peft_config_hands_its_saved_tensors_over_once(tmp_path):
    _save("peft", "ssh", tmp_path / "a")
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    assert model.peft_config["default"].take_saved() is None, "the loaded config still holds the saved tensors"
    config = SspeftPeftConfig.from_pretrained(str(tmp_path / "a"))
    source, tensors = config.take_saved()
    assert source == str(tmp_path / "a" / "adapter_model.safetensors")
    saved = load_file(source)
    assert sorted(tensors) == sorted(saved) and all(torch.equal(tensors[k], v) for k, v in saved.items())
    assert config.take_saved() is None


def test_hub_adapter_is_read_whole_and_built_from_its_tensors(tmp_path, monkeypatch, forbid_choosing):
    """An adapter id that is not a local directory: both files come from the Hub (here a stand-in serving a saved
    directory), pass read_adapter, and the layers are built from the saved tensors."""
    want = _save("sspeft", "lfma", tmp_path / "saved")
    fetched = []

    def hub(repo_id, filename, subfolder=None, **_kwargs):
        assert repo_id == "someone/sspeft-adapter" and subfolder is None, (repo_id, subfolder)
        target = tmp_path / "cache" / "snapshot" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "saved" / filename, target)
        fetched.append(filename)
        return str(target)

    import huggingface_hub
    import peft.config
    import peft.utils.save_and_load

    for module in (huggingface_hub, peft.config, peft.utils.save_and_load):
        monkeypatch.setattr(module, "hf_hub_download", hub)
    forbid_choosing()
    model = PeftModel.from_pretrained(tiny_llama(), "someone/sspeft-adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(fetched)
    torch.testing.assert_close(eval_logits(model), want, rtol=0, atol=0)


def test_trainer_resume_loads_the_checkpoint_without_choosing(tmp_path, forbid_choosing):
    """transformers' Trainer resuming a PeftModel: the checkpoint's positions and coefficients replace the new
    adapter's (its positions are scrambled here to show they are not kept), nothing is chosen while resuming."""
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": token_ids(i)[0], "labels": token_ids(i)[0]} for i in range(4)]
    cfg = spectral("ssh", init="normal", init_scale=0.01)

    def trainer(model):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, save_steps=1, learning_rate=1e-2,
                                 per_device_train_batch_size=2, report_to=[], use_cpu=True, seed=0,
                                 dataloader_num_workers=0)
        return Trainer(model=model, args=args, train_dataset=data)

    first = trainer(peft.get_peft_model(tiny_llama(), sspeft.peft_config(cfg)))
    initial = {n: l.coefficients.detach().clone() for n, l in by_module(first.model).items()}
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    want = eval_logits(first.model)
    assert any(not torch.equal(l.coefficients, initial[n]) for n, l in by_module(first.model).items())
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))

    second = trainer(peft.get_peft_model(tiny_llama(), sspeft.peft_config(cfg)))
    with torch.no_grad():
        for layer in by_module(second.model).values():
            layer.positions.copy_(layer.positions.flip(1))
    forbid_choosing()
    second.train(resume_from_checkpoint=str(checkpoint))
    for name, layer in by_module(second.model).items():
        assert torch.equal(layer.positions, saved[f"{PEFT_PREFIX}{name}.sspeft_positions"]), name
    torch.testing.assert_close(eval_logits(second.model), want, rtol=0, atol=0)


@pytest.mark.parametrize("loader", LOADERS)
def test_waveft_file_without_construction_loads_as_periodic(loader, tmp_path, forbid_choosing):
    """A WaveFT adapter written before `construction` was a field was trained with the periodic construction."""
    model = sspeft.inject(tiny_llama(), spectral("waveft", construction="periodic"))
    randomize(model)
    sspeft.save_adapter(model, tmp_path / "old")
    want = eval_logits(model)
    cfg_file = tmp_path / "old" / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    del data["construction"]
    cfg_file.write_text(json.dumps(data))
    loaded, adapter = _load(loader, tmp_path / "old", before_load=forbid_choosing)
    assert {l.sspeft_config[adapter].construction for l in by_module(loaded).values()} == {"periodic"}
    torch.testing.assert_close(eval_logits(loaded), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- new adapters
def test_a_config_taken_from_another_model_makes_a_new_adapter():
    """A config that records another model's layers (no saved tensors with it) chooses positions for the model it is
    applied to, as sspeft.inject does, and records that model's layers."""
    first = peft.get_peft_model(tiny_llama(seed=0), sspeft.peft_config(spectral("ssh")))
    reused = copy.deepcopy(first.peft_config["default"])
    assert reused.layers
    second = peft.get_peft_model(tiny_llama(seed=1), reused)
    fresh = sspeft.inject(tiny_llama(seed=1), spectral("ssh"))
    theirs, mine = by_module(second), by_module(fresh)
    for name, layer in mine.items():
        assert torch.equal(theirs[name].positions, layer.positions), name
    assert any(not torch.equal(by_module(first)[n].positions, l.positions) for n, l in mine.items())
    assert second.peft_config["default"].layers == sspeft.adapter_config(fresh).layers


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("loader", LOADERS[:2])
def test_loading_onto_other_shapes_raises_before_injecting(loader, tmp_path):
    _save("sspeft", "ssh", tmp_path / "a")
    base = tiny_llama(hidden=32)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' was trained on a 64×64 weight, "
                                         r"the base model's is 32×32"):
        _load(loader, tmp_path / "a", base)
    assert not sspeft.adapted_layers(base)


@pytest.mark.parametrize("edit", ["target narrower than the records", "records narrower than the target"])
def test_saved_config_whose_targets_and_records_differ_is_refused(edit, tmp_path):
    _save("sspeft", "ssh", tmp_path / "a")
    cfg_file, weights = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    data = json.loads(cfg_file.read_text())
    if edit == "target narrower than the records":
        data["target_modules"] = ["q_proj"]
        match = r"layer 'model\.layers\.\d\.self_attn\.v_proj' is recorded in the adapter but not selected by"
    else:
        data["layers"] = {k: v for k, v in data["layers"].items() if "q_proj" in k}
        save_file({k: v for k, v in load_file(str(weights)).items() if "q_proj" in k}, str(weights))
        match = r"module 'model\.layers\.\d\.self_attn\.v_proj' is selected by target_modules.*records no layer"
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
