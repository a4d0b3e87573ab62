"""Adapter state of SpectralLinear: the forward never changes a layer; disabling (sspeft.disabled, PEFT's
disable_adapter / enable_adapters) unmerges first and enabling merges back; merging into a disabled layer is an error;
coefficients cast outside sspeft are restored to exact fp32 once, by `sspeft.restore_fp32` or
`sspeft.KeepFP32Callback` on a real TRL SFTTrainer."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import sspeft
from conftest import require_module
from sspeft_helpers import (eval_logits, load_tiny_llama_bnb4, save_tiny_llama, tiny_llama, tiny_llama_4bit,
                            token_ids)

TARGETS = ["q_proj", "v_proj"]


def prepared_4bit():
    """The NF4 base as every adapted model runs it: `sspeft.prepare_4bit` keeps bitsandbytes from repacking it for
    its AVX512-BF16 kernel, whose outputs differ from the dequantizing kernel by ~1e-3 on CPUs that have it (a plain
    reference built without it would be computed by the other kernel there)."""
    model = tiny_llama_4bit()
    sspeft.prepare_4bit(model)
    return model


BASES = {"dense": tiny_llama, "nf4": prepared_4bit}


def config(method: str = "lfma") -> sspeft.SpectralConfig:
    return sspeft.SpectralConfig(method=method, n=20, target_modules=TARGETS, seed=7)


def randomize(model, seed: int = 0) -> None:
    """Coefficients large enough that the adapted model differs visibly from its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sspeft.adapted_layers(model).values():
            c = layer.coefficients
            c.copy_(torch.randn(c.shape, generator=g) * 0.5)


def adapted(base: str):
    require_module("transformers")
    if base == "nf4":
        require_module("bitsandbytes")
    model = sspeft.inject(BASES[base](), config())
    randomize(model)
    return model


def snapshot(model) -> dict:
    """Everything a forward could change on the adapted layers."""
    out = {}
    for name, layer in sspeft.adapted_layers(model).items():
        base = layer.base_layer
        out[name] = (id(base), base.weight.detach().clone(), list(layer.merged_adapters), layer.disable_adapters,
                     {a: (p.dtype, p.detach().clone(), p.requires_grad) for a, p in layer.sspeft_coefficients.items()})
    return out


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name, (base, weight, merged, disabled, coeffs) in before.items():
        base2, weight2, merged2, disabled2, coeffs2 = after[name]
        assert (base, merged, disabled) == (base2, merged2, disabled2), name
        assert torch.equal(weight, weight2), f"{name}: base weight changed"
        assert coeffs.keys() == coeffs2.keys()
        for a, (dtype, values, grad) in coeffs.items():
            assert (dtype, grad) == coeffs2[a][::2], f"{name}/{a}: dtype or requires_grad changed"
            assert torch.equal(values, coeffs2[a][1]), f"{name}/{a}: coefficients changed"


# ---------------------------------------------------------------------------------------------- the forward
STATES = ("adapted", "merged", "disabled", "disabled-after-merge", "bf16-coefficients")


def put_in(model, state: str):
    """Bring ``model`` into ``state``; returns the context to run the forward in."""
    if state in ("merged", "disabled-after-merge"):
        sspeft.merge(model)
    if state == "bf16-coefficients":
        for layer in sspeft.adapted_layers(model).values():
            layer.coefficients.data = layer.coefficients.data.bfloat16()
    return sspeft.disabled(model) if state.startswith("disabled") else contextlib.nullcontext()


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("base", BASES)
def test_forward_and_backward_leave_the_layer_unchanged(base, state):
    model = adapted(base)
    with put_in(model, state), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 coefficients warn (tested in test_sspeft_peft.py)
        before = snapshot(model)
        model.train()
        x = token_ids(1)
        loss = model(x, labels=x).loss
        assert loss.requires_grad == (state in ("adapted", "bf16-coefficients"))  # merged or disabled: no adapter
        if loss.requires_grad:
            loss.backward()
        assert_same(before, snapshot(model))


def test_forward_of_a_disabled_and_merged_layer_raises():
    """Not reachable through the public API (disabling unmerges, merging a disabled layer raises); a forward that
    meets it anyway says so instead of unmerging."""
    model = adapted("dense")
    sspeft.merge(model)
    for layer in sspeft.adapted_layers(model).values():
        layer._disable_adapters = True
    with pytest.raises(RuntimeError, match=r"merged into a layer whose adapters are disabled.*unmerge first"):
        model(token_ids())
    assert all(layer.merged for layer in sspeft.adapted_layers(model).values())


# ---------------------------------------------------------------------------------------------- disabling
@pytest.mark.parametrize("base", BASES)
def test_disabled_unmerges_inside_and_merges_back_on_exit(base):
    model = adapted(base)
    plain = eval_logits(BASES[base]())
    unmerged = eval_logits(model)
    assert (unmerged - plain).abs().max() > 1e-3, "the adapter must change the output for this test to see anything"
    sspeft.merge(model)
    merged = eval_logits(model)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    with sspeft.disabled(model):
        assert not any(layer.merged for layer in sspeft.adapted_layers(model).values())
        torch.testing.assert_close(eval_logits(model), plain, rtol=1e-5, atol=1e-5)
    layers = sspeft.adapted_layers(model).values()
    assert all(layer.merged_adapters == ["default"] and not layer.disable_adapters for layer in layers)
    torch.testing.assert_close(eval_logits(model), merged, rtol=1e-5, atol=1e-5)


def test_disabled_keeps_which_coefficients_train_and_nests():
    model = adapted("dense")
    layers = list(sspeft.adapted_layers(model).values())
    layers[0].coefficients.requires_grad_(False)
    grads = [layer.coefficients.requires_grad for layer in layers]
    with sspeft.disabled(model):
        with sspeft.disabled(model):
            assert all(layer.disable_adapters for layer in layers)
        assert all(layer.disable_adapters for layer in layers), "the inner block re-enabled the outer one's layers"
        assert [layer.coefficients.requires_grad for layer in layers] == grads
    assert not any(layer.disable_adapters for layer in layers)
    assert [layer.coefficients.requires_grad for layer in layers] == grads


def test_merging_a_disabled_layer_raises_and_unmerging_cancels_the_merge_back():
    model = adapted("dense")
    sspeft.merge(model)
    with sspeft.disabled(model):
        with pytest.raises(RuntimeError, match="cannot merge adapters into a layer whose adapters are disabled"):
            sspeft.merge(model)
        for layer in sspeft.adapted_layers(model).values():
            layer.unmerge()
    assert not any(layer.merged for layer in sspeft.adapted_layers(model).values())
    sspeft.merge(model)
    with sspeft.disabled(model):
        sspeft.unmerge(model)  # the model-level call cancels the merge-back too
    assert not any(layer.merged or layer.merge_pending for layer in sspeft.adapted_layers(model).values())
    plain = eval_logits(tiny_llama())
    torch.testing.assert_close(eval_logits(model), eval_logits(sspeft.merge(model)), rtol=1e-4, atol=1e-4)
    assert (eval_logits(model) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("base", BASES)
def test_peft_disable_adapter_unmerges_and_merges_back(base):
    """PEFT's disable_adapter() runs the base (as for LoRA) and freezes the coefficients inside; on exit the merge
    is restored and the active adapter trains again."""
    require_module("peft")
    import peft

    if base == "nf4":
        require_module("bitsandbytes")
    model = peft.get_peft_model(BASES[base](), sspeft.peft_config(config()))
    randomize(model)
    plain = eval_logits(BASES[base]())
    unmerged = eval_logits(model)
    model.base_model.merge_adapter()
    layers = sspeft.adapted_layers(model).values()
    assert all(layer.merged for layer in layers)
    with model.disable_adapter():
        assert not any(layer.merged or layer.coefficients.requires_grad for layer in layers)
        torch.testing.assert_close(eval_logits(model), plain, rtol=1e-5, atol=1e-5)
    assert all(layer.merged and layer.coefficients.requires_grad for layer in layers)
    torch.testing.assert_close(eval_logits(model), unmerged, rtol=1e-4, atol=1e-4)
    model.base_model.enable_adapter_layers()  # enabling enabled layers changes nothing
    assert all(layer.merged_adapters == ["default"] for layer in layers)


@pytest.mark.parametrize("base", BASES)
def test_peft_merge_and_unload_inside_disable_adapter_merges_as_for_lora(base):
    """PEFT's merge_and_unload() inside disable_adapter() gives W0 + ΔW (PEFT's LoRA merges there too), whether the
    adapter was merged before or not."""
    require_module("peft")
    import peft

    if base == "nf4":
        require_module("bitsandbytes")
    for merged_first in (False, True):
        model = peft.get_peft_model(BASES[base](), sspeft.peft_config(config()))
        randomize(model)
        adapted = eval_logits(model)
        if merged_first:
            model.base_model.merge_adapter()
        with model.disable_adapter():
            plain = model.merge_and_unload()
        assert not sspeft.adapted_layers(plain)
        torch.testing.assert_close(eval_logits(plain), adapted, rtol=1e-4, atol=1e-4)
        assert (eval_logits(plain) - eval_logits(BASES[base]())).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- fp32
def test_restore_fp32_upcasts_with_a_warning_when_the_cast_values_were_updated():
    """Exact restoration needs the cast values to be the rounding of the fp32 ones; after an update in bf16 the
    fp32 values are gone, and restore_fp32 upcasts what is there and says so."""
    model = adapted("dense")
    layers = sspeft.adapted_layers(model)
    exact = {n: layer.coefficients.detach().clone() for n, layer in layers.items()}
    for layer in layers.values():
        layer.coefficients.data = layer.coefficients.data.bfloat16()
    updated = next(iter(layers))
    with torch.no_grad():
        layers[updated].coefficients.add_(1.0)
    upcast = layers[updated].coefficients.detach().float()
    with pytest.warns(UserWarning, match="changed since they were fp32; upcast to fp32") as record:
        sspeft.restore_fp32(model)
    assert sum("changed since" in str(w.message) for w in record) == 1
    for name, layer in layers.items():
        assert layer.coefficients.dtype == torch.float32
        assert torch.equal(layer.coefficients.detach(), upcast if name == updated else exact[name]), name


def test_keep_fp32_callback_on_a_real_sft_trainer_step(tmp_path):
    """TRL casts the coefficients of a 4-bit model to bf16 while SFTTrainer is built; with KeepFP32Callback the
    trainer's model holds the exact fp32 initial values when the constructor returns, the step warns about no cast
    and trains fp32 coefficients."""
    require_module("trl")
    require_module("bitsandbytes")
    import peft
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from test_sspeft_peft import word_tokenizer

    prompts = [f"question {i} : what is {i} plus {i} ?" for i in range(8)]
    completions = [f" answer : {2 * i} ." for i in range(8)]
    tokenizer = word_tokenizer(prompts + completions)
    path = save_tiny_llama(tmp_path / "base")
    cfg = sspeft.SpectralConfig(method="ssh", n=24, target_modules=TARGETS, seed=2, init="normal", init_scale=0.01)

    def build(callbacks):
        args = SFTConfig(
            output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=5e-2,
            logging_steps=1, save_strategy="no", report_to=[], max_length=32, bf16=False, fp16=False,
            gradient_checkpointing=True, dataloader_num_workers=0, seed=0,
        )
        return SFTTrainer(
            model=load_tiny_llama_bnb4(path), args=args, processing_class=tokenizer,
            peft_config=sspeft.peft_config(cfg), callbacks=callbacks,
            train_dataset=Dataset.from_dict({"prompt": prompts, "completion": completions}),
        )

    initial = {n: l.coefficients.detach().clone()
               for n, l in sspeft.adapted_layers(peft.get_peft_model(load_tiny_llama_bnb4(path),
                                                                     sspeft.peft_config(cfg))).items()}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in initial.values()), \
        "init values are bf16-representable: the test could not see a lossy cast"
    without = sspeft.adapted_layers(build(None).model)
    assert all(layer.coefficients.dtype == torch.bfloat16 for layer in without.values()), \
        "TRL no longer casts the adapters of 4-bit models to bf16: this test cannot see what the callback undoes"
    trainer = build([sspeft.KeepFP32Callback()])
    layers = sspeft.adapted_layers(trainer.model)
    assert layers.keys() == initial.keys() and len(layers) == 4
    for name, layer in layers.items():
        assert layer.coefficients.dtype == torch.float32
        assert torch.equal(layer.coefficients.detach(), initial[name]), f"{name}: fp32 values not restored exactly"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in record if "not fp32" in str(w.message)]
    for name, layer in layers.items():
        assert layer.coefficients.dtype == torch.float32
        assert not torch.equal(layer.coefficients.detach(), initial[name]), f"{name}: coefficients did not change"
    assert trainer.state.global_step == 1


def test_enabling_merges_back_only_adapters_still_active():
    """An adapter switch while disabled: enabling merges back none of the adapters the switch deactivated."""
    require_module("peft")
    import peft

    model = peft.get_peft_model(tiny_llama(), sspeft.peft_config(config()))
    model.add_adapter("other", sspeft.peft_config(config("fourierft")))
    randomize(model)
    model.base_model.merge_adapter()
    model.base_model.disable_adapter_layers()
    model.base_model.set_adapter("other")
    randomize(model, seed=1)  # the active adapter's coefficients: "other" now
    model.base_model.enable_adapter_layers()
    layers = sspeft.adapted_layers(model).values()
    assert all(layer.active_adapters == ["other"] and not layer.merged for layer in layers)
    assert all(layer.sspeft_coefficients["other"].requires_grad for layer in layers)
    assert not any(layer.sspeft_coefficients["default"].requires_grad for layer in layers)
    with_other = eval_logits(model)
    model.base_model.merge_adapter()
    torch.testing.assert_close(eval_logits(model), with_other, rtol=1e-4, atol=1e-4)
    assert (with_other - eval_logits(tiny_llama())).abs().max() > 1e-3
