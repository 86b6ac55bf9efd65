"""Test hosts as network namespaces on a bridge, created and always removed by us.

Every name starts with ``cl-`` and a per-test random tag, so nothing we did not
create is ever touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def root_missing() -> str | None:
    """Why namespaces and WireGuard devices cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root: creates network namespaces, veth pairs and WireGuard devices"
    for tool in ("ip", "wireguard-go", "wg"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run deploy/setup.sh)"
    return None


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its stderr in the message."""
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def free_prefix(candidates: Sequence[str]) -> str:
    """The first ``a.b.c`` of ``candidates`` with no address of this machine in ``a.b.c.0/24``.

    A bridge left by a killed run keeps its address; a new lab on the same /24 would
    route into the old bridge, so each lab takes a /24 nobody uses.
    """
    used = sh("ip", "-4", "-o", "addr", "show").stdout
    for prefix in candidates:
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError(f"no free /24 among {candidates[0]}… for a test lab")


@dataclass(kw_only=True)
class Namespaces:
    """Network namespaces and root-namespace links made by a test, removed by ``cleanup``."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def add_bridge(self, name: str, address: str) -> None:
        """A bridge in the root namespace with our ``address/24`` on it."""
        sh("ip", "link", "add", name, "type", "bridge")
        self.links.append(name)
        sh("ip", "addr", "add", f"{address}/24", "dev", name)
        sh("ip", "link", "set", name, "up")

    def run(self, ns: str, *args: str, check: bool = True, timeout: float = 20):  # type: ignore[no-untyped-def]
        return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)

    def popen(self, ns: str, args: Sequence[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)

    def ping(self, ns: str, address: str, count: int = 1, wait: float = 1) -> bool:
        r = self.run(ns, "ping", "-c", str(count), "-W", str(wait), address, check=False)
        return r.returncode == 0

    def cleanup(self) -> None:
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        for link in self.links:
            sh("ip", "link", "del", link, check=False)


@dataclass(kw_only=True)
class Lab(Namespaces):
    """A bridge in the root namespace and hosts (namespaces) attached to it."""

    # e.g. "192.168.241" → bridge .1, hosts .11, .12, …
    subnet_prefix: str = field(
        default_factory=lambda: free_prefix([f"192.168.{n}" for n in range(240, 255)])
    )
    bridge: str = ""

    def __post_init__(self) -> None:
        self.bridge = f"cl-br{self.tag}"
        self.add_bridge(self.bridge, self.gateway)

    @property
    def gateway(self) -> str:
        return f"{self.subnet_prefix}.1"

    def add_host(self, index: int) -> str:
        """Namespace ``cl-<tag>-h<index>`` with address ``<prefix>.<10+index>/24``."""
        ns = f"cl-{self.tag}-h{index}"
        outside, inside = f"cl-{self.tag}v{index}", f"cl-{self.tag}p{index}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        self.links.append(outside)
        sh("ip", "link", "set", inside, "netns", ns)
        sh("ip", "link", "set", outside, "master", self.bridge, "up")
        self.run(ns, "ip", "link", "set", "lo", "up")
        self.run(ns, "ip", "link", "set", inside, "name", "eth0")
        self.run(ns, "ip", "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
        self.run(ns, "ip", "link", "set", "eth0", "up")
        return ns

    def address(self, index: int, generation: int = 0) -> str:
        return f"{self.subnet_prefix}.{10 + index + 100 * generation}"
