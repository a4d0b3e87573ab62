"""Tiny real models for the sspeft tests (no hub access, built in milliseconds).

    from sspeft_helpers import tiny_llama, tiny_llama_4bit
    model = tiny_llama()                  # transformers LlamaForCausalLM, hidden 64, 2 layers, GQA 4/2 heads
    qmodel = tiny_llama_4bit()            # same weights, q/k/v/o/gate/up/down as bitsandbytes NF4 Linear4bit

`tiny_llama_4bit` quantizes the dense layers of `tiny_llama(...)` with the same arguments, so the two models share
every non-quantized weight and the 4-bit weights dequantize to an NF4 rounding of the dense ones. The Linear4bit
layers are left exactly as bitsandbytes builds them (including `support_avx512bf16_for_cpu`), so tests see what a
user's model would hold.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama_config(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, intermediate=None):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, dtype=torch.float32, seed=0, intermediate=None):
    """A randomly initialised (seeded) transformers LlamaForCausalLM in ``dtype``, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(hidden, layers, heads, kv_heads, vocab, intermediate))
    return model.to(dtype).eval()


def linear4bit_from(dense: nn.Linear, compute_dtype: torch.dtype = torch.float32, quant_type: str = "nf4"):
    """A real bitsandbytes Linear4bit (double quant) holding the NF4 quantization of ``dense``'s weight."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        dense.in_features, dense.out_features, bias=dense.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=True, quant_type=quant_type, device="cpu",
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.detach().clone(), requires_grad=False, compress_statistics=True, quant_type=quant_type,
        module=layer,
    )
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    layer = layer.to("cpu")  # Params4bit quantizes on its first move to a real device
    assert layer.weight.bnb_quantized and layer.weight.quant_state is not None
    return layer


def quantize_linears(model: nn.Module, names=LINEAR_NAMES, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace (in place) every nn.Linear whose last name part is in ``names`` by an NF4 Linear4bit."""
    for full, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and full.rsplit(".", 1)[-1] in names:
            parent_name, _, child = full.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, linear4bit_from(module, compute_dtype).train(module.training))
    return model


def tiny_llama_4bit(
    hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, dtype=torch.float32, seed=0, intermediate=None,
    compute_dtype=None,
):
    """``tiny_llama(...)`` with q/k/v/o/gate/up/down as real NF4 Linear4bit layers (double quant), computing in
    ``compute_dtype`` (default: ``dtype``); embeddings, norms and lm_head stay dense in ``dtype``."""
    model = tiny_llama(hidden, layers, heads, kv_heads, vocab, dtype, seed, intermediate)
    return quantize_linears(model, LINEAR_NAMES, compute_dtype or dtype)


def save_tiny_llama(path, **kwargs):
    """Save ``tiny_llama(**kwargs)`` as a transformers checkpoint directory (safetensors) and return the path."""
    model = tiny_llama(**kwargs)
    model.save_pretrained(str(path))
    return path


def load_tiny_llama_bnb4(path, compute_dtype=torch.float32):
    """Load a saved tiny checkpoint through transformers' BitsAndBytesConfig (NF4, double quant) on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=qcfg, device_map="cpu", dtype=compute_dtype
    )


def dequantized(layer) -> torch.Tensor:
    """The fp32 (out, in) weight a Linear4bit holds, straight from bitsandbytes."""
    import bitsandbytes as bnb

    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return w.float().reshape(layer.out_features, layer.in_features)


def dense_copy(layer) -> nn.Linear:
    """An fp32 nn.Linear with the dequantized weight and the bias of a Linear4bit."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(dequantized(layer))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.float())
    return out


def linear4bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every bitsandbytes Linear4bit in ``model`` (the model itself included, named "")."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def dense_twin(model: nn.Module) -> nn.Module:
    """A deep copy of a 4-bit model with every Linear4bit replaced by an fp32 nn.Linear of its dequantized weight."""
    twin = copy.deepcopy(model)
    for name, module in linear4bit_layers(twin).items():
        parent_name, _, child = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        setattr(parent, child, dense_copy(module).train(module.training))
    return twin


def token_ids(seed: int = 0, vocab: int = 128) -> torch.Tensor:
    """A (2, 9) batch of token ids for the tiny models, seeded."""
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def eval_logits(model, seed: int = 0) -> torch.Tensor:
    """The model's logits on token_ids(seed), in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return model(token_ids(seed)).logits
