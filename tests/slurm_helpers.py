"""Helpers for the Slurm tests: a real one-node cluster per test module, job waits that dump the Slurm logs, and
a tiny OpenAI-compatible judge that always answers with a valid rating.

The cluster needs root and Debian's slurmctld/slurmd/slurm-client/munge (`slurm/testing/install.sh`, run by
`make slurm-cluster`); without them the tests skip, and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import require

from slurm.chain import TERMINAL, JobState, job_state
from slurm.testing.cluster import ClusterError, LocalCluster, missing_programs

WAIT_S = 240.0
"""Default limit for one job to reach the state a test waits for."""


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster (SLURM_CONF set for this process while the module runs), stopped by pid after."""
    yield from running_cluster(nodes=1)


@pytest.fixture(scope="module")
def two_node_cluster():
    """A running two-node cluster, each node in its own network namespace (SLURM_CONF set while the module runs);
    stopped by pid after, and its namespaces and interfaces removed."""
    yield from running_cluster(nodes=2)


def require_cluster(nodes: int) -> None:
    """Skip (fail under CI=true) with the reason when this machine cannot run a cluster of `nodes` nodes."""
    missing = missing_programs(nodes)
    require("Slurm, munge and (for several nodes) iproute2/util-linux; run slurm/testing/install.sh as root",
            not missing, f"missing {' '.join(missing)}")
    require("root (slurmd runs the test jobs; nodes are network namespaces)", os.geteuid() == 0)


def running_cluster(nodes: int):
    """Generator behind the cluster fixtures: start, set SLURM_CONF, yield, stop, check nothing is left running."""
    require_cluster(nodes)
    root = Path(tempfile.mkdtemp(prefix="sspeft-slurm-"))
    cluster = LocalCluster(root, nodes=nodes)
    try:
        cluster.start()
    except ClusterError as exc:
        pytest.fail(f"the test cluster did not start: {exc}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        leftover = {d: p for d, p in cluster.running().items() if p}
        assert not leftover, f"daemons still running after stop: {leftover}"
        shutil.rmtree(root)  # config, state, logs and keys this fixture made (job outputs live in tmp_path)


def job_logs(*dirs: Path, tail_lines: int = 60) -> str:
    """The last lines of every Slurm job log under `dirs` (recursively), for failure messages."""
    parts = []
    for directory in dirs:
        for path in sorted(Path(directory).rglob("*.out")):
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
            parts.append(f"----- {path}\n" + "\n".join(lines))
    return "\n".join(parts)


def wait_for(cluster: LocalCluster, job_id: int, states: set[str] | frozenset[str] = TERMINAL,
             timeout_s: float = WAIT_S, logs: tuple[Path, ...] = ()) -> JobState:
    """Poll until the job is in one of `states`; on timeout fail with the daemon and job logs."""
    deadline = time.monotonic() + timeout_s
    st = job_state(job_id)
    while st.state not in states:
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} is {st.state} after {timeout_s:.0f} s, expected one of {sorted(states)}\n"
                        f"{job_logs(*logs)}\n{cluster.logs()}")
        time.sleep(0.5)
        st = job_state(job_id)
    return st


def wait_until(what: str, ready, cluster: LocalCluster, timeout_s: float = WAIT_S,
               logs: tuple[Path, ...] = ()) -> None:
    """Poll `ready()` until true; on timeout fail naming `what`, with the daemon and job logs."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{job_logs(*logs)}\n{cluster.logs()}")
        time.sleep(0.3)


def assert_completed(cluster: LocalCluster, jobs: dict[str, int], logs: tuple[Path, ...] = ()) -> None:
    states = {stage: job_state(j) for stage, j in jobs.items()}
    bad = {s: st for s, st in states.items() if st.state != "COMPLETED"}
    assert not bad, f"not every job completed: {bad}\n{job_logs(*logs)}\n{cluster.logs()}"


def sbatch(script: Path, *extra: str) -> int:
    proc = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"sbatch {script} failed: {proc.stderr}"
    return int(proc.stdout.strip().split(";")[0])


def submit(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m slurm.submit RECIPE ARGS...`, run in this process (torch is already imported here, which saves
    a child's start-up) with its stdout, stderr and exit status captured like a subprocess's."""
    import contextlib
    import io

    from slurm.submit import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(recipe), *args])
    return subprocess.CompletedProcess(["slurm.submit", str(recipe), *args], code, out.getvalue(), err.getvalue())


class RatingJudge:
    """OpenAI-compatible chat endpoint on a free port of `host` (loopback, or the bridge address of a multi-node test
    cluster, which its nodes reach); every completion is 'Rating: [[7]]'.

    Counts the requests it served. Stands in for a paid judge API (the only thing mocked in these tests).
    """

    def __init__(self, model: str = "test-judge", reply: str = "The answer is adequate. Rating: [[7]]",
                 host: str = "127.0.0.1") -> None:
        self.model, self.reply, self.requests, self.host = model, reply, 0, host
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _send(self, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send({"object": "list", "data": [{"id": judge.model, "object": "model", "created": 0,
                                                         "owned_by": "tests"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                with judge._lock:
                    judge.requests += 1
                self._send({
                    "id": f"cmpl-{judge.requests}", "object": "chat.completion", "created": int(time.time()),
                    "model": judge.model,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": judge.reply}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}/v1"

    @property
    def spec(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

    def __enter__(self) -> RatingJudge:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
