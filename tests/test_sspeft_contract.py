"""Per-method contracts over the shared adapter table (tests/adapter_table.py): every (variant, base, front end)
combination starts where its method says, trains only its coefficients, merges and unmerges exactly, unloads to a
plain model, runs its base when disabled, keeps fp32 coefficients under bf16 and survives a save/load round trip.
Then the config, meta-device and gradient-checkpointing behaviour of sspeft.inject on the plain base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sspeft
from adapter_table import (CASES, METHODS_ON_NF4, TARGETS, VARIANTS, ZERO_INIT, Tiny, base_model, base_weight, build,
                           case_id, config, front_end, layers)
from sspeft import methods
from sspeft_helpers import dense_twin, linear4bit_layers


def make(variant: str, dtype=torch.float32) -> nn.Module:
    return build(variant, "plain", "sspeft", dtype)


def train_step(model: nn.Module, x: torch.Tensor, lr: float = 0.05) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 agreement up to summation order, relative to the largest output."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, expected.abs().max().item()))


@pytest.fixture
def x():
    return torch.randn(4, 3, 24, generator=torch.Generator().manual_seed(1))


contract = pytest.mark.parametrize("variant, base, front", CASES, ids=[case_id(c) for c in CASES])


@contract
def test_init_is_the_methods_documented_start(variant, base, front, x):
    """Zero-init variants give exactly the base's outputs. FourierFT starts at a N(0, init_scale²) draw from the
    generator keyed by the seed and the layer's name in the user's model; LFMA at FFT(ΔW_init) at its positions, as
    methods.init_coefficients builds it from the weight the adapter sees (dequantized on NF4) and that name."""
    model = build(variant, base, front)
    adapted = layers(model)
    assert sorted(adapted) == sorted(TARGETS)
    with torch.no_grad():
        out = model(x)
    if variant in ZERO_INIT:
        assert all(not layer.coefficients.any() for layer in adapted.values())
        torch.testing.assert_close(out, base_model(base)(x), rtol=0, atol=0)
        return
    for name, layer in adapted.items():
        cfg = layer.config
        if cfg.method == "fourierft":
            draw = torch.randn(layer.positions.shape[1], generator=methods._seeded(cfg, f"{name}#init"))
            expected = draw * cfg.init_scale
        else:
            expected = methods.init_coefficients(cfg, base_weight(layer), layer.positions, name)
        assert expected.any() and torch.equal(layer.coefficients.detach(), expected), name


@contract
def test_only_adapter_parameters_change(variant, base, front, x):
    model = build(variant, base, front)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("sspeft_coefficients" in n for n in trainable)
    assert sspeft.count_trainable(model) == sum(layer.coefficients.numel() for layer in layers(model).values())
    train_step(model, x)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == ("sspeft_coefficients" in key), key


@contract
def test_merge_equals_unmerged_idempotent_and_unmerge_restores(variant, base, front, x):
    model = build(variant, base, front)
    fe = front_end(front)
    train_step(model, x)
    originals = {n: (layer.base_layer, layer.base_layer.weight.detach().clone()) for n, layer in layers(model).items()}
    absmax = {n: layer.base_layer.weight.quant_state.absmax.clone() for n, layer in layers(model).items()
              if base == "nf4"}
    with torch.no_grad():
        unmerged = model(x)
        fe.merge(model)
        assert all(layer.merged and type(layer.base_layer) is nn.Linear for layer in layers(model).values())
        merged = model(x)
        fe.merge(model)  # a second merge changes nothing
        merged_twice = model(x)
        fe.unmerge(model)
        restored = model(x)
    assert_outputs_close(merged, unmerged)
    torch.testing.assert_close(merged_twice, merged, atol=0, rtol=0)
    assert_outputs_close(restored, unmerged)
    for name, layer in layers(model).items():
        original, weight = originals[name]
        assert not layer.merged and layer.base_layer is original, name
        if base == "nf4":  # the packed 4-bit weight and its statistics are put back as they were
            assert torch.equal(original.weight.data, weight), name
            assert torch.equal(original.weight.quant_state.absmax, absmax[name]), name
        else:
            torch.testing.assert_close(original.weight, weight, atol=1e-6, rtol=0)


@contract
def test_merge_and_unload_gives_a_plain_model_holding_w0_plus_delta(variant, base, front, x):
    model = build(variant, base, front)
    train_step(model, x)
    expected_weights = {n: base_weight(layer) + layer.delta_weight().detach() for n, layer in layers(model).items()}
    with torch.no_grad():
        expected = model(x)
        plain = front_end(front).merge_and_unload(model)
        got = plain(x)
    assert not sspeft.adapted_layers(plain)
    left_4bit = set(linear4bit_layers(plain)) if base == "nf4" else set()
    assert left_4bit == (set() if front_end(front).unloads_every_4bit_layer or base == "plain" else {"out"})
    assert all(type(plain.get_submodule(name)) is nn.Linear for name in expected_weights)
    for name, weight in expected_weights.items():
        assert torch.equal(plain.get_submodule(name).weight.detach(), weight), f"{name}: merged weight is not W0 + ΔW"
    assert_outputs_close(got, expected)


@contract
def test_disabled_runs_the_base(variant, base, front, x):
    model = build(variant, base, front)
    train_step(model, x)
    with torch.no_grad():
        plain = base_model(base)(x)
        adapted = model(x)
        with front_end(front).disabled(model):
            torch.testing.assert_close(model(x), plain, atol=0, rtol=0)
        torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)  # enabled again on leaving
    assert not torch.equal(adapted, plain), "the trained adapter has no effect"


@contract
def test_bf16_model_keeps_fp32_coefficients(variant, base, front, x):
    model = build(variant, base, front, dtype=torch.bfloat16)
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    for name, layer in layers(model).items():
        grad = layer.coefficients.grad
        assert layer.coefficients.dtype == torch.float32 and layer.delta_weight().dtype == torch.float32, name
        assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0, name


@contract
def test_save_load_round_trip(variant, base, front, x, tmp_path):
    model = build(variant, base, front)
    fe = front_end(front)
    train_step(model, x)
    fe.save(model, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SSPEFT" and sorted(saved["layers"]) == sorted(TARGETS)  # the user's module names
    loaded = fe.load(base_model(base), tmp_path)
    want, got = layers(model), layers(loaded)
    assert sorted(got) == sorted(want)
    for name, layer in want.items():
        assert torch.equal(got[name].positions, layer.positions), name
        assert torch.equal(got[name].coefficients, layer.coefficients), name
        assert got[name].coefficients.dtype == torch.float32, name
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("method, front", METHODS_ON_NF4, ids=["-".join(c) for c in METHODS_ON_NF4])
def test_nf4_base_equals_its_dequantized_dense_twin(method, front, x):
    """Same adapter on the NF4 base and on a dense copy holding the dequantized weights: positions (chosen from the
    dequantized weight), outputs and coefficient gradients agree."""
    fe = front_end(front)
    q = base_model("nf4")
    d = dense_twin(q)
    q, d = fe.add(q, config(method)), fe.add(d, config(method))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial coefficients, the same in both
        for name, layer in layers(q).items():
            layer.coefficients.normal_(generator=g)
            layers(d)[name].coefficients.copy_(layer.coefficients)
    outs = []
    for model in (q, d):
        out = model(x)
        out.pow(2).mean().backward()
        outs.append(out.detach())
    assert_outputs_close(outs[0], outs[1])
    for name, layer in layers(q).items():
        twin = layers(d)[name]
        assert torch.equal(layer.positions, twin.positions), name
        assert layer.coefficients.grad.abs().sum() > 0, name
        torch.testing.assert_close(layer.coefficients.grad, twin.coefficients.grad, rtol=1e-4,
                                   atol=1e-6 * twin.coefficients.grad.abs().max().item())
    assert linear4bit_layers(q) and not linear4bit_layers(d)


_LOADER = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import sspeft
from adapter_table import Tiny
for case, path in json.loads(sys.argv[2]).items():
    model = sspeft.load_adapter(Tiny(0), path)
    layers = sspeft.adapted_layers(model)
    torch.save({n: (l.positions.clone(), l.coefficients.detach().clone()) for n, l in layers.items()}, path + "/loaded.pt")
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.save(model(x), path + "/logits.pt")
print("ok")
"""


def test_save_load_roundtrip_bitwise_in_new_process(tmp_path):
    """Every variant saved here loads bitwise in a fresh interpreter (nothing rides on process state)."""
    paths, expected = {}, {}
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(5))
    for variant in VARIANTS:
        model = make(variant)
        train_step(model, torch.randn(3, 24))
        path = tmp_path / variant
        sspeft.save_adapter(model, path)
        assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        paths[variant] = str(path)
        with torch.no_grad():
            expected[variant] = (
                {n: (l.positions.clone(), l.coefficients.detach().clone()) for n, l in sspeft.adapted_layers(model).items()},
                model(x),
            )
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(Path(__file__).parent), json.dumps(paths)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for variant, (saved, logits) in expected.items():
        loaded = torch.load(Path(paths[variant]) / "loaded.pt")
        assert loaded.keys() == saved.keys()
        for name, (pos, coeff) in saved.items():
            assert torch.equal(loaded[name][0], pos), (variant, name)
            assert torch.equal(loaded[name][1], coeff), (variant, name)
        assert torch.equal(torch.load(Path(paths[variant]) / "logits.pt"), logits), variant


@pytest.mark.parametrize("case", ["ssh", "lfma", "waveft"])
def test_autocast_bf16(case, x):
    model = make(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().pow(2).mean().backward()
    assert all(layer.coefficients.grad is not None for layer in sspeft.adapted_layers(model).values())


def test_delta_weight_api_shapes_and_scaling():
    model = make("ssh")
    for name, layer in sspeft.adapted_layers(model).items():
        assert layer.positions.dtype == torch.long and layer.positions.shape == (2, 12)
        assert isinstance(layer.coefficients, nn.Parameter) and layer.coefficients.dtype == torch.float32
        with torch.no_grad():
            layer.coefficients.fill_(1.0)
        d1 = layer.delta_weight()
        assert d1.shape == (layer.out_features, layer.in_features) and d1.dtype == torch.float32
        layer.config.scaling = 2.0  # the resolved config is shared by all layers of the adapter
        torch.testing.assert_close(layer.delta_weight(), 2 * d1)
        layer.config.scaling = 1.0


def test_saved_config_is_unambiguous(tmp_path):
    model = make("ssh")
    sspeft.save_adapter(model, tmp_path / "a")
    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["peft_type"] == "SSPEFT" and data["method"] == "ssh"
    for key in ("n", "scaling", "normalization", "init", "delta", "dht", "seed", "version"):
        assert data[key] not in (None, ""), key
    assert data["layers"]["q_proj"]["shape"] == [16, 24] and data["layers"]["k_proj"]["shape"] == [9, 7]
    assert all(len(info["fingerprint"]) == 16 for info in data["layers"].values())


def test_waveft_construction_is_recorded_and_a_file_without_it_loads_periodic(tmp_path):
    """New adapters record their construction; a config without the field (written before it existed) is read as
    the periodic construction it was trained with, through sspeft.load_adapter."""
    default = make("waveft")
    sspeft.save_adapter(default, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["construction"] == "reference"
    old = make("waveft-periodic")
    train_step(old, torch.randn(3, 24))
    sspeft.save_adapter(old, tmp_path / "old")
    cfg_file = tmp_path / "old" / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    del data["construction"]
    cfg_file.write_text(json.dumps(data))
    loaded = sspeft.load_adapter(Tiny(0), tmp_path / "old")
    assert sspeft.adapter_config(loaded).construction == "periodic"
    x = torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)


def test_saved_fields_fill_the_construction_of_older_files_only():
    saved = sspeft.SpectralConfig(method="waveft", n=8).resolved().to_dict()
    assert sspeft.SpectralConfig.from_saved(saved).construction == "reference"
    older = {k: v for k, v in saved.items() if k != "construction"}
    assert sspeft.SpectralConfig.from_saved(older).construction == "periodic"
    assert sspeft.SpectralConfig.from_dict(older).construction == "reference"  # a new config: the default
    ssh = {k: v for k, v in sspeft.SpectralConfig(method="ssh").resolved().to_dict().items() if k != "construction"}
    assert sspeft.SpectralConfig.from_saved(ssh).construction == "reference"
    with pytest.raises(ValueError, match="construction is a WaveFT option; method is 'ssh'"):
        sspeft.SpectralConfig(method="ssh", construction="periodic")
    with pytest.raises(ValueError, match=r"construction='periodical'; expected one of reference, periodic.*did you mean 'periodic'"):
        sspeft.SpectralConfig(method="waveft", construction="periodical")


@pytest.mark.parametrize("case", ["fourierft", "waveft", "waveft-periodic", "shira"])
def test_inject_on_meta_device_gives_the_real_models_adapter(case, tmp_path):
    """Positions from the seed alone: injecting on a meta-device model creates, on the CPU, the positions and
    coefficients a real model gets; saved and loaded onto the real base it gives the same outputs."""
    with torch.device("meta"):
        meta = Tiny(0)
    sspeft.inject(meta, config(case))
    real = make(case)
    real_layers = sspeft.adapted_layers(real)
    for name, layer in sspeft.adapted_layers(meta).items():
        assert layer.base_layer.weight.is_meta and layer.coefficients.device.type == "cpu"
        assert torch.equal(layer.positions, real_layers[name].positions), name
        assert torch.equal(layer.coefficients, real_layers[name].coefficients), name
    sspeft.save_adapter(meta, tmp_path / "a")
    loaded = sspeft.load_adapter(Tiny(0), tmp_path / "a")
    x = torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), real(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["ssh", "ssh-global", "lfma"])
def test_inject_on_meta_device_needs_real_weights_for_ssh_and_lfma(case):
    with torch.device("meta"):
        meta = Tiny(0)
    method = VARIANTS[case]["method"]
    with pytest.raises(ValueError, match=rf"method='{method}' chooses its positions from the pretrained weights.*"
                                         r"meta device.*needs the real weights: load the model with its weights"):
        sspeft.inject(meta, sspeft.SpectralConfig(n=12, target_modules=TARGETS, **VARIANTS[case]))
    assert not sspeft.adapted_layers(meta), "inject left a partial result behind"


def test_gradient_checkpointing_llama_matches():
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32,
    )
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        sspeft.inject(model, sspeft.SpectralConfig(method="ssh", n=20, init="normal", init_scale=0.1))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([l.coefficients.grad.clone() for l in sspeft.adapted_layers(model).values()])
    assert len(grads[0]) == 4
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
