"""Latched relay pairs forwarded by the kernel: real wireguard-go peers in two namespaces
talk through a third running the relay's pair forwarder with its nftables flows. Pings
go through; once the pair is latched, Python forwards no more data packets (its
counters stand still, the kernel's rise); the ``cl-relay-*`` table is replaced after a
crash and gone after a stop. Root only."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cladnet.keys import generate_keypair
from cladnet.relay_nft import Flow, counters, ruleset, table_name
from lab.components import wait_until
from lab.netns import Lab
from tests.support import need_root

PORTS = (40000, 40001)
RELAY_ID = "kt"

# The pair forwarder of ``cladnet-relay`` for one pair, no etcd, with kernel flows
# synced every 0.2 s; its counters written to a file after each sync.
RELAY_SCRIPT = textwrap.dedent("""
    import asyncio, json, signal, sys
    from agent.relay import PairForwarder, Side
    from agent.relay_kernel import KernelFlows

    async def main():
        out, ports = sys.argv[1], (int(sys.argv[2]), int(sys.argv[3]))
        pair = PairForwarder((Side("a", None), Side("b", None)), lambda side, addr: None)
        await pair.open("0.0.0.0", ports)
        kernel = KernelFlows(sys.argv[4], (ports[0], ports[1]), None)
        await kernel.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        kernel_packets = 0
        while not stop.is_set():
            kernel_packets += (await kernel.sync({ports: pair}))[0]
            with open(out + ".tmp", "w") as f:
                json.dump({"python": pair.counts, "kernel": kernel_packets,
                           "flows": len(kernel.flows)}, f)
            __import__("os").replace(out + ".tmp", out)
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass
        await kernel.stop()

    asyncio.run(main())
""")


def test_ruleset_forwards_each_side_to_the_other_and_counts_per_side() -> None:
    flow = Flow((40000, 40001), (("10.0.0.1", 51820), ("10.0.0.2", 1234)), 7)
    text = ruleset(table_name("r 1"), (40000, 40999), [flow], None)
    assert text.startswith("table ip cl-relay-r_1 {}\ndelete table ip cl-relay-r_1\n")
    assert "ip saddr 10.0.0.1 udp sport 51820 udp dport 40000 dnat to 10.0.0.2:1234" in text
    assert "ip saddr 10.0.0.2 udp sport 1234 udp dport 40001 dnat to 10.0.0.1:51820" in text
    assert "ct zone 7 ip saddr 10.0.0.1 udp sport 51820 masquerade to :40001" in text
    assert "snat to 192.0.2.9:40000" in ruleset("t", (1, 2), [flow], "192.0.2.9")
    rule = {
        "chain": "raw_in",
        "comment": "40000-1",
        "expr": [{"counter": {"packets": 3, "bytes": 300}}],
    }
    listing = {"nftables": [{"rule": rule}, {"rule": rule}, {"table": {}}]}
    assert counters(listing) == {(40000, 1): (6, 600)}


class World:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.a, self.b, self.r = lab.add_host(1), lab.add_host(2), lab.add_host(3)
        self.lab.run(self.r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.relay: subprocess.Popen[bytes] | None = None
        self.status = tmp / "relay.json"

    def start_relay(self) -> None:
        self.status.unlink(missing_ok=True)
        self.relay = self.lab.popen(
            self.r,
            [sys.executable, "-c", RELAY_SCRIPT, str(self.status), *map(str, PORTS), RELAY_ID],
            stdout=subprocess.DEVNULL,
            stderr=(self.tmp / "relay.log").open("ab"),
        )
        self.procs.append(self.relay)
        wait_until(self.status.exists, 10, what="relay started")

    def counts(self) -> dict[str, Any]:
        return dict(json.loads(self.status.read_text()))

    def table(self) -> str:
        return str(self.lab.run(self.r, "nft", "list", "tables").stdout)

    def tunnel(self) -> str:
        """wireguard-go in A and B, each sending to its relay port; B's tunnel address."""
        keys = {ns: generate_keypair() for ns in (self.a, self.b)}
        relay_ip = self.lab.address(3)
        for i, (ns, other) in enumerate(((self.a, self.b), (self.b, self.a))):
            dev = f"cl-{self.lab.tag}k{i}"
            self.procs.append(
                self.lab.popen(
                    ns,
                    ["wireguard-go", "-f", dev],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            sock = Path(f"/var/run/wireguard/{dev}.sock")
            wait_until(sock.exists, 10, what=f"wireguard-go {dev}")
            key = self.tmp / f"{dev}.key"
            key.write_text(keys[ns][0])
            key.chmod(0o600)
            self.lab.run(
                ns,
                "wg",
                "set",
                dev,
                "listen-port",
                "51820",
                "private-key",
                str(key),
                "peer",
                keys[other][1],
                "allowed-ips",
                f"10.196.0.{2 - i}/32",
                "endpoint",
                f"{relay_ip}:{PORTS[i]}",
                "persistent-keepalive",
                "1",
            )
            self.lab.run(ns, "ip", "addr", "add", f"10.196.0.{i + 1}/24", "dev", dev)
            self.lab.run(ns, "ip", "link", "set", dev, "up")
        return "10.196.0.2"

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.lab.cleanup()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    need_root()
    w = World(Lab(), tmp_path)
    try:
        yield w
    finally:
        w.cleanup()


def test_latched_pair_is_forwarded_by_the_kernel(world: World) -> None:
    world.start_relay()
    peer = world.tunnel()
    assert wait_until(lambda: world.lab.ping(world.a, peer), 30, what="first ping")
    # Both sides latched: the flow goes into the kernel at the next sync.
    wait_until(lambda: world.counts()["flows"] == 1, 10, what="kernel flow")
    before = world.counts()
    r = world.lab.run(world.a, "ping", "-c", "10", "-i", "0.1", "-W", "1", peer, check=False)
    assert r.returncode == 0, r.stdout
    time.sleep(0.5)  # the next sync reads the kernel's counters
    after = world.counts()
    assert after["python"].get("forwarded", 0) == before["python"].get("forwarded", 0), after
    assert after["kernel"] >= before["kernel"] + 20, (before, after)  # 10 echoes, 10 replies
    assert f"cl-relay-{RELAY_ID}" in world.table()
    assert world.relay is not None
    world.relay.send_signal(signal.SIGTERM)
    world.relay.wait(10)
    assert f"cl-relay-{RELAY_ID}" not in world.table()


def test_a_crashed_relays_table_is_replaced_on_restart(world: World) -> None:
    world.start_relay()
    peer = world.tunnel()
    assert wait_until(lambda: world.lab.ping(world.a, peer), 30, what="first ping")
    wait_until(lambda: world.counts()["flows"] == 1, 10, what="kernel flow")
    assert world.relay is not None
    world.relay.kill()
    world.relay.wait(5)
    # The dead relay's flow is left in the kernel; a restart replaces the table (no flow
    # until its Python latched both sides again), and pings work again through it.
    assert (
        "dnat to"
        in world.lab.run(world.r, "nft", "list", "table", "ip", f"cl-relay-{RELAY_ID}").stdout
    )
    world.start_relay()
    assert world.counts()["flows"] == 0
    assert wait_until(lambda: world.lab.ping(world.a, peer), 30, what="ping after restart")
    wait_until(lambda: world.counts()["flows"] == 1, 10, what="kernel flow after restart")
    world.relay.send_signal(signal.SIGTERM)
    world.relay.wait(10)
    assert f"cl-relay-{RELAY_ID}" not in world.table()


def test_a_rebound_side_is_relatched_and_its_flow_replaced(world: World) -> None:
    """A's source port changes (a NAT rebinding): the old flow no longer matches, the
    new source reaches Python as a stranger until the old one was silent for 10 s (the
    kernel's counters say when it was last heard), then it is latched and the pair goes
    back into the kernel with the new address."""
    world.start_relay()
    peer = world.tunnel()
    assert wait_until(lambda: world.lab.ping(world.a, peer), 30, what="first ping")
    wait_until(lambda: world.counts()["flows"] == 1, 10, what="kernel flow")
    before = world.counts()
    world.lab.run(world.a, "wg", "set", f"cl-{world.lab.tag}k0", "listen-port", "51821")
    assert wait_until(lambda: world.lab.ping(world.a, peer, wait=0.5), 40, what="relatched")
    wait_until(lambda: world.counts()["flows"] == 1, 10, what="new kernel flow")
    after = world.counts()
    assert after["python"].get("stranger", 0) > before["python"].get("stranger", 0), after
    rules = world.lab.run(world.r, "nft", "list", "table", "ip", f"cl-relay-{RELAY_ID}").stdout
    assert "udp sport 51821" in rules and "udp sport 51820 udp dport 40000" not in rules, rules
