"""A loopback HTTP server that answers chat completions one byte at a time (a stalled or hostile judge endpoint).

    with DripServer(mode="body", interval=0.2, max_seconds=20) as server:
        ... server.base_url ...              # http://127.0.0.1:PORT/v1, a free port
        server.connections                   # chat requests accepted so far

mode "body": the status line and headers at once, then the body one byte per `interval`; mode "headers": even the
status line one byte per `interval`. GET .../models answers at once (the judge's probe passes). Each connection
drips for at most `max_seconds` and stops when the client goes away, so a test can never hang on it.
"""

from __future__ import annotations

import json
import socket
import threading
import time


class DripServer:
    def __init__(self, mode: str = "body", interval: float = 0.2, max_seconds: float = 20.0,
                 model: str = "drip-judge") -> None:
        assert mode in ("body", "headers")
        self.mode, self.interval, self.max_seconds, self.model = mode, interval, max_seconds, model
        self.connections = 0
        self.dripped_for: list[float] = []
        """Seconds each chat connection was kept dripping before the client left (or the bound was reached)."""
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def __enter__(self) -> DripServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            head = _read_request(conn)
            if head is None:
                return
            if head.startswith(b"GET") and b"/models" in head.split(b"\r\n", 1)[0]:
                body = json.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                return
            self.connections += 1
            headers = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
                       b"Connection: close\r\n\r\n")
            if self.mode == "body":
                conn.sendall(headers)
                drip = b" " * 100000
            else:
                drip = headers
            started = time.monotonic()
            try:
                for i in range(len(drip)):
                    if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                        break
                    conn.sendall(drip[i:i + 1])
                    time.sleep(self.interval)
            except OSError:
                pass  # the client closed the connection
            self.dripped_for.append(time.monotonic() - started)


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
    except OSError:
        return None
    return head
