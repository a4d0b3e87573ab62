"""The server wrapper's waiting logic with real child processes (fast; the real `vllm serve` is in
test_eval_vllm.py): a server that dies shows its log, one that never answers is stopped after the timeout."""

import sys
import time
from pathlib import Path

import pytest

from eval.common import EvalError
from eval.judging.server import VllmServer
from eval_helpers import port_open


class _Scripted(VllmServer):
    """The same start/wait/stop code around a small Python program instead of vLLM."""

    def __init__(self, script: str, **kw) -> None:
        super().__init__("unused-model", "x", **kw)
        self.script = script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script]


def test_server_that_exits_reports_its_log(tmp_path):
    log = tmp_path / "serve.log"
    with pytest.raises(EvalError, match="exited with code 3") as err:
        with _Scripted("print('engine init failed: no such architecture'); raise SystemExit(3)", log_path=log,
                       startup_timeout=30):
            pass
    assert "engine init failed: no such architecture" in str(err.value) and str(log) in str(err.value)


def test_server_that_never_answers_is_stopped(tmp_path):
    server = _Scripted("import time; print('loading...', flush=True); time.sleep(120)",
                       log_path=tmp_path / "serve.log", startup_timeout=2)
    started = time.monotonic()
    with pytest.raises(EvalError, match="did not answer .* within 2 s") as err:
        with server:
            pass
    assert "loading..." in str(err.value)
    assert time.monotonic() - started < 30
    assert server.process is not None and server.process.poll() is not None  # stopped, not left running


def test_vllm_command_line(tmp_path):
    server = VllmServer(tmp_path / "m", "judge", tmp_path / "log", dtype="fp32", max_model_len=1024)
    cmd = server.command()
    assert cmd[cmd.index("--model") + 1] == str(tmp_path / "m")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == str(server.port)
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--max-model-len") + 1] == "1024"


# ---------------------------------------------------------------- a server we start stops when we do
_DRIVER = r"""
import sys, time
from pathlib import Path
from eval.common import terminate_on_signals
from eval.judging.server import VllmServer

class Static(VllmServer):
    # a real HTTP server answering /v1/models, in place of vLLM
    def command(self):
        return [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                "--directory", sys.argv[1]]

try:
    with terminate_on_signals():
        with Static("unused", "x", log_path=Path(sys.argv[1]) / "serve.log", startup_timeout=60) as server:
            print(server.process.pid, server.port, flush=True)
            time.sleep(300)
except KeyboardInterrupt as e:
    sys.exit(getattr(e, "exit_status", 130))
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _listener_group(port: int):
    """The process group of whatever listens on 127.0.0.1:port, or None."""
    import os

    import psutil

    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            try:
                return os.getpgid(conn.pid)
            except ProcessLookupError:
                return None
    return None


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT", "SIGKILL"])
def test_server_stops_when_its_starter_is_signalled(tmp_path, sig):
    """SIGTERM/SIGHUP/SIGINT unwind the starter (the server's group is stopped); SIGKILL runs no code of ours and
    the kernel's parent-death signal stops the server."""
    import os
    import signal
    import subprocess

    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text('{"data": []}')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = driver.stdout.readline()
        assert line, driver.stderr.read()
        pid, port = map(int, line.split())
        assert _alive(pid) and port_open(port)
        driver.send_signal(getattr(signal, sig))
        rc = driver.wait(timeout=30)
        assert rc == {"SIGTERM": 143, "SIGHUP": 129, "SIGINT": 130, "SIGKILL": -9}[sig]
        assert _wait(lambda: not _alive(pid), 30), f"server {pid} still running after {sig} to its starter"
        # the port itself may be taken at once by another process's ephemeral bind: check that nothing of the
        # server's session (its process group) still listens on it
        assert _wait(lambda: _listener_group(port) != pid, 30), f"the server's group still listens on {port}"
    finally:
        if driver.poll() is None:
            driver.kill()


@pytest.mark.slow
def test_sigterm_to_serve_judge_stops_vllm(tmp_path):
    """`timeout`/`kill`/`scancel` send SIGTERM: eval.judge exits 143 and no process of the vLLM server it started is
    left, its port closed."""
    import os
    import signal
    import subprocess

    import psutil

    from conftest import require_module
    from eval_helpers import make_questions, make_run, make_tiny_llama

    require_module("vllm")
    model = make_tiny_llama(tmp_path / "judge-model")
    root = make_run(tmp_path / "run", questions=make_questions(n_per_category=10, categories=("writing", "stem")))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    judge = subprocess.Popen([sys.executable, "-m", "eval.judge", str(root), "--judge", f"serve:{model}",
                              "--questions", str(root / "questions.jsonl"), "--dtype", "fp32",
                              "--serve-timeout", "400", "--concurrency", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = root / "logs" / "vllm_serve_judge-model.log"
    seen: dict[int, psutil.Process] = {}
    port = None
    try:
        def serving() -> bool:
            nonlocal port
            for p in psutil.Process(judge.pid).children(recursive=True):
                seen.setdefault(p.pid, p)
                try:
                    cmd = p.cmdline()
                except (psutil.ZombieProcess, psutil.NoSuchProcess):
                    continue  # a helper process that already exited (vLLM starts and reaps short-lived ones)
                if "--port" in cmd:
                    port = int(cmd[cmd.index("--port") + 1])
            return judge.poll() is not None or (port is not None and port_open(port))

        assert _wait(serving, 400) and judge.poll() is None, \
            f"judge exited early ({judge.poll()}):\n{log.read_text()[-3000:] if log.exists() else 'no log'}"
        serving()  # the engine processes vLLM has started by now
        judge.send_signal(signal.SIGTERM)
        out, _ = judge.communicate(timeout=120)
        assert judge.returncode == 143, out[-3000:]
        assert "stopped by SIGTERM" in out
        assert _wait(lambda: not any(_alive(pid) for pid in seen), 60), \
            [p.cmdline() for pid, p in seen.items() if _alive(pid)]
        assert len(seen) >= 1 and not port_open(port)
    finally:
        if judge.poll() is None:
            judge.kill()
        for p in seen.values():
            if _alive(p.pid):
                p.kill()
