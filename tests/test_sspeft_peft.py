"""sspeft as a PEFT tuner: registration, one on-disk format shared with save_adapter/load_adapter (checked in a new
process), numerical identity with PEFT's FourierFT, WaveFT and SHiRA, TRL SFTTrainer on a 4-bit base, and LoRA side
by side. The per-method contracts through peft.get_peft_model run over the shared table in test_sspeft_contract.py."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sspeft
from sspeft import methods
from conftest import require, require_module
from sspeft_helpers import load_tiny_llama_bnb4, save_tiny_llama, tiny_llama, tiny_llama_4bit

require_module("peft")
import peft  # noqa: E402
from peft import PeftModel  # noqa: E402

METHODS = sspeft.METHODS
TARGETS = ["q_proj", "v_proj"]
PEFT_PREFIX = "base_model.model."
# Method knobs that must be recorded (resolved, never None) in every saved adapter config.
RESOLVED = ("method", "n", "scaling", "seed", "init", "init_scale", "normalization", "shared_positions", "version")


def spectral(method: str, **kw) -> sspeft.SpectralConfig:
    kw.setdefault("n", 20)
    return sspeft.SpectralConfig(method=method, target_modules=TARGETS, seed=7, **kw)


def randomize(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sspeft.adapted_layers(model).values():
            c = layer.coefficients
            c.copy_(torch.randn(c.shape, generator=g) * 0.3 * c.abs().max().clamp_min(0.05))


def by_module(model) -> dict:
    """adapted layers keyed by the name in the user's (unwrapped) model."""
    return {n.removeprefix(PEFT_PREFIX): m for n, m in sspeft.adapted_layers(model).items()}


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids() if x is None else x).logits


# ---------------------------------------------------------------------------------------------- registration
def test_registered_under_its_own_peft_type():
    """Fails loudly if the PeftType extension stops working with the installed PEFT."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert sspeft.PEFT_REGISTERED, f"PEFT {peft.__version__}: sspeft tuner not registered"
    assert peft.PeftType("SSPEFT") is peft.PeftType.SSPEFT
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType.SSPEFT] is type(sspeft.peft_config(spectral("ssh")))
    assert PEFT_TYPE_TO_TUNER_MAPPING["SSPEFT"].__name__ == "SspeftTuner"
    for theirs in ("FOURIERFT", "SHIRA", "WAVEFT", "LORA"):  # PEFT's own methods are untouched
        assert peft.PeftType[theirs].value == theirs


def test_ssh_global_budget_through_peft_equals_inject():
    """The global budget ranks positions across all target layers: the PEFT front end must plan them together."""
    cfg = spectral("ssh", n=40, budget="global")
    ours = by_module(sspeft.inject(tiny_llama(), cfg))
    theirs = by_module(peft.get_peft_model(tiny_llama(), sspeft.peft_config(cfg)))
    assert len({l.positions.shape[1] for l in ours.values()}) > 1, "global budget gave every layer the same n"
    assert sum(l.positions.shape[1] for l in ours.values()) == 40 * 4
    for name, layer in ours.items():
        assert torch.equal(theirs[name].positions, layer.positions), name
        assert torch.equal(theirs[name].coefficients, layer.coefficients), name


# ---------------------------------------------------------------------------------------------- one format
_LOADER = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    import sspeft                       # registers the PEFT tuner: needed before PeftModel.from_pretrained
    from peft import PeftModel
    base_dir, out, ids_file, threads, dirs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    x = torch.load(ids_file, weights_only=True)
    torch.set_num_threads(int(threads))  # the parent's count: same reduction order in every matmul
    result = {}
    for d in dirs:
        for loader in ("peft", "sspeft"):
            base = AutoModelForCausalLM.from_pretrained(base_dir)
            model = PeftModel.from_pretrained(base, d) if loader == "peft" else sspeft.load_adapter(base, d)
            model.eval()
            with torch.no_grad():
                result[f"{d}|{loader}|logits"] = model(x).logits.contiguous()
            for name, layer in sspeft.adapted_layers(model).items():
                key = f"{d}|{loader}|{name.removeprefix('base_model.model.')}"
                result[key + "|positions"] = layer.positions.contiguous()
                result[key + "|coefficients"] = layer.coefficients.detach().contiguous()
                result[key + "|dtype"] = torch.tensor([layer.coefficients.dtype == torch.float32])
    save_file(result, out)
    """
)


def run_python(script: str, *args, timeout: int = 240) -> None:
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.slow  # a fresh interpreter importing torch/transformers/peft takes 10-20 s here
def test_save_load_round_trip_in_a_new_process(tmp_path):
    """Every method, written by PEFT's save_pretrained and by sspeft.save_adapter, read back by
    PeftModel.from_pretrained and by sspeft.load_adapter in a fresh interpreter: positions and coefficients
    bitwise, logits identical."""
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_llama(tmp_path / "base")
    x = ids(3)
    torch.save(x, tmp_path / "ids.pt")
    expected, dirs = {}, []
    for i, method in enumerate(METHODS):
        pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), sspeft.peft_config(spectral(method)))
        randomize(pm, seed=i)
        pm.save_pretrained(str(tmp_path / f"peft-{method}"))
        sm = sspeft.inject(AutoModelForCausalLM.from_pretrained(base_dir), spectral(method, n=13))
        randomize(sm, seed=10 + i)
        sspeft.save_adapter(sm, tmp_path / f"sspeft-{method}")
        for writer, model in (("peft", pm), ("sspeft", sm)):
            d = str(tmp_path / f"{writer}-{method}")
            dirs.append(d)
            expected[d] = (logits(model, x), {n: (l.positions.clone(), l.coefficients.detach().clone())
                                              for n, l in by_module(model).items()})
    run_python(_LOADER, base_dir, tmp_path / "out.safetensors", tmp_path / "ids.pt", torch.get_num_threads(), *dirs)
    got = load_file(str(tmp_path / "out.safetensors"))
    for d, (ref_logits, layers) in expected.items():
        for loader in ("peft", "sspeft"):
            tag = f"{Path(d).name} loaded by {loader}"
            # positions and coefficients are bitwise equal below; logits only up to float reduction order, which
            # oneDNN may pick differently in another process
            torch.testing.assert_close(got[f"{d}|{loader}|logits"], ref_logits, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, tag=tag: f"{tag}: logits differ: {m}")
            for name, (pos, coeff) in layers.items():
                key = f"{d}|{loader}|{name}"
                assert torch.equal(got[key + "|positions"], pos), f"{tag}: positions of {name}"
                assert torch.equal(got[key + "|coefficients"], coeff), f"{tag}: coefficients of {name}"
                assert bool(got[key + "|dtype"]), f"{tag}: coefficients of {name} are not fp32"


@pytest.mark.parametrize("method", METHODS)
def test_sspeft_and_peft_write_the_same_format(method, tmp_path):
    pm = peft.get_peft_model(tiny_llama(), sspeft.peft_config(spectral(method)))
    pm.save_pretrained(str(tmp_path / "peft"))
    sm = sspeft.inject(tiny_llama(), spectral(method))
    sspeft.save_adapter(sm, tmp_path / "sspeft")
    files = {w: sorted(p.name for p in (tmp_path / w).iterdir()) for w in ("peft", "sspeft")}
    for w, names in files.items():
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(names), (w, names)
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))], (w, names)
    tensors = {w: load_file(str(tmp_path / w / "adapter_model.safetensors")) for w in files}
    assert sorted(tensors["peft"]) == sorted(tensors["sspeft"])
    for key, value in tensors["sspeft"].items():
        assert value.dtype == (torch.int64 if key.endswith("sspeft_positions") else torch.float32), key
        assert tensors["peft"][key].dtype == value.dtype and tensors["peft"][key].shape == value.shape, key
        if key.endswith("sspeft_positions"):  # same seed, same base: same positions from both front ends
            assert torch.equal(tensors["peft"][key], value), key
    configs = {w: json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in files}
    fields = [f for f in sspeft.SpectralConfig.__dataclass_fields__]
    for w, data in configs.items():
        assert data["peft_type"] == "SSPEFT", w
        missing = [f for f in fields if f not in data]
        assert not missing, f"{w} config lacks {missing}"
        assert all(data[k] is not None for k in RESOLVED), {k: data[k] for k in RESOLVED}
        assert data["method"] == method and data["seed"] == 7 and data["version"] == sspeft.__version__
        assert data["normalization"] in ("backward", "ortho", "forward")
        assert len(data["layers"]) == 4
        for name, info in data["layers"].items():
            assert name.startswith("model.layers.") and info["shape"] == ([32, 64] if "v_proj" in name else [64, 64])
            assert info["n"] == 20 and len(info["fingerprint"]) == 16
    assert sorted(configs["peft"]) == sorted(configs["sspeft"])
    spectral_only = {w: {k: configs[w][k] for k in fields} for w in configs}
    assert spectral_only["peft"] == spectral_only["sspeft"]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "sspeft"))
    assert not [str(w.message) for w in caught if "sspeft" in str(w.message).lower()]


def test_loading_onto_another_base_warns_about_the_fingerprint(tmp_path):
    model = sspeft.inject(tiny_llama(seed=0), spectral("ssh"))
    randomize(model)
    sspeft.save_adapter(model, tmp_path / "a")
    saved = {n: l.positions.clone() for n, l in by_module(model).items()}
    fingerprints = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layers"]
    for i, load in enumerate((lambda b: sspeft.load_adapter(b, tmp_path / "a"),
                              lambda b: PeftModel.from_pretrained(b, tmp_path / "a"))):
        with pytest.warns(UserWarning, match="trained on") as caught:
            other = load(tiny_llama(seed=1))  # same shapes, other weights: SSH would pick other positions
        assert len([w for w in caught if "trained on" in str(w.message)]) == 1, "one warning per load, not per layer"
        for name, layer in by_module(other).items():
            assert torch.equal(layer.positions, saved[name]), f"{name}: positions were re-derived on load"
        sspeft.save_adapter(other, tmp_path / f"resaved{i}")  # the record still names the base positions came from
        resaved = json.loads((tmp_path / f"resaved{i}" / "adapter_config.json").read_text())["layers"]
        assert {k: v["fingerprint"] for k, v in resaved.items()} == {k: v["fingerprint"] for k, v in fingerprints.items()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right base loads silently
        sspeft.load_adapter(tiny_llama(seed=0), tmp_path / "a")


@pytest.mark.parametrize("corruption", ["position out of range", "lfma coefficient shape"])
def test_corrupt_adapter_tensors_are_refused_before_injection(corruption, tmp_path):
    model = sspeft.inject(tiny_llama(), spectral("lfma"))
    sspeft.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("v_proj.sspeft_positions"))
    if corruption == "position out of range":
        tensors[key][1, 0] = 64  # v_proj is 32×64: column 64 does not exist
        match = "outside its 32×64 coefficient matrix"
    else:
        ckey = key.replace("sspeft_positions", "sspeft_coefficients")
        tensors[ckey] = tensors[ckey][:, 0].contiguous()  # complex pairs stored as plain reals
        match = r"expected \(20, 2\) coefficients"
    save_file(tensors, str(weights))
    base = tiny_llama()
    with pytest.raises(ValueError, match=match):
        sspeft.load_adapter(base, tmp_path / "a")
    assert not sspeft.adapted_layers(base), "a refused adapter left layers behind"


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = peft.get_peft_model(tiny_llama(), sspeft.peft_config(spectral("lfma")))
    model.save_pretrained(str(tmp_path / "a"))

    def refuse(*_a, **_k):
        raise AssertionError("an adapter load unpickled something")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    sspeft.load_adapter(tiny_llama(), tmp_path / "a")
    sspeft.read_adapter(tmp_path / "a")
    PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))


def test_peft_front_end_guards_every_linear4bit():
    """get_peft_model switches off the AVX512-BF16 repack on every Linear4bit, adapted or not (see
    test_sspeft_weights.py for why; the flag is set here as bitsandbytes sets it on such CPUs)."""
    require_module("bitsandbytes")
    import bitsandbytes as bnb

    model = tiny_llama_4bit()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    model = peft.get_peft_model(model, sspeft.peft_config(spectral("ssh")))
    assert not [m for m in layers if m.support_avx512bf16_for_cpu]


# ---------------------------------------------------------------------------------------------- identical to PEFT
def test_fourierft_matches_peft_fourierft():
    n, alpha, seed = 30, 150.0, 11
    theirs = peft.get_peft_model(tiny_llama(), peft.FourierFTConfig(
        n_frequency=n, scaling=alpha, random_loc_seed=seed, target_modules=TARGETS, init_weights=False))
    ours = sspeft.inject(tiny_llama(), sspeft.SpectralConfig(
        method="fourierft", n=n, scaling=alpha, seed=seed, target_modules=TARGETS))
    cfg = sspeft.adapter_config(ours)
    assert cfg.normalization == "backward" and cfg.shared_positions
    mine = by_module(ours)
    checked = 0
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.fourierft.FourierFTLayer):
            layer = mine[name.removeprefix(PEFT_PREFIX)]
            assert torch.equal(layer.positions, module.indices["default"].long()), f"{name}: positions differ"
            with torch.no_grad():
                layer.coefficients.copy_(module.fourierft_spectrum["default"])
            torch.testing.assert_close(layer.delta_weight(), module.get_delta_weight("default"), rtol=0, atol=0)
            checked += 1
    assert checked == 4
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-6, atol=1e-6)


def test_fourierft_gradients_match_peft_and_inits_are_per_layer():
    """Same positions and coefficients → same coefficient gradients through sspeft's fast paths as through PEFT's
    autograd; the initial coefficients are drawn per layer (never one random ΔW for every same-shape layer)."""
    n, alpha, seed = 30, 300.0, 3
    theirs = peft.get_peft_model(tiny_llama(), peft.FourierFTConfig(
        n_frequency=n, scaling=alpha, random_loc_seed=seed, target_modules=TARGETS, init_weights=False))
    ours = sspeft.inject(tiny_llama(), sspeft.SpectralConfig(
        method="fourierft", n=n, scaling=alpha, seed=seed, target_modules=TARGETS))
    mine = by_module(ours)
    q0, q1 = mine["model.layers.0.self_attn.q_proj"], mine["model.layers.1.self_attn.q_proj"]
    assert torch.equal(q0.positions, q1.positions)
    for name, layer in mine.items():  # PEFT's N(0, 1), drawn per layer from the generator keyed by seed and name
        assert layer.config.init_scale == 1.0
        expected = torch.randn(n, generator=methods._seeded(layer.config, f"{name}#init"))
        assert torch.equal(layer.coefficients.detach(), expected), name
    _copy_peft_coefficients(theirs, mine, "fourierft_spectrum", peft.tuners.fourierft.FourierFTLayer)
    _assert_same_gradients(theirs, ours, "fourierft_spectrum", mine)


def _copy_peft_coefficients(theirs, mine, attr: str, layer_type) -> None:
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if isinstance(module, layer_type):
                mine[name.removeprefix(PEFT_PREFIX)].coefficients.copy_(getattr(module, attr)["default"])


def _assert_same_gradients(theirs, ours, attr: str, mine, x=None) -> None:
    for model in (theirs, ours):
        model.train()
        x_in = ids() if x is None else x
        out = model(x_in) if x is not None else model(x_in, labels=x_in)
        (out.pow(2).mean() if x is not None else out.loss).backward()
    checked = 0
    for name, module in theirs.named_modules():
        spectra = getattr(module, attr, None)
        if isinstance(spectra, torch.nn.ParameterDict) and "default" in spectra:
            want = spectra["default"].grad  # fp32 sums in another order: relative to the largest entry
            torch.testing.assert_close(mine[name.removeprefix(PEFT_PREFIX)].coefficients.grad, want,
                                       rtol=5e-4, atol=1e-5 * want.abs().max().item())
            checked += 1
    assert checked >= 2


class OddLinears(torch.nn.Module):
    """Square, non-square, odd and odd×even Linear layers in a chain (PEFT and sspeft target them by name)."""

    SHAPES = {"sq": (16, 16), "wide": (12, 20), "odd": (7, 9), "odd_even": (9, 12)}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.sq, self.wide = torch.nn.Linear(16, 16), torch.nn.Linear(20, 12)
        self.odd, self.odd_even = torch.nn.Linear(9, 7), torch.nn.Linear(12, 9)

    def forward(self, x):  # x: (batch, 16) → sq → pad to 20 → wide (12) → odd needs 9 …
        h = self.sq(x)
        h = self.wide(torch.cat([h, h[:, :4]], -1))
        return self.odd_even(torch.cat([self.odd(h[:, :9]), h[:, :5]], -1))


@pytest.mark.parametrize("family", ["db1", "db2", "db3", "sym2", "sym3", "sym4", "coif1", "coif2"])
def test_waveft_matches_peft_waveft(family):
    """The default (reference) construction is PEFT's WaveFT: same positions (shared_positions=True draws PEFT's
    randperm), same coefficients → same ΔW, outputs and coefficient gradients, on square, non-square and odd layers."""
    n, lam, seed, names = 24, 25.0, 4, list(OddLinears.SHAPES)
    theirs = peft.get_peft_model(OddLinears(), peft.WaveFTConfig(
        n_frequency=n, scaling=lam, wavelet_family=family, random_loc_seed=seed, target_modules=names,
        init_weights=False))
    ours = sspeft.inject(OddLinears(), sspeft.SpectralConfig(
        method="waveft", n=n, scaling=lam, wavelet=family, seed=seed, shared_positions=True, target_modules=names))
    assert sspeft.adapter_config(ours).construction == "reference"
    mine = by_module(ours)
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.waveft.WaveFTLayer):
            layer = mine[name.removeprefix(PEFT_PREFIX)]
            assert torch.equal(layer.positions, module.waveft_indices["default"].long()), f"{name}: positions differ"
            with torch.no_grad():
                layer.coefficients.copy_(module.waveft_spectrum["default"] * 10)
                module.waveft_spectrum["default"].mul_(10)
            want = module.get_delta_weight("default")
            torch.testing.assert_close(layer.delta_weight(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    _assert_same_gradients(theirs, ours, "waveft_spectrum", mine, x)


def test_shira_matches_peft_shira():
    r, seed = 2, 5
    theirs = peft.get_peft_model(tiny_llama(), peft.ShiraConfig(
        r=r, random_seed=seed, target_modules=TARGETS, init_weights=False))
    ours = sspeft.inject(tiny_llama(), sspeft.SpectralConfig(method="shira", r=r, seed=seed, target_modules=TARGETS))
    mine = by_module(ours)
    checked = 0
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.shira.ShiraLayer):
            layer = mine[name.removeprefix(PEFT_PREFIX)]
            assert layer.positions.shape == module.shira_indices["default"].shape  # r·(m+n) positions both ways
            with torch.no_grad():  # copy PEFT's positions and values into the sspeft layer
                layer.sspeft_positions["default"] = module.shira_indices["default"].long().clone()
                layer.coefficients.copy_(module.shira_weight["default"])
            torch.testing.assert_close(
                layer.delta_weight(), module.get_delta_weight("default").to_dense(), rtol=0, atol=0)
            checked += 1
    assert checked == 4
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- LoRA alongside
def test_lora_and_sspeft_on_different_modules_train_together():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    sspeft.inject(model, sspeft.SpectralConfig(method="ssh", n=16, target_modules=["v_proj"], seed=1))
    randomize(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("sspeft_coefficients" in n for n in trainable)
    assert all("lora_" in n or "sspeft_coefficients" in n for n in trainable), trainable
    model.train()
    x = ids()
    model(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_lora_plus_sspeft_model_saves_and_reloads_both(tmp_path):
    """LoRA (PEFT) on q_proj and sspeft.inject on v_proj: PEFT saves the LoRA, sspeft.save_adapter the spectral
    adapter under the user's module names; both reload onto a fresh base and give the same logits."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    sspeft.inject(model, sspeft.SpectralConfig(method="waveft", n=16, target_modules=["v_proj"], seed=1))
    randomize(model)
    model.save_pretrained(str(tmp_path / "lora"))
    sspeft.save_adapter(model, tmp_path / "spectral")
    saved = json.loads((tmp_path / "spectral" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SSPEFT" and sorted(saved["layers"]) == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    alone = sspeft.load_adapter(tiny_llama(), tmp_path / "spectral")  # the spectral adapter alone, plain base
    assert sorted(sspeft.adapted_layers(alone)) == sorted(saved["layers"])
    both = sspeft.load_adapter(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora")), tmp_path / "spectral")
    torch.testing.assert_close(logits(both), logits(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="v_proj.* already carries a PEFT adapter"):  # the LoRA module itself
        lora_on_v = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["v_proj"]))
        sspeft.load_adapter(lora_on_v, tmp_path / "spectral")


def test_sspeft_on_a_lora_module_raises():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="q_proj.*already carries a PEFT adapter"):
        sspeft.inject(model, sspeft.SpectralConfig(method="ssh", n=16, target_modules=["q_proj", "v_proj"]))
    assert not sspeft.adapted_layers(model), "inject left a partial result behind"


# ---------------------------------------------------------------------------------------------- TRL
def word_tokenizer(texts: list[str]):
    """A word-level tokenizer trained offline on ``texts`` (the tiny model has 128 ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=128, special_tokens=specials))
    assert tok.get_vocab_size() <= 128
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_sft_trainer_step_on_4bit_base_keeps_fp32_coefficients(tmp_path):
    """One TRL SFTTrainer step on a BitsAndBytesConfig-loaded NF4 tiny LLaMA with peft_config=sspeft.peft_config:
    TRL casts trainable parameters of 4-bit models to bf16 at init; sspeft restores exact fp32 and the step changes
    the coefficients. Gradient checkpointing is on (TRL's default)."""
    require_module("trl")
    require_module("bitsandbytes")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    prompts = [f"question {i} : what is {i} plus {i} ?" for i in range(8)]
    completions = [f" answer : {2 * i} ." for i in range(8)]
    tokenizer = word_tokenizer(prompts + completions)
    model = load_tiny_llama_bnb4(save_tiny_llama(tmp_path / "base"))
    require("a 4-bit transformers model", getattr(model, "is_loaded_in_4bit", False))
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=5e-2,
        logging_steps=1, save_strategy="no", report_to=[], max_length=32, bf16=False, fp16=False,
        gradient_checkpointing=True, dataloader_num_workers=0, seed=0,
    )
    cfg = sspeft.SpectralConfig(method="ssh", n=24, target_modules=TARGETS, seed=2, init="normal", init_scale=0.01)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=tokenizer, peft_config=sspeft.peft_config(cfg),
        train_dataset=Dataset.from_dict({"prompt": prompts, "completion": completions}),
    )
    layers = by_module(trainer.model)
    assert len(layers) == 4
    cast = {n: l.coefficients.dtype for n, l in layers.items()}  # bf16 under TRL 1.16 (its QLoRA cast)
    reference = peft.get_peft_model(load_tiny_llama_bnb4(tmp_path / "base"), sspeft.peft_config(cfg))
    initial = {n: l.coefficients.detach().clone() for n, l in by_module(reference).items()}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in initial.values()), \
        "init values are bf16-representable: the test could not see a lossy cast"
    sspeft.restore_fp32(trainer.model)
    for name, layer in layers.items():
        assert layer.coefficients.dtype == torch.float32
        assert torch.equal(layer.coefficients.detach(), initial[name]), f"{name}: fp32 values not restored exactly"
    trainer.train()
    for name, layer in layers.items():
        after = layer.coefficients.detach()
        assert after.dtype == torch.float32, f"{name}: {after.dtype} after training (TRL cast it to {cast[name]})"
        assert not torch.equal(after, initial[name]), f"{name}: coefficients did not change"
    import bitsandbytes as bnb

    assert all(isinstance(l.base_layer, bnb.nn.Linear4bit) for l in layers.values())
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_forward_warns_on_an_outside_bf16_cast_and_restore_fp32_undoes_it():
    """What TRL does to trainable parameters of 4-bit models (param.data = param.data.bfloat16()): the forward uses
    the cast coefficients as they are and warns, once per layer, naming the fix; `sspeft.restore_fp32` then puts the
    exact fp32 values back, so small updates to non-zero coefficients do not vanish."""
    model = sspeft.inject(tiny_llama(), spectral("lfma"))
    exact = {n: l.coefficients.detach().clone() for n, l in by_module(model).items()}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in exact.values())
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    cast = {n: l.coefficients.detach().clone() for n, l in by_module(model).items()}
    model.train()
    x = ids()
    with pytest.warns(UserWarning, match=r"not fp32.*sspeft\.restore_fp32\(model\).*KeepFP32Callback") as record:
        model(x, labels=x).loss.backward()
        model(x)
    assert sum("not fp32" in str(w.message) for w in record) == len(exact), "one warning per layer and adapter"
    for name, layer in by_module(model).items():
        assert layer.coefficients.dtype == torch.bfloat16 and torch.equal(layer.coefficients.detach(), cast[name])
        assert layer.coefficients.grad is not None and layer.coefficients.grad.abs().sum() > 0
    sspeft.restore_fp32(model)
    for name, layer in by_module(model).items():
        assert layer.coefficients.dtype == torch.float32 and torch.equal(layer.coefficients.detach(), exact[name])
