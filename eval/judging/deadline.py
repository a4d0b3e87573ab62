"""An httpx transport whose timeout bounds a whole HTTP request, not each read.

    transport = DeadlineTransport(seconds=120, base_url="https://api.openai.com/v1")
    client = openai.OpenAI(..., http_client=openai.DefaultHttpxClient(transport=transport))

httpx's timeouts apply per operation: a read times out only when no byte arrives for that long, so a server that
sends one byte a second keeps a request alive for ever. Here each request gets a deadline `seconds` after it starts;
when the deadline passes, a timer shuts the request's socket down, which ends any blocked connect, write or read at
once, and the request fails as `httpx.ReadTimeout` (the openai client counts it as a timeout and retries it as
configured). A call of `max_attempts` attempts thus ends within max_attempts x seconds plus the backoff waits.

The socket is the one the connection pool opens for the request (httpcore's `trace` extension reports it), so
connections are not kept alive between requests: a pooled connection would reach a request without being reported.
Because a transport given to httpx disables its proxy settings from the environment, the proxy for the base URL is
taken from the environment here (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, as urllib reads them).
"""

from __future__ import annotations

import importlib
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, Optional

import openai

# the HTTP library the openai client is built on: httpx, or from openai 3 its fork httpx2 (the same API); a transport
# must be of that library's classes
httpx = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.partition(".")[0])


class _Guard:
    """The deadline of one request: a timer that shuts down the request's socket(s) when it fires."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._streams: list[Any] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def watch(self, stream: Any) -> None:
        """A network stream the request opened (shut at once if the deadline has already passed)."""
        with self._lock:
            self._streams.append(stream)
            if self.fired:
                _shut(stream)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for stream in self._streams:
                _shut(stream)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(stream: Any) -> None:
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by its owner


class _BoundedStream(httpx.SyncByteStream):
    """A response body read under the request's deadline; the deadline ends when the body is closed."""

    def __init__(self, inner: httpx.SyncByteStream, guard: _Guard, request: httpx.Request) -> None:
        self.inner, self.guard, self.request = inner, guard, request

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.inner
        except httpx.TransportError as e:
            raise _timeout_instead(e, self.guard, self.request) from e

    def close(self) -> None:
        self.guard.cancel()
        self.inner.close()


def _timeout_instead(error: httpx.TransportError, guard: _Guard, request: httpx.Request) -> httpx.TransportError:
    if guard.fired:
        return httpx.ReadTimeout(f"the request took longer than {guard.seconds:g} s in all (--request-timeout)",
                                 request=request)
    return error


class DeadlineTransport(httpx.BaseTransport):
    """Sends each request through an httpx.HTTPTransport within `seconds` from start to the end of its body."""

    def __init__(self, seconds: float, base_url: str) -> None:
        if not seconds > 0:
            raise ValueError(f"seconds is {seconds}; expected a positive number")
        self.seconds = seconds
        self.inner = httpx.HTTPTransport(limits=httpx.Limits(max_keepalive_connections=0),
                                         proxy=environment_proxy(base_url))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        guard = _Guard(self.seconds)
        outer_trace = request.extensions.get("trace")

        def trace(name: str, info: dict[str, Any]) -> None:
            if name.endswith(("connect_tcp.complete", "connect_unix_socket.complete")):
                guard.watch(info.get("return_value"))
            if outer_trace is not None:
                outer_trace(name, info)

        request.extensions = {**request.extensions, "trace": trace}
        guard.start()
        try:
            response = self.inner.handle_request(request)
        except httpx.TransportError as e:
            guard.cancel()
            raise _timeout_instead(e, guard, request) from e
        except BaseException:
            guard.cancel()
            raise
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_BoundedStream(response.stream, guard, request), extensions=response.extensions)

    def close(self) -> None:
        self.inner.close()


def environment_proxy(url: str) -> Optional[str]:
    """The proxy the environment sets for `url` (None: direct, also for hosts NO_PROXY lists)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")
