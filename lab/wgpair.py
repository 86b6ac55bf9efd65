"""Two network namespaces joined by a veth pair, a wireguard-go device in each.

Only our own namespaces carry traffic: the underlay is 192.168.250.0/30 on the veth
pair, the overlay 10.250.0.0/24.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from agent import link
from agent.wireguard.userspace import UserspaceBackend
from cladnet import mesh
from cladnet.keys import generate_keypair

NETWORK = {
    "id": "n-wg",
    "name": "wgtest",
    "cidr": "10.250.0.0/24",
    "mtu": 1420,
    "listen_port": 51820,
    "keepalive": 25,
}


def wireguard_missing() -> str | None:
    """Why a wireguard-go pair cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root: creates network namespaces, a veth pair and WireGuard devices"
    for tool in ("ip", "ping", "wireguard-go"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, iputils-ping, wireguard-go)"
    return None


async def sh(*args: str, check: bool = True) -> None:
    """Run a command; raise on failure unless ``check`` is false."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(args)}: {err.decode().strip()}")


@dataclass
class Node:
    """One namespace with its wireguard-go device and host record."""

    ns: str
    iface: str
    backend: UserspaceBackend
    private_key: str
    host: dict[str, Any]
    applied: list[mesh.DesiredDevice] = field(default_factory=list)

    async def converge(self, peers: list[dict[str, Any]]) -> mesh.DeviceChanges:
        """Plan, diff against the device, apply; return what was applied."""
        desired = mesh.plan(NETWORK, self.host, peers)
        changes = mesh.diff(desired, await self.backend.get(self.iface))
        await self.backend.apply(self.iface, changes)
        self.applied.append(desired)
        return changes

    async def ping(self, address: str, attempts: int = 5) -> bool:
        for _ in range(attempts):
            proc = await asyncio.create_subprocess_exec(
                "ip",
                "netns",
                "exec",
                self.ns,
                "ping",
                "-c1",
                "-W1",
                address,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if await proc.wait() == 0:
                return True
        return False


@contextlib.asynccontextmanager
async def node_pair() -> AsyncIterator[tuple[Node, Node]]:
    """Namespaces A and B, a veth pair between them, a configured wireguard-go device in each."""
    tag = secrets.token_hex(3)
    ns_a, ns_b = f"cl-wgA-{tag}", f"cl-wgB-{tag}"
    veth_a, veth_b = f"cl-va{tag}", f"cl-vb{tag}"
    nodes: list[Node] = []
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            await sh("ip", "netns", "add", ns)
            created.append(ns)
            await sh("ip", "-n", ns, "link", "set", "lo", "up")
        await sh(
            "ip",
            "-n",
            ns_a,
            "link",
            "add",
            veth_a,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            ns_b,
        )
        for ns, veth, index in ((ns_a, veth_a, 1), (ns_b, veth_b, 2)):
            await sh("ip", "-n", ns, "addr", "add", f"192.168.250.{index}/30", "dev", veth)
            await sh("ip", "-n", ns, "link", "set", veth, "up")
            private, public = generate_keypair()
            node = Node(
                ns=ns,
                iface=f"cl-w{'ab'[index - 1]}{tag}",
                backend=UserspaceBackend(netns=ns),
                private_key=private,
                host={
                    "id": f"h-{index}",
                    "name": f"vm{index}",
                    "network_id": NETWORK["id"],
                    "public_key": public,
                    "overlay_ip": f"10.250.0.{index}",
                    "listen_port": 51820,
                    "addresses": [f"192.168.250.{index}/30"],
                    "public_address": None,
                    "endpoints": [],
                    "labels": {"site": "lab"},
                },
            )
            nodes.append(node)
            await node.backend.create(node.iface)
            await node.backend.set_private_key(node.iface, private)
            await link.configure(node.iface, f"{node.host['overlay_ip']}/24", 1420, netns=ns)
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            processes = node.backend.processes
            with contextlib.suppress(Exception):
                await node.backend.destroy(node.iface)
            for proc in processes.values():  # if destroy failed: by PID, only ours
                if proc.poll() is None:
                    proc.kill()
                    await asyncio.to_thread(proc.wait, 10)
        for ns in created:
            await sh("ip", "netns", "del", ns, check=False)
        for node in nodes:
            with contextlib.suppress(FileNotFoundError):
                node.backend.socket_path(node.iface).unlink()
