"""Judge specs and the OpenAI-compatible judge client with our own retries.

    spec = parse_judge_spec("openai:gpt-4o@https://api.openai.com/v1")
    client = OpenAIJudge(spec, api_key=..., settings=RetrySettings(timeout=120))
    result = client.complete(messages, temperature=0.0, max_tokens=2048, seed=0)

The openai package's own retries are off (max_retries=0) and every request has a timeout: retrying here lets us
retry only what can succeed on a second try (timeouts, connection errors, 429, 5xx) with exponential backoff,
and count every failure with its reason.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from eval.common import EvalError, safe_id

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
    """openai:MODEL[@BASE_URL] | local:PATH | serve:PATH | PATH (same as local:PATH)."""
    if not isinstance(spec, str) or not spec.strip():
        raise EvalError(f"--judge is {spec!r}; expected openai:MODEL@BASE_URL, local:PATH or serve:PATH")
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


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(spec: JudgeSpec, env_name: str, environ: dict[str, str]) -> Optional[str]:
    """The API key from `env_name`; required for non-loopback endpoints; never written anywhere."""
    key = environ.get(env_name) or None
    if spec.kind == "openai" and key is None and not is_loopback(spec.base_url or ""):
        raise EvalError(f"judge endpoint {spec.base_url} is not on this machine and the environment variable "
                        f"{env_name} (--api-key-env) is not set; export the API key in it")
    return key


def probe_models(base_url: str, api_key: Optional[str], timeout: float) -> list[str]:
    """GET {base_url}/models; an EvalError naming the URL when the endpoint does not answer like OpenAI's API."""
    url = base_url.rstrip("/") + "/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
        return [str(m["id"]) for m in body["data"]]
    except urllib.error.HTTPError as e:
        raise EvalError(f"judge endpoint {url} answered HTTP {e.code} to the model listing; check the URL and "
                        f"the API key") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EvalError(f"judge endpoint {url} is unreachable ({reason}); start the server or fix the URL "
                        f"in --judge") from e
    except (ValueError, KeyError, TypeError) as e:
        raise EvalError(f"judge endpoint {url} did not return an OpenAI model list ({e!r})") from e


@dataclass(frozen=True)
class RetrySettings:
    """How one judge request is attempted."""

    timeout: float = 120.0
    """Seconds before one request counts as timed out."""
    max_attempts: int = 4
    """Attempts per request, the first included; only retryable failures are retried."""
    backoff: float = 1.0
    """First wait between attempts in seconds; doubles each time (with jitter)."""
    backoff_max: float = 60.0
    """Longest wait between attempts (also caps a server's Retry-After)."""


@dataclass(frozen=True)
class CallResult:
    """One judge call's text, or the failure that ended it."""

    text: Optional[str]
    """The judge's reply; None on failure."""
    reason: Optional[str] = None
    """Failure reason: timeout, connection, http_<code>, bad_response, empty_response, ..."""
    detail: str = ""
    """Error message for the failure record."""
    attempts: int = 1
    """Requests sent."""
    retryable: bool = False
    """Whether a later rerun may try this call again (transient failure)."""


@dataclass(frozen=True)
class _Failure:
    reason: str
    detail: str
    retryable: bool
    retry_after: Optional[float] = None


def classify(exc: BaseException) -> _Failure:
    """Map an openai/httpx exception to a failure reason and whether retrying can help."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return _Failure("timeout", str(exc), True)
    if isinstance(exc, openai.APIConnectionError):
        return _Failure("connection", str(exc.__cause__ or exc), True)
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        retry_after = None
        if code == 429:
            try:
                retry_after = float(exc.response.headers.get("retry-after", ""))
            except ValueError:
                retry_after = None
        retryable = code in (408, 409, 429) or code >= 500
        return _Failure(f"http_{code}", _short(str(exc)), retryable, retry_after)
    if isinstance(exc, (openai.APIResponseValidationError, ValueError, KeyError, TypeError, AttributeError)):
        return _Failure("bad_response", _short(f"{type(exc).__name__}: {exc}"), False)
    if isinstance(exc, openai.APIError):
        return _Failure("api_error", _short(str(exc)), False)
    raise exc


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class OpenAIJudge:
    """Chat completions against an OpenAI-compatible endpoint, one request per call, retried by us."""

    def __init__(self, spec: JudgeSpec, api_key: Optional[str], settings: RetrySettings, sleep=time.sleep) -> None:
        import openai

        self.spec = spec
        self.settings = settings
        self._sleep = sleep
        # the client's own retries stay off: ours know which errors are worth a second try
        self._client = openai.OpenAI(base_url=spec.base_url, api_key=api_key or "EMPTY", max_retries=0,
                                     timeout=settings.timeout)

    def complete(self, messages: list[dict[str, str]], temperature: float, max_tokens: int,
                 seed: Optional[int], extra_body: Optional[dict[str, Any]] = None) -> CallResult:
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                text = self._request(messages, temperature, max_tokens, seed, extra_body)
            except Exception as exc:  # noqa: BLE001 - classify() re-raises what it does not know
                failure = classify(exc)
                if not failure.retryable or attempt == self.settings.max_attempts:
                    return CallResult(None, failure.reason, failure.detail, attempt, failure.retryable)
                self._sleep(self._delay(attempt, failure.retry_after))
                continue
            if not text.strip():
                return CallResult(None, "empty_response", "the judge returned no text", attempt, False)
            return CallResult(text, attempts=attempt)
        raise AssertionError("unreachable")  # the loop always returns

    def _request(self, messages, temperature, max_tokens, seed, extra_body) -> str:
        kwargs: dict[str, Any] = {"model": self.spec.model, "messages": messages, "temperature": temperature,
                                  "max_tokens": max_tokens}
        if seed is not None:
            kwargs["seed"] = seed
        if extra_body:
            kwargs["extra_body"] = extra_body
        response = self._client.chat.completions.create(**kwargs)
        if isinstance(response, (str, bytes)) or not getattr(response, "choices", None):
            raise ValueError(f"no choices in the response: {_short(repr(response), 200)}")
        content = response.choices[0].message.content
        if not isinstance(content, str):
            raise TypeError(f"message content is {type(content).__name__}, expected text")
        return content

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        s = self.settings
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, s.backoff_max)
        # full exponential backoff with jitter so concurrent workers do not retry in lockstep
        return min(s.backoff_max, s.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def constraint_body(output: str) -> dict[str, Any]:
    """vLLM's request extension that restricts the judge's text to a bare rating or verdict."""
    from eval.rating import RATING_REGEX, VERDICT_REGEX

    return {"structured_outputs": {"regex": RATING_REGEX if output == "rating" else VERDICT_REGEX}}


class EndpointBackend:
    """Runs judge calls against an endpoint with at most `concurrency` requests in flight."""

    def __init__(self, judge: OpenAIJudge, concurrency: int, constrained: bool) -> None:
        self.judge = judge
        self.concurrency = concurrency
        self.constrained = constrained

    def _one(self, request) -> CallResult:
        extra = constraint_body(request.output) if self.constrained else None
        return self.judge.complete(request.messages, request.temperature, request.max_tokens, request.seed,
                                   extra_body=extra)

    def run(self, requests, done) -> None:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
        try:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                done(futures[future], future.result())
        finally:
            # on Ctrl-C: drop queued calls, let in-flight ones end by their timeout
            pool.shutdown(wait=True, cancel_futures=True)
