"""A one-node Slurm cluster in a directory, started by hand (no systemd): munged, slurmctld and slurmd.

    python -m slurm.testing.cluster start DIR     # prints `export SLURM_CONF=DIR/slurm.conf`
    python -m slurm.testing.cluster stop DIR

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
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.process import free_port
from launch.rundir import atomic_write_text

DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order; start order is the reverse


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


def missing_programs() -> list[str]:
    """Programs a local cluster needs that this machine lacks."""
    missing = []
    for name in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "srun", "scancel"):
        try:
            _sbin(name)
        except ClusterError:
            missing.append(name)
    return missing


@dataclass
class LocalCluster:
    """One-node cluster rooted at `root`; `cpus`/`memory_mb` are what the node advertises to the scheduler."""

    root: Path
    """Directory holding config, state, logs and pid files."""
    cpus: int = 8
    """CPUs the node advertises (more than the machine has is fine: tests oversubscribe a little)."""
    memory_mb: int = 16000
    """Memory the node advertises, in MiB."""
    cred_expire_s: int = 5
    """Credential lifetime; a requeued job waits this + 1 s before it may start again."""
    partition: str = "debug"
    """The only partition, the default one."""
    node: str = field(default_factory=short_hostname)
    """Node name; slurmd recognises itself by the short hostname."""

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

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
        lines = [
            "ClusterName=sspeft-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.pid_file('slurmctld')}",
            f"SlurmdPidFile={self.pid_file('slurmd')}",
            f"SlurmctldLogFile={self.log_file('slurmctld')}",
            f"SlurmdLogFile={self.log_file('slurmd')}",
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
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        atomic_write_text(self.conf, "\n".join(lines) + "\n")

    def start(self, timeout_s: float = 60.0) -> None:
        """Write the config and start munged, slurmctld, slurmd; return once the node accepts jobs."""
        self.write_config()
        env = self.env()
        try:
            self._spawn("munged", [
                _sbin("munged"), f"--socket={self.munge_socket}", f"--key-file={self.root / 'munge' / 'munge.key'}",
                f"--pid-file={self.pid_file('munged')}", f"--log-file={self.log_file('munged')}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}", "--force",
            ], env)
            self._wait(lambda: self.munge_socket.exists(), "munged socket", timeout_s)
            self._spawn("slurmctld", [_sbin("slurmctld"), "-f", str(self.conf), "-i"], env)
            self._wait(lambda: self._scontrol_ok(), "slurmctld to answer `scontrol ping`", timeout_s)
            self._spawn("slurmd", [_sbin("slurmd"), "-f", str(self.conf)], env)
            self._wait(self.node_idle, f"node {self.node} to become idle", timeout_s)
        except ClusterError:
            self.stop()
            raise

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
        proc = subprocess.run([_sbin("sinfo"), "-h", "-N", "-o", "%t"], env=self.env(), capture_output=True,
                              text=True, timeout=30)
        return proc.returncode == 0 and proc.stdout.strip() in {"idle", "mix", "alloc"}

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the daemons this cluster started, by the pids in their pid files (TERM, then KILL)."""
        for daemon in DAEMONS:
            pid = _read_pid(self.pid_file(daemon))
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def running(self) -> dict[str, int | None]:
        """Pid of each daemon that is alive (None where it is not)."""
        result: dict[str, int | None] = {}
        for daemon in DAEMONS:
            pid = _read_pid(self.pid_file(daemon))
            result[daemon] = pid if pid is not None and _alive(pid) else None
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


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); the daemons are not our children (they double-fork).
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.testing.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("dir", type=Path, help="directory for config, state, logs and pid files")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    if args.action == "start":
        missing = missing_programs()
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


if __name__ == "__main__":
    sys.exit(main())
