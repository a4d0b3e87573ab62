"""One table of adapter cases run through shared contract tests on a tiny model (square, non-square, odd layers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sspeft

CASES = {
    "ssh": dict(method="ssh"),
    "ssh-separable": dict(method="ssh", dht="separable"),
    "ssh-global": dict(method="ssh", budget="global"),
    "lfma": dict(method="lfma"),
    "lfma-half": dict(method="lfma", half_spectrum=True),
    "lfma-gaussian": dict(method="lfma", init="gaussian"),
    "waveft": dict(method="waveft"),
    "waveft-db3": dict(method="waveft", wavelet="db3"),
    "waveft-periodic": dict(method="waveft", wavelet="db2", construction="periodic"),
    "fourierft": dict(method="fourierft"),
    "fourierft-zeros": dict(method="fourierft", init="zeros", shared_positions=False),
    "shira": dict(method="shira"),
}
ZERO_INIT = {"ssh", "ssh-separable", "ssh-global", "waveft", "waveft-db3", "waveft-periodic", "fourierft-zeros", "shira"}
TARGETS = ["q_proj", "v_proj", "k_proj"]


class Tiny(nn.Module):
    """q: 16×24 (non-square), v: 24×24 (square), k: 9×7 (odd), plus an untouched layer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(24, 16)
        self.v_proj = nn.Linear(24, 24, bias=False)
        self.k_proj = nn.Linear(7, 9)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        h = self.q_proj(self.v_proj(x))
        k = self.k_proj(x[..., :7])
        return self.out(torch.tanh(h)) + k[..., :5]


def make(case: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    model = Tiny(seed).to(dtype)
    return sspeft.inject(model, sspeft.SpectralConfig(n=12, target_modules=TARGETS, seed=3, **CASES[case]))


def train_step(model: nn.Module, x: torch.Tensor, lr: float = 0.05) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def x():
    return torch.randn(4, 3, 24, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES)
def test_identity_at_init_where_method_starts_at_zero(case, x):
    base = Tiny(0)
    adapted = make(case)
    diff = (adapted(x) - base(x)).abs().max().item()
    if case in ZERO_INIT:
        assert diff == 0.0
    else:  # LFMA starts at its selected ΔW_init components, FourierFT (PEFT default) at random coefficients
        assert diff > 0.0


@pytest.mark.parametrize("case", CASES)
def test_only_adapter_parameters_change(case, x):
    model = make(case)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("sspeft_coefficients" in n for n in trainable)
    train_step(model, x)
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        assert changed == ("sspeft_coefficients" in key), key


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_idempotent_and_unmerge_restores(case, x):
    model = make(case)
    train_step(model, x)
    base_weights = {n: m.base_layer.weight.detach().clone() for n, m in sspeft.adapted_layers(model).items()}
    with torch.no_grad():
        unmerged = model(x)
        sspeft.merge(model)
        merged = model(x)
        sspeft.merge(model)  # second merge is a no-op
        merged_twice = model(x)
        sspeft.unmerge(model)
        restored = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_twice, merged, atol=0, rtol=0)
    torch.testing.assert_close(restored, unmerged, atol=1e-5, rtol=1e-5)
    for name, layer in sspeft.adapted_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_gives_plain_model(case, x):
    model = make(case)
    train_step(model, x)
    with torch.no_grad():
        expected = model(x)
        plain = sspeft.merge_and_unload(model)
        got = plain(x)
    assert not sspeft.adapted_layers(plain)
    assert all(type(m) is nn.Linear for n, m in plain.named_children())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_disabled_runs_the_base(case, x):
    model = make(case)
    train_step(model, x)
    with torch.no_grad(), sspeft.disabled(model):
        torch.testing.assert_close(model(x), Tiny(0)(x), atol=0, rtol=0)
    with torch.no_grad():
        assert (model(x) - Tiny(0)(x)).abs().max() > 0


@pytest.mark.parametrize("case", CASES)
def test_bf16_model_keeps_fp32_coefficients(case, x):
    model = make(case, dtype=torch.bfloat16)
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().pow(2).mean().backward()
    for layer in sspeft.adapted_layers(model).values():
        assert layer.coefficients.dtype == torch.float32
        assert layer.coefficients.grad is not None and layer.coefficients.grad.abs().sum() > 0


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


_LOADER = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import sspeft
from test_sspeft_contract import Tiny
out = {}
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
    paths, expected = {}, {}
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(5))
    for case in CASES:
        model = make(case)
        train_step(model, torch.randn(3, 24))
        path = tmp_path / case
        sspeft.save_adapter(model, path)
        assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        paths[case] = str(path)
        with torch.no_grad():
            expected[case] = (
                {n: (l.positions.clone(), l.coefficients.detach().clone()) for n, l in sspeft.adapted_layers(model).items()},
                model(x),
            )
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(Path(__file__).parent), json.dumps(paths)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, (layers, logits) in expected.items():
        loaded = torch.load(Path(paths[case]) / "loaded.pt")
        assert loaded.keys() == layers.keys()
        for name, (pos, coeff) in layers.items():
            assert torch.equal(loaded[name][0], pos), (case, name)
            assert torch.equal(loaded[name][1], coeff), (case, name)
        assert torch.equal(torch.load(Path(paths[case]) / "logits.pt"), logits), case


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
    sspeft.inject(meta, sspeft.SpectralConfig(n=12, target_modules=TARGETS, seed=3, **CASES[case]))
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
    method = CASES[case]["method"]
    with pytest.raises(ValueError, match=rf"method='{method}' chooses its positions from the pretrained weights.*"
                                         r"meta device.*needs the real weights: load the model with its weights"):
        sspeft.inject(meta, sspeft.SpectralConfig(n=12, target_modules=TARGETS, **CASES[case]))
    assert not sspeft.adapted_layers(meta), "inject left a partial result behind"


def test_gradient_checkpointing_llama_matches():
    transformers = pytest.importorskip("transformers")
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
