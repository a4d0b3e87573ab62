"""Two real Slurm nodes on one machine: each node a network namespace of its own on a private link, its own slurmd,
one slurmctld and munged (slurm/testing/cluster.py --nodes 2). The real training stage through `python -m
slurm.submit --nodes 2` (one CPU rank per node, gloo, DeepSpeed ZeRO-3, a tiny LLaMA with an SSH adapter):

- the link: nodes answer with their own names and addresses, the namespaces have no route off the link, and a
  start that fails dumps every daemon's log and leaves the host's networking exactly as it was;
- both nodes join one rendezvous (their hostnames in the rank status files and the job log), and the adapter equals
  a one-node run with the same world size and data order (tolerance TOLERANCE, measured), positions identical on
  every rank;
- the same across nodes on a real bitsandbytes NF4 base without DeepSpeed (torchrun ranks, DDP over gloo): both
  nodes joined, every rank ends with the same weights, and the adapter equals the one-node run (NF4_TOLERANCE);
  a one-step run on the dense base sees another first loss on the same tokens, so the ranks did train on 4 bits;
- preemption across nodes: USR1 to the batch script → both nodes' ranks checkpoint the same step, exit 75, the job
  requeues and resumes, and the adapter is bit-identical to the uninterrupted two-node run; the rest of the chain
  (merge → generate → judge against a local OpenAI-compatible judge on the link → report) runs as dependent jobs;
- a node's ranks killed mid-run (ZeRO-2) end the job promptly with a message naming that node, and the last
  complete checkpoint resumes;
- the `deepspeed` launcher with a hostfile of launch/hostfile.example's form, run on node1, reaches both nodes
  over ssh (pdsh; an sshd per node namespace, keys made here) and trains the same adapter as the srun run.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import REPO, build_tiny_llama, child_env, write_records, write_recipe
from safetensors.torch import load_file
from slurm_helpers import (RatingJudge, assert_completed, job_logs, require_cluster, submit,  # noqa: F401
                           two_node_cluster, wait_for, wait_until)

from launch.process import free_port
from launch.rundir import RunDir
from slurm.chain import job_state
from slurm.testing.cluster import ClusterError, LocalCluster
from slurm.testing.netns import host_network
from slurm.testing.sshd import NodeSshd, SshdError

pytestmark = pytest.mark.slow

STEPS = 30
"""Long enough (a few s) that a signal or a kill sent after the first checkpoint lands mid-run."""
TOLERANCE = 0.0
"""Largest |Δ| allowed between the two-node and the one-node adapter (same world size, same data order, same threads
per rank). Both reduce the two ranks' fp32 gradients with gloo, so they agree exactly (measured: 0.0). With different
threads per rank they do not: torchrun sets OMP_NUM_THREADS=1 only where a node runs several ranks, and a lone rank
per node then computes with every core (measured: max |Δ| 2.0e-8 on this adapter) — hence THREADS below."""
THREADS = "1"
"""OMP_NUM_THREADS exported to every job of this module, so a node with one rank computes as a node with two."""
LATER_STAGES = ("merge", "generate", "judge", "report")
NF4_STEPS = 6
"""Steps of the NF4-base runs: enough for the adapter to move on every rank, few enough to keep the test short."""
NF4_TOLERANCE = 0.0
"""Largest |Δ| allowed between the two-node and the one-node adapter on the NF4 base (DDP averages the two ranks'
fp32 adapter gradients with gloo in both runs, with the same threads per rank; measured: 0.0)."""


@pytest.fixture(scope="module")
def tiny(two_node_cluster, tmp_path_factory):
    """(root with a tiny LLaMA and records, a rating judge listening on the link's controller address)."""
    root = tmp_path_factory.mktemp("two-nodes")
    build_tiny_llama(root / "model")
    write_records(root / "data.json")
    with pytest.MonkeyPatch.context() as env, RatingJudge(host=two_node_cluster.link.controller_addr) as judge:
        # sbatch exports this process's environment to the jobs
        env.setenv("OMP_NUM_THREADS", THREADS)
        # the judge is off loopback (on the link), so the judge stage asks for a key; this server ignores it
        env.setenv("OPENAI_API_KEY", "sk-test-two-nodes")
        yield root, judge


def make_recipe(root: Path, judge: RatingJudge, name: str, zero: str | None = "zero3", quantize: str = "none",
                steps: int = STEPS) -> tuple[Path, RunDir]:
    """A tiny SSH recipe in root/NAME.yaml: under DeepSpeed ZeRO-`zero` (None: plain DDP), on a base loaded as
    `quantize` ("nf4": bitsandbytes 4-bit, fp32 compute)."""
    run = RunDir(root / name)
    deepspeed = {"deepspeed": str(REPO / f"launch/ds_{zero}.json")} if zero else {}
    recipe = write_recipe(
        root / f"{name}.yaml", root / "model", root / "data.json", run.root, quantize=quantize,
        train={"max_steps": steps, "save_steps": 2, "save_total_limit": None, **deepspeed},
        eval={"judge": judge.spec, "backend": "hf", "max_new_tokens": 8, "judge_max_new_tokens": 16, "limit": 2,
              "max_failure_rate": 0.0},
    )
    return recipe, run


def submit_chain(recipe: Path, nodes: int, procs: int, only_train: bool = False) -> dict[str, int]:
    proc = submit(recipe, "--nodes", str(nodes), "--gpus-per-node", "0", "--procs-per-node", str(procs))
    assert proc.returncode == 0, f"submit failed:\n{proc.stdout}\n{proc.stderr}"
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])
    if only_train:  # the later stages are exercised once, on the preempted run
        subprocess.run(["scancel", *(str(jobs[s]) for s in LATER_STAGES)], check=True, timeout=30)
    return jobs


def train_and_wait(cluster: LocalCluster, recipe: Path, run: RunDir, nodes: int, procs: int) -> int:
    jobs = submit_chain(recipe, nodes, procs, only_train=True)
    st = wait_for(cluster, jobs["train"], timeout_s=400, logs=(run.slurm,))
    assert st.state == "COMPLETED", f"{st}\n{job_logs(run.slurm)}"
    return jobs["train"]


def rank_nodes(run: RunDir, job: int, attempt: int = 0) -> dict[str, str]:
    """rank → the hostname its status file records, for one attempt of a training job."""
    status = run.slurm / "status" / f"train-{job}-{attempt}"
    return {p.name.split(".")[0]: p.read_text().strip() for p in sorted(status.glob("rank-*.node"))}


def rank_exits(run: RunDir, job: int, attempt: int) -> list[str]:
    status = run.slurm / "status" / f"train-{job}-{attempt}"
    return [p.read_text().strip() for p in sorted(status.glob("rank-*.exit"))]


def adapter(run: RunDir) -> dict[str, torch.Tensor]:
    return load_file(str(run.adapter / "adapter_model.safetensors"))


def summary(run: RunDir) -> dict:
    return json.loads((run.logs / "train_summary.json").read_text())


def assert_nodes_joined(two: RunDir, two_job: int, one: RunDir, one_job: int) -> None:
    """Both nodes joined the two-node job's rendezvous (one rank on each, named in the status files and in the job
    log); the one-node job's ranks all ran on one node."""
    assert rank_nodes(two, two_job) == {"rank-0": "node1", "rank-1": "node2"} or \
        rank_nodes(two, two_job) == {"rank-0": "node2", "rank-1": "node1"}, job_logs(two.slurm)
    log = (two.slurm / "logs" / f"train-{two_job}.out").read_text(errors="replace")
    assert "sspeft: node node1 (index 0 of 2)" in log and "sspeft: node node2 (index 1 of 2)" in log
    assert set(rank_nodes(one, one_job).values()) == {"node1"} or set(rank_nodes(one, one_job).values()) == {"node2"}


def adapter_difference(two: RunDir, one: RunDir, steps: int) -> float:
    """Largest |Δ| between two finished runs' adapters, after checking both ran 2 ranks for `steps` steps, every
    rank of `two` holds the same positions, as `one` does, and the adapter moved."""
    two_summary, one_summary = summary(two), summary(one)
    assert two_summary["world_size"] == one_summary["world_size"] == 2
    assert two_summary["global_step"] == one_summary["global_step"] == steps
    assert len(set(two_summary["positions_digests"])) == 1  # every rank holds the same positions
    assert two_summary["positions_digests"] == one_summary["positions_digests"]
    a, b = adapter(two), adapter(one)
    assert a.keys() == b.keys() and any("positions" in k for k in a)
    moved = max(a[k].abs().max().item() for k in a if "positions" not in k)
    assert moved > 0, "the adapter did not train"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def two_node_reference(root: Path) -> RunDir:
    """The uninterrupted srun two-node run that test_two_node_training_equals_one_node made."""
    reference = RunDir(root / "two-nodes")
    if not (reference.adapter / "adapter_model.safetensors").is_file():
        pytest.fail("the uninterrupted two-node run (test_two_node_training_equals_one_node) did not finish")
    return reference


def newest_checkpoint(run: RunDir) -> int:
    complete = run.complete_checkpoints()
    return int(complete[-1].name.rsplit("-", 1)[1]) if complete else 0


def test_cluster_start_failure_leaves_host_network_unchanged(monkeypatch):
    require_cluster(2)
    before = host_network()
    root = Path(tempfile.mkdtemp(prefix="sspeft-slurm-fail-"))
    cluster = LocalCluster(root, nodes=2)
    # Every daemon starts, but the nodes never count as idle: the start gives up, stops and removes everything.
    monkeypatch.setattr(LocalCluster, "node_idle", lambda self: False)
    with pytest.raises(ClusterError) as failure:
        cluster.start(timeout_s=5)
    message = str(failure.value)
    shutil.rmtree(root)
    for log in ("munged.log", "slurmctld.log", "slurmd-node1.log", "slurmd-node2.log"):
        assert log in message, f"{log} missing from the start failure's message:\n{message}"
    assert "to become idle" in message
    assert cluster.running() == {"slurmd node1": None, "slurmd node2": None, "slurmctld": None, "munged": None}
    assert not (root / "net.json").exists()
    assert host_network() == before


def test_nodes_are_namespaces_on_a_private_link(two_node_cluster):
    link = two_node_cluster.link
    proc = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--label", "bash", "-c",
                           "echo $(hostname) $SLURMD_NODENAME $(hostname -i)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{proc.stderr}\n{two_node_cluster.logs()}"
    lines = sorted(line.split(": ", 1)[1].split() for line in proc.stdout.splitlines())
    assert lines == [["node1", "node1", link.address("node1")], ["node2", "node2", link.address("node2")]]
    for node in ("node1", "node2"):
        routes = subprocess.run(["ip", "-n", link.namespace(node), "route", "show"], capture_output=True,
                                text=True, timeout=30, check=True).stdout
        assert "default" not in routes and routes.strip(), routes  # nothing leaves the link
        assert all(line.startswith(link.subnet) for line in routes.strip().splitlines()), routes


def test_two_node_training_equals_one_node(two_node_cluster, tiny, record_property):
    root, judge = tiny
    two_recipe, two = make_recipe(root, judge, "two-nodes")
    one_recipe, one = make_recipe(root, judge, "one-node")
    started = time.monotonic()
    two_job = train_and_wait(two_node_cluster, two_recipe, two, nodes=2, procs=1)
    two_wall = time.monotonic() - started
    started = time.monotonic()
    one_job = train_and_wait(two_node_cluster, one_recipe, one, nodes=1, procs=2)
    one_wall = time.monotonic() - started
    record_property("two_node_job_wall_s", round(two_wall, 1))
    record_property("one_node_job_wall_s", round(one_wall, 1))

    assert_nodes_joined(two, two_job, one, one_job)
    worst = adapter_difference(two, one, STEPS)
    record_property("two_vs_one_node_max_abs_diff", worst)
    assert worst <= TOLERANCE, f"two-node adapter differs from the one-node run by {worst}"


def test_two_node_training_on_an_nf4_base_equals_one_node(two_node_cluster, tiny, record_property):
    root, judge = tiny
    two_recipe, two = make_recipe(root, judge, "nf4-two-nodes", zero=None, quantize="nf4", steps=NF4_STEPS)
    one_recipe, one = make_recipe(root, judge, "nf4-one-node", zero=None, quantize="nf4", steps=NF4_STEPS)
    started = time.monotonic()
    two_job = train_and_wait(two_node_cluster, two_recipe, two, nodes=2, procs=1)
    record_property("nf4_two_node_job_wall_s", round(time.monotonic() - started, 1))
    one_job = train_and_wait(two_node_cluster, one_recipe, one, nodes=1, procs=2)

    assert_nodes_joined(two, two_job, one, one_job)
    worst = adapter_difference(two, one, NF4_STEPS)
    record_property("nf4_two_vs_one_node_max_abs_diff", worst)
    assert worst <= NF4_TOLERANCE, f"two-node NF4 adapter differs from the one-node run by {worst}"
    for run in (two, one):  # no DeepSpeed: DDP kept the ranks' adapters equal
        ran = summary(run)
        assert ran["zero_stage"] is None and len(set(ran["weights_digests"])) == 1, ran["weights_digests"]

    # the same first step on the dense base: same tokens, another loss (the NF4 load took effect in the job)
    dense_recipe, dense = make_recipe(root, judge, "dense-one-step", zero=None, steps=1)
    train_and_wait(two_node_cluster, dense_recipe, dense, nodes=1, procs=2)
    nf4_first, dense_first = summary(two)["log"][0], summary(dense)["log"][0]
    assert nf4_first["step"] == dense_first["step"] == 1
    assert nf4_first["num_tokens"] == dense_first["num_tokens"], (nf4_first, dense_first)
    record_property("nf4_vs_dense_first_loss", [nf4_first["loss"], dense_first["loss"]])
    # deterministic on both bases (measured: 5.69923 on NF4, 5.69987 dense); 1e-4 is far above float noise
    assert abs(nf4_first["loss"] - dense_first["loss"]) > 1e-4, (nf4_first, dense_first)


def test_preemption_across_nodes_resumes_bit_identical_and_chain_completes(two_node_cluster, tiny):
    root, judge = tiny
    reference = two_node_reference(root)
    recipe, run = make_recipe(root, judge, "preempted")
    jobs = submit_chain(recipe, nodes=2, procs=1)
    train, logs = jobs["train"], (run.slurm,)

    wait_until("a first complete checkpoint", lambda: newest_checkpoint(run) >= 2, two_node_cluster,
               timeout_s=400, logs=logs)
    subprocess.run(["scancel", "-b", "-s", "USR1", str(train)], check=True, timeout=30)
    wait_until("the training job to be requeued", lambda: job_state(train).restarts >= 1, two_node_cluster,
               logs=logs)
    stopped = newest_checkpoint(run)
    assert 2 <= stopped < STEPS, f"training was not stopped mid-run (newest checkpoint {stopped})"
    # both nodes' ranks ended the first attempt with the preemption status, and both saved that same step
    assert sorted(rank_nodes(run, train, 0).values()) == ["node1", "node2"]
    assert rank_exits(run, train, 0) == ["75", "75"], job_logs(*logs)
    ds_step = run.checkpoints / f"checkpoint-{stopped}" / f"global_step{stopped}"
    partitions = sorted(p.name for p in ds_step.glob("*optim_states.pt"))
    assert len(partitions) == 2, f"expected one ZeRO-3 partition per rank in {ds_step}: {partitions}"

    report = wait_for(two_node_cluster, jobs["report"], timeout_s=600, logs=logs)
    assert report.state == "COMPLETED", f"{report}\n{job_logs(*logs)}"
    assert_completed(two_node_cluster, jobs, logs=logs)
    assert job_state(train).restarts == 1
    assert sorted(rank_nodes(run, train, 1).values()) == ["node1", "node2"]
    log = (run.slurm / "logs" / f"train-{train}.out").read_text(errors="replace")
    assert "got SIGUSR1, forwarding it to the ranks" in log and f"requeueing job {train}" in log
    assert log.count("resuming from") == 1, job_logs(*logs)

    resumed, uninterrupted = adapter(run), adapter(reference)
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not differ, f"the resumed adapter is not bit-identical to the uninterrupted run: {differ}"
    assert summary(run)["global_step"] == STEPS and len(summary(run)["attempts"]) == 2

    chain = json.loads((run.slurm / "chain_status.json").read_text())
    assert chain["ok"] is True and chain["stages"]["train"]["restarts"] == 1
    scores = json.loads(run.report_json.read_text())
    assert scores["failures"]["total"] == 0 and scores["overall"]["all"]["mean"] == 7.0
    assert judge.requests > 0


def test_a_dead_node_ends_the_job_naming_it_and_the_checkpoint_resumes(two_node_cluster, tiny):
    root, judge = tiny
    recipe, run = make_recipe(root, judge, "dead-node", zero="zero2")  # ZeRO-2 across nodes, and its resume
    jobs = submit_chain(recipe, nodes=2, procs=1, only_train=True)
    train, logs = jobs["train"], (run.slurm,)
    wait_until("a first complete checkpoint", lambda: newest_checkpoint(run) >= 2, two_node_cluster,
               timeout_s=400, logs=logs)
    # node2 dies: everything of the job inside its namespace is killed at once (its slurmd stays, as after a crash
    # of the node's processes; killing slurmd alone leaves the running step alone until the node times out).
    victims = _job_pids("node2", two_node_cluster)
    assert victims, "no process of the training found on node2"
    killed = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    st = wait_for(two_node_cluster, train, timeout_s=120, logs=logs)
    ended_after = time.monotonic() - killed
    assert st.state == "FAILED", f"{st}\n{job_logs(*logs)}"
    assert ended_after < 120
    log = (run.slurm / "logs" / f"train-{train}.out").read_text(errors="replace")
    assert "srun: error: node2: task 1:" in log, job_logs(*logs)
    dead_rank = next(rank for rank, node in rank_nodes(run, train).items() if node == "node2")
    assert f"sspeft: {dead_rank} on node node2 left no exit status" in log, job_logs(*logs)
    saved = newest_checkpoint(run)
    assert saved >= 2

    # the last complete checkpoint is usable: a resubmission (one node, same world size) resumes from it
    again = submit_chain(recipe, nodes=1, procs=2, only_train=True)
    assert wait_for(two_node_cluster, again["train"], timeout_s=400, logs=logs).state == "COMPLETED", \
        job_logs(*logs)
    resumed_log = (run.slurm / "logs" / f"train-{again['train']}.out").read_text(errors="replace")
    assert f"checkpoint-{saved}" in resumed_log.split("resuming from", 1)[1].splitlines()[0], resumed_log[-3000:]
    assert summary(run)["global_step"] == STEPS


def _job_pids(node: str, cluster: LocalCluster) -> set[int]:
    """Pids of the training's processes (torchrun and its ranks) inside `node`'s namespace."""
    namespace = cluster.link.namespace(node)
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30,
                          check=True).stdout.split()
    found = set()
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "torch.distributed.run" in cmdline or "launch.train" in cmdline:
            found.add(int(pid))
    return found


RANK_ENV = ("DS_ACCELERATOR", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
            "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")
"""Variables the ranks need that ssh does not carry (the deepspeed launcher exports them from DS_ENV_FILE)."""


def test_deepspeed_launcher_with_a_hostfile_across_nodes(two_node_cluster, tiny):
    root, judge = tiny
    reference = two_node_reference(root)
    recipe, run = make_recipe(root, judge, "deepspeed-hostfile")
    link = two_node_cluster.link
    hostfile = root / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")  # launch/hostfile.example's form, one CPU rank a node
    env_file = root / "deepspeed_env"
    ranks_env = {**dict.fromkeys(RANK_ENV, ""), **os.environ, "DS_ACCELERATOR": "cpu"}
    env_file.write_text("".join(f"{k}={ranks_env[k]}\n" for k in RANK_ENV if ranks_env[k]))
    deepspeed = Path(sys.executable).with_name("deepspeed")
    sshd = NodeSshd(two_node_cluster.root, link)
    try:
        sshd.start()
    except SshdError as exc:
        pytest.fail(f"the nodes' sshd did not start: {exc}")
    try:
        # Run where a user would: on the first host. The ssh check of the launcher uses ~/.ssh, which the test
        # does not touch; pdsh gets this cluster's key and known_hosts through PDSH_SSH_ARGS_APPEND instead.
        # The launcher runs under this interpreter (not its script's shebang), so the nodes run the same path and
        # reuse DeepSpeed's JIT-built op instead of rebuilding it for another path.
        argv = link.command_in("node1", [sys.executable, str(deepspeed), "--hostfile", str(hostfile),
                                         "--master_addr", "node1", "--master_port", str(free_port()),
                                         "--no_ssh_check", "--module", "launch.train", str(recipe)])
        env = child_env(**sshd.client_env(), DS_ENV_FILE=str(env_file))
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the deepspeed launcher ran past {exc.timeout} s:\n{(exc.stdout or b'')[-6000:]!r}\n"
                    f"{(exc.stderr or b'')[-3000:]!r}\n{sshd.logs()}")
    finally:
        sshd.stop()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"deepspeed launcher failed ({proc.returncode}):\n{output[-6000:]}\n{sshd.logs()}"
    # pdsh prefixes each host's lines with its name: both nodes ran a rank
    assert any(line.startswith("node1: ") for line in output.splitlines()), output[-3000:]
    assert any(line.startswith("node2: ") for line in output.splitlines()), output[-3000:]
    assert summary(run)["world_size"] == 2 and summary(run)["global_step"] == STEPS
    assert summary(run)["positions_digests"] == summary(reference)["positions_digests"]
    a, b = adapter(run), adapter(reference)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"the deepspeed-launcher adapter differs from the srun two-node run: {differ}"
