"""An sshd on every node of a multi-node test cluster, for launchers that reach nodes over ssh (the `deepspeed`
launcher with a hostfile runs `pdsh`, which runs `ssh NODE ...`).

    sshd = NodeSshd(cluster.root, cluster.link)
    sshd.start()                     # keys made here, one sshd per node namespace, on port 22 of its address
    env = sshd.client_env()          # PDSH_SSH_ARGS_APPEND: this key, this known_hosts, no prompts
    sshd.stop()                      # by pid file

Everything lives under ROOT/ssh: a client key pair made for this cluster (its public half the only authorized key),
a host key, known_hosts naming every node with that host key, and the sshd configuration. Each sshd runs inside its
node's namespaces (`PrivateLink.command_in`) with ROOT/ssh/run bind-mounted on /run for its privilege-separation
directory, so nothing outside ROOT is written. Needs root and Debian's openssh-server (slurm/testing/install.sh).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from launch.rundir import atomic_write_text
from slurm.testing.netns import PrivateLink
from slurm.testing.pids import read_pid, terminate

SSHD = "/usr/sbin/sshd"


class SshdError(RuntimeError):
    """An sshd did not start or a key could not be made; the message carries the sshd logs."""


@dataclass
class NodeSshd:
    """One sshd per node of `link`, configured and keyed under `root`/ssh."""

    root: Path
    link: PrivateLink
    port: int = 22
    """Port on each node's own address (each node is its own network namespace, so 22 is free there)."""

    @property
    def dir(self) -> Path:
        return Path(self.root) / "ssh"

    @property
    def client_key(self) -> Path:
        return self.dir / "id_ed25519"

    def pid_file(self, node: str) -> Path:
        return self.dir / f"sshd-{node}.pid"

    def log_file(self, node: str) -> Path:
        return Path(self.root) / "log" / f"sshd-{node}.log"

    def client_env(self) -> dict[str, str]:
        """What pdsh needs in its environment to reach the nodes with this cluster's key and host key only."""
        args = (f"-i {self.client_key} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes "
                f"-o UserKnownHostsFile={self.dir / 'known_hosts'} -o GlobalKnownHostsFile=/dev/null -p {self.port}")
        return {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": args}

    def start(self, timeout_s: float = 30.0) -> None:
        """Make the keys and config, start an sshd on every node; wait until each accepts connections."""
        if not os.access(SSHD, os.X_OK):
            raise SshdError(f"{SSHD} is not installed; run slurm/testing/install.sh as root")
        self._write_keys()
        for node in self.link.nodes:
            config = self._write_config(node)
            argv = self.link.command_in(node, [SSHD, "-f", str(config), "-E", str(self.log_file(node))],
                                        binds={self.dir / "run": "/run"})
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                self.stop()
                raise SshdError(f"sshd on {node} exited {proc.returncode}: {proc.stderr}\n{self.logs()}")
        deadline = time.monotonic() + timeout_s
        while not all(self.pid_file(n).is_file() for n in self.link.nodes):
            if time.monotonic() > deadline:
                self.stop()
                raise SshdError(f"sshd did not write its pid file within {timeout_s:.0f} s\n{self.logs()}")
            time.sleep(0.2)

    def _write_keys(self) -> None:
        (self.dir / "run" / "sshd").mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir / "run" / "sshd", 0o755)  # sshd refuses a group- or world-writable privsep directory
        for key in (self.client_key, self.dir / "host_ed25519"):
            if not key.exists():
                proc = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sspeft-test-cluster",
                                       "-f", str(key)], capture_output=True, text=True, timeout=60)
                if proc.returncode != 0:
                    raise SshdError(f"ssh-keygen for {key} failed: {proc.stderr}")
        host_pub = (self.dir / "host_ed25519.pub").read_text().split()[:2]
        atomic_write_text(self.dir / "authorized_keys", self.client_key.with_suffix(".pub").read_text())
        os.chmod(self.dir / "authorized_keys", 0o600)
        atomic_write_text(self.dir / "known_hosts",
                          "".join(f"{node},{self.link.address(node)} {' '.join(host_pub)}\n"
                                  for node in self.link.nodes))

    def _write_config(self, node: str) -> Path:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.link.address(node)}",
            f"HostKey {self.dir / 'host_ed25519'}",
            f"PidFile {self.pid_file(node)}",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            # StrictModes refuses keys below a world-writable directory such as /tmp, where test clusters live; the
            # key files themselves are 0600 and the sshd listens on the private link only.
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PrintMotd no",
            "X11Forwarding no",
            "LogLevel INFO",
        ]
        return atomic_write_text(self.dir / f"sshd_config-{node}", "\n".join(lines) + "\n")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop each node's sshd by its pid file (TERM, then KILL)."""
        for node in self.link.nodes:
            pid = read_pid(self.pid_file(node))
            if pid is not None:
                terminate(pid, timeout_s)
            self.pid_file(node).unlink(missing_ok=True)

    def logs(self, tail_lines: int = 40) -> str:
        parts = []
        for node in self.link.nodes:
            path = self.log_file(node)
            text = path.read_text(errors="replace").splitlines()[-tail_lines:] if path.exists() else ["(no log)"]
            parts.append(f"----- {path}\n" + "\n".join(text))
        return "\n".join(parts)
