"""The OpenAI-compatible judge client: an endpoint's model listing, chat completions, and the Backend running judge
calls against it with bounded concurrency.

    spec = parse_judge_spec("openai:gpt-4o@https://api.openai.com/v1")   # eval.judging.spec
    client = OpenAIJudge(spec, api_key=..., settings=RetrySettings(timeout=120))
    result = client.complete(messages, temperature=0.0, max_tokens=2048, seed=0)

Retries are the openai client's own (`max_retries`): it retries what can succeed on a second try (timeouts,
connection errors, 408/409/429, 5xx) with exponential backoff and honours the server's Retry-After. What it does
not give is kept here: every request is counted (attempts per call) and a call that still fails is recorded with
its reason and whether a later rerun may try it again.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from eval.common import EvalError
from eval.judging.calls import CallRequest, CallResult
from eval.judging.spec import JudgeSpec
from eval.judging.verdicts import RATING_REGEX, VERDICT_REGEX


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(spec: JudgeSpec, env_name: str, environ: dict[str, str]) -> Optional[str]:
    """The API key from `env_name`; required for non-loopback endpoints; never written anywhere. `env_name` must
    look like a variable name: a key given in its place is refused without being echoed."""
    if not _ENV_NAME.fullmatch(env_name):
        raise EvalError(f"--api-key-env takes the NAME of an environment variable (letters, digits and '_', not "
                        f"starting with a digit), e.g. OPENAI_API_KEY; the value given ({len(env_name)} characters, "
                        f"not shown in case it is a key) is not such a name")
    key = environ.get(env_name) or None
    if spec.kind == "openai" and key is None and not is_loopback(spec.base_url or ""):
        raise EvalError(f"judge endpoint {spec.base_url} is not on this machine and the environment variable "
                        f"{env_name} (--api-key-env) is not set; export the API key in it")
    return key


def probe_models(base_url: str, api_key: Optional[str], timeout: float) -> list[str]:
    """The endpoint's model ids (`client.models.list()`); an EvalError naming the URL when it does not answer like
    OpenAI's API."""
    import openai

    from eval.judging.deadline import DeadlineTransport

    url = base_url.rstrip("/") + "/models"
    http = openai.DefaultHttpxClient(timeout=timeout, transport=DeadlineTransport(timeout, base_url))
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0, timeout=timeout,
                           http_client=http)
    try:
        return [str(m.id) for m in client.models.list()]
    except openai.APIStatusError as e:
        raise EvalError(f"judge endpoint {url} answered HTTP {e.status_code} to the model listing; check the URL "
                        f"and the API key") from e
    except openai.APIConnectionError as e:  # timeouts included
        raise EvalError(f"judge endpoint {url} is unreachable ({e.__cause__ or e}); start the server or fix the "
                        f"URL in --judge") from e
    except (openai.APIError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EvalError(f"judge endpoint {url} did not return an OpenAI model list ({type(e).__name__}: "
                        f"{_short(str(e), 200)})") from e
    finally:
        client.close()


@dataclass(frozen=True)
class RetrySettings:
    """How one judge request is attempted (by the openai client)."""

    timeout: float = 120.0
    """Seconds one attempt may take in all, from connecting to the last byte of the reply (eval.judging.deadline);
    a call ends within max_attempts x timeout plus the backoff waits."""
    max_attempts: int = 4
    """Attempts per request, the first included; only retryable failures are retried."""
    backoff: float = 0.5
    """First wait between attempts in seconds (the client's exponential schedule, 0.5 s by default, scaled to
    start here); a server's Retry-After is followed as the client does."""


@dataclass(frozen=True)
class _Failure:
    reason: str
    detail: str
    retryable: bool


def classify(exc: BaseException) -> _Failure:
    """Map an openai exception (after the client's own retries) to a failure reason and whether a rerun may help."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return _Failure("timeout", str(exc), True)
    if isinstance(exc, openai.APIConnectionError):
        return _Failure("connection", str(exc.__cause__ or exc), True)
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        retryable = code in (408, 409, 429) or code >= 500
        return _Failure(f"http_{code}", _short(str(exc)), retryable)
    if isinstance(exc, (openai.APIResponseValidationError, ValueError, KeyError, TypeError, AttributeError)):
        return _Failure("bad_response", _short(f"{type(exc).__name__}: {exc}"), False)
    if isinstance(exc, openai.APIError):
        return _Failure("api_error", _short(str(exc)), False)
    raise exc


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _client(base_url: str, api_key: Optional[str], settings: RetrySettings, on_request) -> Any:
    """An openai client that retries by itself and reports every request it sends to `on_request`."""
    import openai

    from eval.judging.deadline import DeadlineTransport

    class Client(openai.OpenAI):
        # the client's backoff starts at 0.5 s; --backoff rescales it (a server's Retry-After is left as it is)
        def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):
            wait = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
            if 0 < (self._parse_retry_after_header(response_headers) or 0) == wait:
                return wait  # the server's Retry-After, as the client follows it
            return wait * settings.backoff / 0.5

    http = openai.DefaultHttpxClient(event_hooks={"request": [on_request]}, timeout=settings.timeout,
                                     transport=DeadlineTransport(settings.timeout, base_url))
    return Client(base_url=base_url, api_key=api_key or "EMPTY", max_retries=settings.max_attempts - 1,
                  timeout=settings.timeout, http_client=http)


class OpenAIJudge:
    """Chat completions against an OpenAI-compatible endpoint; the client retries, this class counts and records."""

    def __init__(self, spec: JudgeSpec, api_key: Optional[str], settings: RetrySettings) -> None:
        self.spec = spec
        self.settings = settings
        self._sent = threading.local()  # requests of the current call (each call runs in one thread)
        self._client = _client(spec.base_url or "", api_key, settings, self._count)

    def _count(self, request) -> None:
        self._sent.n = getattr(self._sent, "n", 0) + 1

    def complete(self, messages: list[dict[str, str]], temperature: float, max_tokens: int,
                 seed: Optional[int], extra_body: Optional[dict[str, Any]] = None) -> CallResult:
        self._sent.n = 0
        try:
            text = self._request(messages, temperature, max_tokens, seed, extra_body)
        except Exception as exc:  # noqa: BLE001 - classify() re-raises what it does not know
            failure = classify(exc)
            return CallResult(None, failure.reason, failure.detail, max(self._sent.n, 1), failure.retryable)
        if not text.strip():
            return CallResult(None, "empty_response", "the judge returned no text", self._sent.n, False)
        return CallResult(text, attempts=self._sent.n)

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


def constraint_body(output: str) -> dict[str, Any]:
    """vLLM's request extension that restricts the judge's text to a bare rating or verdict."""
    return {"structured_outputs": {"regex": RATING_REGEX if output == "rating" else VERDICT_REGEX}}


class EndpointBackend:
    """Runs judge calls against an endpoint with at most `concurrency` requests in flight."""

    def __init__(self, judge: OpenAIJudge, concurrency: int, constrained: bool) -> None:
        self.judge = judge
        self.concurrency = concurrency
        self.constrained = constrained

    def _one(self, request: CallRequest) -> CallResult:
        extra = constraint_body(request.output) if self.constrained else None
        return self.judge.complete(request.messages, request.temperature, request.max_tokens, request.seed,
                                   extra_body=extra)

    def run(self, requests: list[CallRequest], done: Callable[[int, CallResult], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
        futures, delivered = {}, set()
        try:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                done(futures[future], future.result())
                delivered.add(future)
        finally:
            # on Ctrl-C: drop queued calls, let in-flight ones end by their timeout, and hand over every call that
            # returned meanwhile (it was paid for)
            pool.shutdown(wait=True, cancel_futures=True)
            for future, i in futures.items():
                if future not in delivered and future.done() and not future.cancelled() \
                        and future.exception() is None:
                    done(i, future.result())
