"""sspeft.export_lora: exact B·A = ΔW for every method on plain and NF4 bases, the exact-rank formulas, truncation
error against an independent SVD of the dense ΔW, and the export loaded by PEFT as an ordinary LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch

import sspeft
from sspeft.export import VLLM_LORA_RANKS, export_layer, exact_factors
from sspeft_helpers import dense_copy, tiny_llama, tiny_llama_4bit

TARGETS = ["q_proj", "v_proj"]
VARIANTS = [("ssh", {}), ("ssh", {"dht": "separable"}), ("fourierft", {}), ("lfma", {}),
            ("lfma", {"half_spectrum": True}), ("shira", {}), ("waveft", {})]
IDS = [m + ("-" + "-".join(str(v) for v in kw.values()) if kw else "") for m, kw in VARIANTS]


def adapted(method: str, quantized: bool = False, n: int = 20, **kw):
    model = tiny_llama_4bit() if quantized else tiny_llama()
    sspeft.inject(model, sspeft.SpectralConfig(method=method, n=n, target_modules=TARGETS, seed=3, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in sspeft.adapted_layers(model).values():
            c = layer.coefficients
            c.copy_(torch.randn(c.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "nf4"])
@pytest.mark.parametrize("method,kw", VARIANTS, ids=IDS)
def test_exact_factors_reproduce_delta_weight(method, kw, quantized):
    model = adapted(method, quantized, **kw)
    export = sspeft.export_lora(model, max_rank=None)
    assert export.r in VLLM_LORA_RANKS and export.r >= max(e.rank for e in export.layers.values())
    state = export.state_dict()
    for name, layer in sspeft.adapted_layers(model).items():
        delta = layer.delta_weight().detach()
        e = export.layers[name]
        assert not e.truncated and e.error == 0.0
        a, b = state[f"base_model.model.{name}.lora_A.weight"], state[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (export.r, layer.in_features) and b.shape == (layer.out_features, export.r)
        assert (a[e.rank:] == 0).all() and (b[:, e.rank:] == 0).all()  # zero padding up to the declared rank
        torch.testing.assert_close(b @ a, delta, rtol=0, atol=2e-6 * float(delta.abs().max()))
        assert e.measured_error < 1e-6
        # the structural rank is an upper bound of the true rank, and reached by generic coefficients
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-5) <= e.exact_rank


def _set_positions(layer, rows, cols):
    layer.sspeft_positions[layer.active_adapter] = torch.stack([torch.tensor(rows), torch.tensor(cols)]).long()
    with torch.no_grad():
        layer.sspeft_coefficients[layer.active_adapter].data = torch.randn(
            layer.coefficients.shape[:0] + (len(rows),) + layer.coefficients.shape[1:],
            generator=torch.Generator().manual_seed(5))


# (method, kw, rows, cols, exact rank): one row frequency k costs 2 real atoms (cos, sin), 1 at k = 0 and k = m/2;
# k and m − k share them; the separable DHT costs 1 per distinct k; SHiRA and WaveFT 1 per distinct row.
RANK_CASES = [
    ("fourierft", {}, [3, 3, 3], [1, 7, 20], 2),
    ("fourierft", {}, [0, 0, 0], [1, 7, 20], 1),
    ("fourierft", {}, [32, 32, 32], [1, 7, 20], 1),
    ("fourierft", {}, [3, 61, 3], [1, 7, 20], 2),
    ("ssh", {}, [3, 61, 3, 5], [1, 7, 20, 9], 4),
    ("ssh", {"dht": "separable"}, [3, 3, 3], [1, 7, 20], 1),
    ("ssh", {"dht": "separable"}, [3, 61, 3], [1, 7, 20], 2),
    ("lfma", {"half_spectrum": True}, [5, 5, 59], [0, 4, 32], 2),
    ("shira", {}, [4, 4, 9], [1, 2, 3], 2),
    ("waveft", {}, [4, 4, 40], [1, 2, 3], 2),
]


@pytest.mark.parametrize("method,kw,rows,cols,rank", RANK_CASES)
def test_exact_rank_formula(method, kw, rows, cols, rank):
    model = adapted(method, **kw)
    layer = sspeft.adapted_layers(model)["model.layers.0.self_attn.q_proj"]  # 64×64
    _set_positions(layer, rows, cols)
    b, a, side = exact_factors(layer)
    delta = layer.delta_weight().detach().double()
    assert b.shape[1] == rank
    assert int(torch.linalg.matrix_rank(delta, rtol=1e-5)) == rank
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-6 * float(delta.abs().max()))


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "nf4"])
@pytest.mark.parametrize("method,kw", [("ssh", {}), ("lfma", {}), ("waveft", {})], ids=["ssh", "lfma", "waveft"])
def test_truncation_error_matches_an_independent_svd(method, kw, quantized):
    model = adapted(method, quantized, n=40, **kw)
    export = sspeft.export_lora(model, max_rank=8)
    assert export.r == 8
    for name, layer in sspeft.adapted_layers(model).items():
        e = export.layers[name]
        assert e.exact_rank > 8 and e.truncated and e.rank == 8
        s = torch.linalg.svdvals(layer.delta_weight().detach().double())
        expected = float((s[8:].pow(2).sum() / s.pow(2).sum()).sqrt())
        assert expected > 1e-3  # truncation really loses something
        assert e.error == pytest.approx(expected, rel=1e-6)
        assert e.measured_error == pytest.approx(expected, rel=1e-4)


def test_export_loads_in_peft_as_lora_and_matches_the_runtime_adapter(tmp_path):
    from peft import LoraConfig, PeftModel

    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for method, kw in VARIANTS:
        for quantized in (False, True):
            model = adapted(method, quantized, **kw).eval()
            with torch.no_grad():
                runtime = model(x).logits
                with sspeft.disabled(model):
                    plain = model(x).logits
            out = tmp_path / f"{method}-{len(kw)}-{quantized}"
            sspeft.export_lora(model, out, base_model_name_or_path="tiny")
            config = json.loads((out / "adapter_config.json").read_text())
            assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
            assert sorted(config["target_modules"]) == TARGETS
            base = _plain_base(model, quantized)
            lora = PeftModel.from_pretrained(base, str(out)).eval()
            assert isinstance(lora.peft_config["default"], LoraConfig)
            with torch.no_grad():
                served = lora(x).logits
            shift = (runtime - plain).abs().max()
            assert shift > 1e-3, "the adapter does not move the logits; the comparison would prove nothing"
            torch.testing.assert_close(served, runtime, rtol=0, atol=1e-4 * max(1.0, float(shift)))


def _plain_base(model, quantized: bool):
    """The base the LoRA applies to: the same tiny LLaMA, with NF4 layers dequantized for a 4-bit run."""
    base = tiny_llama()
    if quantized:
        for name, layer in sspeft.adapted_layers(model).items():
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, dense_copy(layer.base_layer))
        for name, module in list(model.named_modules()):
            if type(module).__name__ == "Linear4bit" and not name.endswith("base_layer"):
                parent, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent), child, dense_copy(module))
    return base.eval()


def test_bad_max_rank_and_missing_adapter_are_refused(tmp_path):
    model = adapted("ssh")
    with pytest.raises(ValueError, match="max_rank=0"):
        sspeft.export_lora(model, tmp_path / "x", max_rank=0)
    with pytest.raises(ValueError, match="exceeds the largest rank"):
        sspeft.export_lora(model, tmp_path / "x", max_rank=600)
    with pytest.raises(ValueError, match="carries no sspeft adapter"):
        sspeft.export_lora(tiny_llama(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unrounded_rank_and_single_layer_export():
    model = adapted("shira")
    export = sspeft.export_lora(model, max_rank=None, rank_sizes=None)
    assert export.r == max(e.rank for e in export.layers.values())
    layer = sspeft.adapted_layers(model)["model.layers.1.self_attn.v_proj"]
    e = export_layer(layer, max_rank=2)
    assert e.rank == 2 and e.B.shape == (32, 2) and e.A.shape == (2, 64)
