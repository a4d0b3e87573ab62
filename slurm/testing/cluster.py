"""A Slurm cluster in a directory, started by hand (no systemd): munged, slurmctld and one slurmd per node.

    python -m slurm.testing.cluster start DIR [--nodes N]   # prints `export SLURM_CONF=DIR/slurm.conf`
    python -m slurm.testing.cluster stop DIR

One node (the default) is this machine under its own hostname, reached on 127.0.0.1. With `--nodes N` (N ≥ 2) each
node `node1` … `nodeN` is a network namespace of its own on a private link made for the cluster
(`slurm/testing/netns.py`): its slurmd runs there as `slurmd -N nodeK`, with its own address, hostname and
`/etc/hosts`; slurmctld and munged stay in the host's namespace on the link's bridge address. `stop` removes the
namespaces and interfaces it made (recorded in DIR/net.json) after stopping the daemons.

The tests use it through `tests/slurm_helpers.py`. Needs root and Debian's `slurmctld slurmd slurm-client munge`
(`slurm/testing/install.sh`). Everything lives under DIR (config, munge key and socket, state, spool, logs, pid
files); daemons are stopped by the pids in their pid files, never by name. The configuration is tuned for tests:
a requeued job becomes eligible again after `cred_expire` + 1 s (Slurm's default is 121 s) and finished jobs stay
visible to `scontrol show job` for an hour (no accounting database here).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.process import free_port
from launch.rundir import atomic_write_text
from slurm.testing.netns import LinkError, PrivateLink
from slurm.testing.pids import alive, read_pid, terminate

DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order; start order is the reverse
NET_PROGRAMS = ("ip", "nsenter", "unshare", "mount", "hostname")
"""What a multi-node cluster needs besides Slurm and munge (iproute2, util-linux, mount, hostname)."""


class ClusterError(RuntimeError):
    """A daemon did not start or the cluster did not become usable; the message carries the daemon logs."""


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _sbin(name: str) -> str:
    for directory in ("/usr/sbin", "/usr/bin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ClusterError(f"{name} is not installed; run slurm/testing/install.sh as root")


def missing_programs(nodes: int = 1) -> list[str]:
    """Programs a local cluster of `nodes` nodes needs that this machine lacks."""
    missing = []
    names = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun", "scancel")
    for name in names + (NET_PROGRAMS if nodes > 1 else ()):
        try:
            _sbin(name)
        except ClusterError:
            missing.append(name)
    return missing


@dataclass
class LocalCluster:
    """Cluster rooted at `root`; `cpus`/`memory_mb` are what each node advertises to the scheduler."""

    root: Path
    """Directory holding config, state, logs and pid files."""
    nodes: int = 1
    """1: this machine on 127.0.0.1; N ≥ 2: nodes node1 … nodeN, each in its own network namespace."""
    cpus: int = 8
    """CPUs each node advertises (more than the machine has is fine: tests oversubscribe a little)."""
    memory_mb: int = 16000
    """Memory the node advertises, in MiB."""
    cred_expire_s: int = 5
    """Credential lifetime; a requeued job waits this + 1 s before it may start again."""
    partition: str = "debug"
    """The only partition, the default one."""
    node: str = field(default_factory=short_hostname)
    """Name of the one node (nodes=1); slurmd recognises itself by the short hostname."""
    link: PrivateLink | None = field(default=None, init=False)
    """The private link of a multi-node cluster, once made (or found in DIR/net.json)."""

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes}: a cluster needs at least 1 node")
        self.link = PrivateLink.load(self.root)

    @property
    def node_names(self) -> list[str]:
        return [self.node] if self.nodes == 1 else [f"node{i + 1}" for i in range(self.nodes)]

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def pid_file(self, daemon: str) -> Path:
        """`slurmd-%n` (Slurm substitutes the node name) stands for one file per node."""
        return self.root / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    def daemon_pid_files(self) -> dict[str, Path]:
        """label → pid file of every daemon, in stop order (the slurmds, slurmctld, munged)."""
        files = {f"slurmd {n}": self.pid_file(self._slurmd_label(n)) for n in self.node_names}
        files.update({d: self.pid_file(d) for d in DAEMONS[1:]})
        return files

    def _slurmd_label(self, node: str) -> str:
        return "slurmd" if self.nodes == 1 else f"slurmd-{node}"

    def env(self) -> dict[str, str]:
        """The environment clients (sbatch, squeue, scontrol, srun) need to talk to this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def write_config(self) -> None:
        for sub in ("munge", "run", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged insists on a 0755 socket directory and a 0400 key owned by its user.
        os.chmod(self.root / "munge", 0o755)
        os.chmod(self.root, 0o755)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        user = _user_name()
        ctld_port, slurmd_port = free_port(), free_port()
        ctld_addr = self.link.controller_addr if self.link else "127.0.0.1"
        slurmd = "slurmd" if self.nodes == 1 else "slurmd-%n"
        if self.nodes > 1:
            for name in self.node_names:
                (self.root / "spool" / name).mkdir(exist_ok=True)
        lines = [
            "ClusterName=sspeft-test",
            # slurmctld runs on this machine, which it recognises by its short hostname
            f"SlurmctldHost={self.node if self.nodes == 1 else short_hostname()}({ctld_addr})",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / ('' if self.nodes == 1 else '%n')}",
            f"SlurmctldPidFile={self.pid_file('slurmctld')}",
            f"SlurmdPidFile={self.pid_file(slurmd)}",
            f"SlurmctldLogFile={self.log_file('slurmctld')}",
            f"SlurmdLogFile={self.log_file(slurmd)}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=500",
            # Finished jobs stay in `scontrol show job` (there is no accounting database to ask instead).
            "MinJobAge=3600",
            "JobRequeue=1",
            "ReturnToService=2",
            "KillWait=30",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            # The node advertises what we say, not what the hardware has (CI machines have 2 cores).
            "SlurmdParameters=config_overrides",
        ]
        for name in self.node_names:
            addr = self.link.address(name) if self.link else "127.0.0.1"
            lines.append(f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} RealMemory={self.memory_mb} "
                         "State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.node_names)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        atomic_write_text(self.conf, "\n".join(lines) + "\n")

    def start(self, timeout_s: float = 60.0) -> None:
        """Make the private link (N ≥ 2 nodes), write the config and start munged, slurmctld and the slurmds; return
        once every node accepts jobs. On failure everything started or made is stopped and removed again, and the
        ClusterError carries every daemon's log."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.nodes > 1 and self.link is None:
            try:
                self.link = PrivateLink.create(self.root, self.node_names, short_hostname())
            except LinkError as exc:
                raise ClusterError(f"the private link for {self.nodes} nodes could not be made: {exc}") from exc
        try:
            self.write_config()
            self._start_daemons(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start_daemons(self, timeout_s: float) -> None:
        env = self.env()
        self._spawn("munged", [
            _sbin("munged"), f"--socket={self.munge_socket}", f"--key-file={self.root / 'munge' / 'munge.key'}",
            f"--pid-file={self.pid_file('munged')}", f"--log-file={self.log_file('munged')}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}", "--force",
        ], env)
        self._wait(lambda: self.munge_socket.exists(), "munged socket", timeout_s)
        self._spawn("slurmctld", [_sbin("slurmctld"), "-f", str(self.conf), "-i"], env)
        self._wait(lambda: self._scontrol_ok(), "slurmctld to answer `scontrol ping`", timeout_s)
        for name in self.node_names:
            argv = [_sbin("slurmd"), "-f", str(self.conf)]
            if self.link is not None:
                argv = self.link.command_in(name, [*argv, "-N", name])
            self._spawn(self._slurmd_label(name), argv, env)
        self._wait(self.node_idle, f"node(s) {','.join(self.node_names)} to become idle", timeout_s)

    def _spawn(self, daemon: str, argv: list[str], env: dict[str, str]) -> None:
        # Each daemon forks into the background and writes its pid file; a non-zero exit here is a config error.
        out = self.root / "log" / f"{daemon}.start"
        with out.open("w") as handle:
            proc = subprocess.run(argv, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(f"{daemon} exited {proc.returncode} at start\n{self.logs()}")

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.3)
        raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}")

    def _scontrol_ok(self) -> bool:
        proc = subprocess.run([_sbin("scontrol"), "ping"], env=self.env(), capture_output=True, text=True,
                              timeout=30)
        return proc.returncode == 0 and "UP" in proc.stdout

    def node_idle(self) -> bool:
        """Every node answers and is idle (or running jobs)."""
        proc = subprocess.run([_sbin("sinfo"), "-h", "-N", "-o", "%t"], env=self.env(), capture_output=True,
                              text=True, timeout=30)
        states = proc.stdout.split()
        return (proc.returncode == 0 and len(states) == self.nodes
                and all(s in {"idle", "mix", "alloc"} for s in states))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the daemons this cluster started, by the pids in their pid files (TERM, then KILL); then, for a
        multi-node cluster, kill what is left inside its namespaces (job steps) and remove the private link."""
        for pid in self.running().values():
            if pid is not None:
                terminate(pid, timeout_s)
        if self.link is not None:
            for pid in self.link.pids():
                terminate(pid, 5.0)
            try:
                self.link.remove()
            except LinkError as exc:
                raise ClusterError(str(exc)) from exc
            self.link = None

    def running(self) -> dict[str, int | None]:
        """Pid of each daemon that is alive (None where it is not)."""
        result: dict[str, int | None] = {}
        for label, path in self.daemon_pid_files().items():
            pid = read_pid(path)
            result[label] = pid if pid is not None and alive(pid) else None
        return result

    def logs(self, tail_lines: int = 80) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
            parts.append(f"----- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.testing.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("dir", type=Path, help="directory for config, state, logs and pid files")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes to start (default 1; stop/status read it from DIR)")
    args = parser.parse_args(argv)
    if args.nodes is not None and args.nodes < 1:
        parser.error(f"--nodes {args.nodes}: expected 1 or more")
    cluster = LocalCluster(args.dir, nodes=args.nodes or _recorded_nodes(args.dir))
    if args.action == "start":
        missing = missing_programs(cluster.nodes)
        if missing:
            print(f"missing programs: {' '.join(missing)}; run slurm/testing/install.sh as root", file=sys.stderr)
            return 1
        try:
            cluster.start()
        except ClusterError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"export SLURM_CONF={cluster.conf}")
    elif args.action == "stop":
        cluster.stop()
    else:
        for daemon, pid in cluster.running().items():
            print(f"{daemon}: {'running, pid ' + str(pid) if pid else 'not running'}")
    return 0


def _recorded_nodes(root: Path) -> int:
    """How many nodes the cluster under `root` was started with (its private link names them)."""
    link = PrivateLink.load(root)
    return len(link.nodes) if link else 1


if __name__ == "__main__":
    sys.exit(main())
