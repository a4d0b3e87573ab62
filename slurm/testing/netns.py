"""A private link for a multi-node test cluster on one machine: one network namespace per node, joined by veth pairs
to a bridge that carries the controller's address, on a private /24 that nothing else on the host uses.

    link = PrivateLink.create(root, ["node1", "node2"])   # records itself in root/net.json
    link.run_in("node1", ["slurmd", ...])                  # in node1's namespace, with its own hostname
    PrivateLink.load(root).remove()                         # exactly the names it made, also after a failure

Every name (namespaces, bridge, veth ends) carries a random tag chosen at creation and is written to
`root/net.json` before the object exists, so teardown (this process, or `python -m slurm.testing.cluster stop`)
removes those names and no others. The namespaces get no default route: their traffic stays on the link (to each
other and to the bridge address in the host's namespace). Each node's programs run in their own UTS and mount
namespaces too, so `hostname` answers the node name and `/etc/hosts` (bind-mounted from `root/hosts`, visible only
inside) resolves every node name and the controller name to its address on the link. Needs root and iproute2.
"""

from __future__ import annotations

import ipaddress
import json
import random
import secrets
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from launch.rundir import atomic_write_text

NET_FILE = "net.json"
SUBNET_POOL = ipaddress.ip_network("10.200.0.0/13")
"""Private /24s are drawn from here (10.200.0.0 – 10.207.255.255) and refused when the host already routes them."""


class LinkError(RuntimeError):
    """The private link could not be made or removed; the message names the command and its output."""


@dataclass
class PrivateLink:
    """Names and addresses of one private link; `nodes` maps node name → (namespace, host-side veth, address)."""

    root: str
    tag: str
    subnet: str
    bridge: str
    controller_addr: str
    nodes: dict[str, list[str]]

    @classmethod
    def create(cls, root: Path, node_names: list[str], controller_name: str) -> PrivateLink:
        """Make the bridge, one namespace and veth pair per node, and the hosts file; remove all of it on failure."""
        tag = secrets.token_hex(3)
        subnet = _free_subnet()
        hosts = list(subnet.hosts())
        link = cls(root=str(Path(root).resolve()), tag=tag, subnet=str(subnet), bridge=f"sspbr{tag}",
                   controller_addr=str(hosts[0]),
                   nodes={name: [f"sspeft-{tag}-{name}", f"sspv{tag}{i}", str(hosts[10 + i])]
                          for i, name in enumerate(node_names)})
        atomic_write_text(Path(link.root) / NET_FILE, json.dumps(asdict(link), indent=1))
        try:
            link._build()
            lines = ["127.0.0.1 localhost", f"{link.controller_addr} {controller_name}"]
            lines += [f"{addr} {name}" for name, (_, _, addr) in link.nodes.items()]
            atomic_write_text(link.hosts_file, "\n".join(lines) + "\n")
        except LinkError:
            link.remove()
            raise
        return link

    @classmethod
    def load(cls, root: Path) -> PrivateLink | None:
        """The link recorded under `root`, or None when there is none."""
        path = Path(root).resolve() / NET_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))

    @property
    def hosts_file(self) -> Path:
        return Path(self.root) / "hosts"

    def address(self, node: str) -> str:
        return self.nodes[node][2]

    def namespace(self, node: str) -> str:
        return self.nodes[node][0]

    def _build(self) -> None:
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.controller_addr}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for namespace, veth, addr in self.nodes.values():
            inner = f"{veth}n"
            _ip("netns", "add", namespace)
            _ip("link", "add", veth, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", namespace)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", namespace, "addr", "add", f"{addr}/{prefix}", "dev", inner)
            _ip("-n", namespace, "link", "set", inner, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

    def command_in(self, node: str, argv: list[str], binds: dict[Path, str] | None = None) -> list[str]:
        """`argv` run in `node`'s network namespace, with its own hostname and the link's hosts file; `binds` maps
        further files or directories to the paths they are bind-mounted on, seen by this command only."""
        mounts = {self.hosts_file: "/etc/hosts", **(binds or {})}
        steps = [f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}" for src, dst in mounts.items()]
        inner = " && ".join([*steps, f"hostname {shlex.quote(node)}", f"exec {shlex.join(argv)}"])
        # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup filesystem slurmd needs.
        # unshare without --fork execs in place (UTS and mount namespaces need no new process); propagation is
        # private by default, so the bind mount and the hostname stay inside.
        return ["nsenter", f"--net=/run/netns/{self.namespace(node)}", "unshare", "--uts", "--mount", "sh", "-c",
                inner]

    def pids(self) -> list[int]:
        """Processes still inside this link's namespaces."""
        found = []
        for namespace, _, _ in self.nodes.values():
            proc = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
            found += [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []
        return found

    def remove(self, timeout_s: float = 20.0) -> None:
        """Delete this link's namespaces, veths and bridge (those names only); raise if any is still there after."""
        for namespace, veth, _ in self.nodes.values():
            _ip_quiet("link", "del", veth)
            _ip_quiet("netns", "del", namespace)
        _ip_quiet("link", "del", self.bridge)
        deadline = time.monotonic() + timeout_s
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            raise LinkError(f"still present after removing the private link {self.tag}: {', '.join(left)}")
        (Path(self.root) / NET_FILE).unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """This link's interfaces and namespaces that still exist on the host."""
        links = set(_names("link"))
        namespaces = set(_names("netns"))
        names = [self.bridge, *(veth for _, veth, _ in self.nodes.values())]
        return [n for n in names if n in links] + [ns for ns, _, _ in self.nodes.values() if ns in namespaces]


def host_network() -> dict[str, list[str]]:
    """The host's interfaces, addresses, routes and namespaces, for before/after comparisons."""
    return {
        "links": sorted(_names("link")),
        "addresses": sorted(_lines("-o", "addr", "show")),
        "routes": sorted(_lines("route", "show")),
        "namespaces": sorted(_names("netns")),
    }


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /24 from SUBNET_POOL that no host route or address overlaps."""
    used = []
    for line in _lines("route", "show") + _lines("-o", "addr", "show"):
        for word in line.split():
            if word.count(".") != 3:  # only dotted IPv4 addresses and prefixes (not "metric 100")
                continue
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))
    random.SystemRandom().shuffle(candidates)
    for subnet in candidates[:64]:
        if not any(subnet.overlaps(u) for u in used if u.prefixlen > 0):
            return subnet
    raise LinkError(f"no free /24 in {SUBNET_POOL}: the host already routes all of the ones tried")


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise LinkError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ip_quiet(*args: str) -> None:
    # Teardown of a half-built link: a name that was never made is not an error.
    subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _lines(*args: str) -> list[str]:
    return [line for line in _ip(*args).splitlines() if line.strip()]


def _names(kind: str) -> list[str]:
    if kind == "netns":
        return [line.split()[0] for line in _lines("netns", "list")]
    # "4: eth0: <...>" or "9: sspv1a2b3c0@if8: <...>"
    return [line.split(": ", 2)[1].split("@")[0] for line in _lines("-o", "link", "show")]
