"""Test helpers for the training stage: a tiny random LLaMA with a byte-level BPE tokenizer built offline, Alpaca
records, and recipe files pointing at them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

SENTENCES = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: name a colour. ### Input: the sky ### Response: blue",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Add two and three to get five; multiply four by six to get twenty four.",
    "Paris is the capital of France, Berlin of Germany and Rome of Italy.",
    "Write a short poem about the sea, the wind and the stars at night.",
]
CHAT_TEMPLATE = ("{%- for m in messages -%}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{%- endfor -%}"
                 "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}")

RECORDS = [
    {"instruction": "Name the colour of the sky.", "input": "", "output": "The sky is blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Give the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Write a rhyme with sun.", "input": "", "output": "Fun in the sun."},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
    {"instruction": "What is four times six?", "input": "", "output": "Twenty four."},
    {"instruction": "Name an animal that sleeps a lot.", "input": "", "output": "The cat."},
]


def build_tokenizer(out: Path):
    """A byte-level BPE tokenizer (~300 tokens) trained on a few sentences, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer LLaMA (hidden 64, GQA so v_proj is 64→32) with its tokenizer, in fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out


def write_records(path: Path, records=RECORDS, repeat: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records) * repeat, indent=1))
    return path


def write_recipe(path: Path, model: Path, data: Path, run_dir: Path, method: str = "ssh", quantize: str = "none",
                 dtype: str = "fp32", **sections) -> Path:
    """A tiny recipe; `sections` maps section name → dict of extra keys."""
    adapter = {"method": method, "target_modules": ["q_proj", "v_proj"], "seed": 0}
    if method == "lora":
        adapter = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    elif method in ("ssh", "waveft", "fourierft", "shira", "lfma"):
        adapter["n"] = 32
    recipe = {
        "name": f"tiny-{method}",
        "run_dir": str(run_dir),
        "model": {"path": str(model), "quantize": quantize, "dtype": dtype},
        "adapter": adapter,
        "data": {"path": str(data), "max_length": 192},
        "train": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "warmup_steps": 0,
                  "save_steps": 2, "report_to": "none", "gradient_checkpointing": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_module(module: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess:
    """Run `python -m module args` in a child process; never hangs past `timeout`."""
    return subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, env=env or child_env(), capture_output=True,
                          text=True, timeout=timeout)


def read_positions(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k: v for k, v in tensors.items() if k.endswith("positions")}
