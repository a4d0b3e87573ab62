"""The server wrapper's waiting logic with real child processes (fast; the real `vllm serve` is in
test_eval_vllm.py): a server that dies shows its log, one that never answers is stopped after the timeout."""

import sys
import time

import pytest

from eval.common import EvalError
from eval.server_utils import VllmServer


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
