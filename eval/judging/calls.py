"""One judge call as every judge sees it: the request, its result, and the Backend that runs a list of them.

The judging engine (eval.judging.engine) makes the requests and stores the results; a Backend answers them: an
OpenAI-compatible endpoint (eval.judging.api_client.EndpointBackend, also for a `vllm serve` judge) or a model in
this process (eval.judging.local.LocalBackend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Protocol


@dataclass(frozen=True)
class CallRequest:
    """One request to the judge."""

    messages: list[dict[str, str]]
    temperature: float
    max_tokens: int
    seed: int
    output: str
    """'rating' or 'verdict': what the judge must produce (constrained judges use it)."""


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


class Backend(Protocol):
    """Runs judge calls; `done(index, result)` is called once per request as results arrive."""

    def run(self, requests: list[CallRequest], done: Callable[[int, CallResult], None]) -> None: ...
