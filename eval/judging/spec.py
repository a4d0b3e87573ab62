"""What `--judge` names: an OpenAI-compatible endpoint, a model run in-process, or a model served for the run.

    parse_judge_spec("openai:gpt-4o@https://api.openai.com/v1")   # the endpoint judge (eval.judging.api_client)
    parse_judge_spec("local:smollm2")                              # in-process (eval.judging.local)
    parse_judge_spec("serve:/models/Qwen2.5-72B-Instruct")         # `vllm serve` for the run (eval.judging.server)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from eval.common import EvalError, safe_id
from launch.credentials import refusal

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
SpecKind = Literal["openai", "local", "serve"]


@dataclass(frozen=True)
class JudgeSpec:
    """Where judgments come from: an OpenAI-compatible endpoint, an in-process model, or a model we serve."""

    kind: SpecKind
    """openai (an endpoint), local (in-process vLLM/transformers), serve (`vllm serve` started for the run)."""
    model: str
    """The endpoint's model name (openai) or the model path/spec (local, serve)."""
    base_url: Optional[str] = None
    """The endpoint, e.g. http://127.0.0.1:8000/v1 (openai only)."""

    def __str__(self) -> str:
        if self.kind == "openai":
            return f"openai:{self.model}@{self.base_url}"
        return f"{self.kind}:{self.model}"

    @property
    def judge_id(self) -> str:
        """File-name id of the judge: the model name, or the model path's last component."""
        if self.kind == "openai":
            return safe_id(self.model)
        return safe_id(Path(self.model).name.removesuffix(".gguf"))


_URL = re.compile(r"^(?P<model>.+?)@(?P<url>https?://\S+)$")


def parse_judge_spec(spec: str) -> JudgeSpec:
    """openai:MODEL[@BASE_URL] | local:PATH | serve:PATH | PATH (same as local:PATH). A URL with a credential in
    it is refused before anything else (launch.credentials says why), so no message or file ever shows one."""
    if not isinstance(spec, str) or not spec.strip():
        raise EvalError(f"--judge is {spec!r}; expected openai:MODEL@BASE_URL, local:PATH or serve:PATH")
    problem = refusal("--judge", spec)
    if problem:
        raise EvalError(problem)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "openai":
        match = _URL.match(rest)
        model, url = (match["model"], match["url"]) if match else (rest, DEFAULT_OPENAI_URL)
        if not model or "@" in model:
            raise EvalError(f"--judge {spec!r}: expected openai:MODEL@BASE_URL with an http(s) URL, "
                            f"e.g. openai:gpt-4o@https://api.openai.com/v1")
        return JudgeSpec("openai", model, url.rstrip("/"))
    if sep and prefix in ("local", "serve"):
        if not rest:
            raise EvalError(f"--judge {spec!r}: expected {prefix}:PATH (a model directory, a .gguf file or smollm2)")
        return JudgeSpec(prefix, rest)  # type: ignore[arg-type]
    if sep and prefix in ("http", "https"):
        raise EvalError(f"--judge {spec!r}: an endpoint needs a model name: openai:MODEL@{spec}")
    return JudgeSpec("local", spec)
