#!/usr/bin/env python3
"""An agent holding thousands of peers absorbing a burst of joins, against the old
path (every event: a full state save and a full reconcile) measured in the same run.

    python -m bench.agent_scale            # 2,000 peers + 500 joins; then 5,000 peers
    python -m bench.agent_scale --smoke    # 200 peers + 50 joins (CI)
    python -m bench.agent_scale --wireguard-go   # the device is a real wireguard-go (root)

The real agent code runs (``agent.daemon.NetworkAgent``: its sync loop, event handling,
coalescing, state saves and ``cladnet.mesh``), fed by an in-memory controller (the
listed peers, then watch events as the controller's stream sends them) and changing an
in-memory WireGuard device (``MemoryBackend``, which records what it is asked to do).
So the figures are the agent's own: no controller, no wireguard-go. With
``--wireguard-go`` the device is also a real wireguard-go (``agent.wireguard.userspace``
in a namespace of its own, link down: no packet leaves, no handshake is attempted), and
its CPU is reported beside the agent's: the agent's reads and writes of the device
through its UAPI, and wireguard-go holding thousands of peers.

Per variant, in this process: the agent lists ``--peers`` peers and brings its device up
to them; then ``--burst`` ADDED events are fed at ``--rate`` per second (500: what two
controllers sustain, see the joins bench). Measured from the first event:
CPU seconds (this process, ``time.process_time``), bytes written (``wchar`` of
/proc/self/io: the state saves; logging is off meanwhile), and when the device holds every
peer, from the last join. Then ``--single`` endpoint changes one at a time: event-to-
device time and CPU per event, and RSS. Variants: ``coalesced`` (the agent as shipped),
``per-event`` (``Timing(coalesce=None)``: the old path, the baseline). The larger size
(``--large``, 5,000 peers) runs the coalesced agent only: the old path takes minutes.

Targets (issue 13, for 2,000 peers + 500 joins): at most 5 s CPU, at most 25 MB written,
the device complete within 2 s of the last join. One JSON object, then a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.daemon import NetworkAgent, Timing
from agent.state import Membership, StateDir
from agent.wireguard.userspace import UserspaceBackend
from bench.common import (
    clean_up_on_sigterm,
    cpu_seconds,
    machine_facts,
    percentile,
    rss_bytes,
    wireguard_go_processes,
)
from cladnet.keys import generate_keypair
from cladnet.mesh import DeviceChanges, DeviceState, PeerState
from lab.netns import root_missing, sh

TARGET_CPU_S = 5.0
TARGET_WRITTEN_MB = 25.0
TARGET_COMPLETE_S = 2.0
NETWORK = {
    "id": "n-bench",
    "name": "bench",
    "cidr": "10.80.0.0/16",
    "mtu": 1420,
    "listen_port": 51820,
    "keepalive": 25,
}


class MemoryBackend:
    """A WireGuard device in memory that counts what it is asked to do."""

    kind = "memory"

    def __init__(self) -> None:
        self.peers: dict[str, PeerState] = {}
        self.listen_port: int | None = None
        self.gets = 0
        self.applies = 0
        self.changed = asyncio.Event()  # set on every apply

    async def create(self, name: str) -> None:
        return None

    async def destroy(self, name: str) -> None:
        self.peers.clear()

    async def exists(self, name: str) -> bool:
        return True

    async def set_private_key(self, name: str, private_key: str) -> None:
        return None

    async def get(self, name: str) -> DeviceState:
        self.gets += 1
        return DeviceState(listen_port=self.listen_port, peers=dict(self.peers))

    async def apply(
        self, name: str, changes: DeviceChanges, private_key: str | None = None
    ) -> None:
        self.applies += 1
        if changes.listen_port is not None:
            self.listen_port = changes.listen_port
        for key in changes.peers_to_remove:
            self.peers.pop(key, None)
        for p in changes.peers_to_add:
            self.peers[p.public_key] = PeerState(
                p.public_key, p.allowed_ips, p.endpoint, p.keepalive
            )
        for key, u in changes.peers_to_update.items():
            old = self.peers[key]
            self.peers[key] = replace(
                old,
                endpoint=u.endpoint if u.endpoint is not None else old.endpoint,
                allowed_ips=u.allowed_ips if u.allowed_ips is not None else old.allowed_ips,
                keepalive=u.keepalive if u.keepalive is not None else old.keepalive,
            )
        self.changed.set()


class WireGuardGoDevice(MemoryBackend):
    """A real wireguard-go device in namespace ``netns``, mirrored in memory so that the
    bench's own checks ("does the device hold every peer yet?") never read it."""

    kind = "userspace"

    def __init__(self, netns: str) -> None:
        super().__init__()
        self.real = UserspaceBackend(netns=netns)

    async def create(self, name: str) -> None:
        await self.real.create(name)

    async def destroy(self, name: str) -> None:
        await self.real.destroy(name)
        await super().destroy(name)

    async def exists(self, name: str) -> bool:
        return await self.real.exists(name)

    async def set_private_key(self, name: str, private_key: str) -> None:
        await self.real.set_private_key(name, private_key)

    async def get(self, name: str) -> DeviceState:
        self.gets += 1
        return await self.real.get(name)

    async def apply(
        self, name: str, changes: DeviceChanges, private_key: str | None = None
    ) -> None:
        await self.real.apply(name, changes, private_key)
        await super().apply(name, changes, private_key)


class FeedClient:
    """The controller as the agent's sync loop sees it: a list, then a watch stream fed
    by ``send``."""

    def __init__(self, peers: list[dict[str, Any]], revision: int) -> None:
        self.listed, self.revision = peers, revision
        # (when the controller sends it, event): the schedule does not wait for the agent.
        self.queue: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()

    async def list_peers_and_policy(
        self, network_id: str
    ) -> tuple[list[dict[str, Any]], int, dict[str, Any] | None]:
        return self.listed, self.revision, None  # no policy: every peer in the device

    async def watch_peers(self, network_id: str, since: int) -> AsyncIterator[dict[str, Any]]:
        while True:
            at, event = await self.queue.get()
            if (wait := at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            yield event

    def send(self, kind: str, peer: dict[str, Any], at: float = 0.0) -> None:
        """Stream an event, not before ``at`` (monotonic)."""
        self.revision += 1
        self.queue.put_nowait((at, {"type": kind, "revision": self.revision, "peer": peer}))

    async def reconnect(self) -> None:
        return None

    async def close(self) -> None:
        return None


def peer(n: int) -> dict[str, Any]:
    """A well-formed peer record number ``n`` (n ≥ 2; host 1 is the agent itself)."""
    return {
        "id": f"h-{n:06d}",
        "name": f"vm{n}",
        "network_id": NETWORK["id"],
        "public_key": base64.b64encode(n.to_bytes(32, "big")).decode(),
        "overlay_ip": str(ipaddress.IPv4Address("10.80.0.0") + n),
        "listen_port": 51820,
        "addresses": [f"192.0.2.{n % 250 + 1}/24"],
        "public_address": f"198.51.{n // 250 % 250}.{n % 250 + 1}",
        "endpoints": [],
        "labels": {"cloud": "bench"},
        "updated_at": 1700000000.0,
    }


async def make_agent(
    state: Path, held: int, timing: Timing, backend: MemoryBackend | None = None
) -> tuple[NetworkAgent, FeedClient]:
    """An agent whose controller lists ``held`` peers; its device is ``backend`` (made
    here; in memory by default)."""
    backend = backend or MemoryBackend()
    m = Membership(
        controller="http://127.0.0.1:9",
        host_id="h-000001",
        interface="cl-bench",
        network=NETWORK,
        me=peer(1),
    )
    private = generate_keypair()[0]
    await backend.create(m.interface)
    await backend.set_private_key(m.interface, private)
    agent = NetworkAgent(StateDir(state), m, "clh_x.y", private, backend, timing)
    await agent.client.close()
    feed = FeedClient([peer(1), *(peer(n) for n in range(2, held + 2))], 100)
    agent.client = feed  # type: ignore[assignment]
    agent._device_ready = True  # made above; its link stays down: nothing is sent
    return agent, feed


async def until(predicate: Any, backend: MemoryBackend, limit: float) -> float:
    """Wait until ``predicate()`` holds (checked on every device change); when it did."""
    deadline = time.monotonic() + limit
    while not predicate():
        backend.changed.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the device did not get there in time")
        try:
            await asyncio.wait_for(backend.changed.wait(), left)
        except TimeoutError:
            continue
    return time.monotonic()


def wchar() -> int:
    """Bytes this process passed to write() so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


async def measure(
    variant: str, held: int, burst: int, single: int, rate: int, netns: str | None = None
) -> dict[str, Any]:
    """One agent: list ``held`` peers, absorb ``burst`` joins (``rate`` per second, 0: all
    at once), then ``single`` changes. ``netns``: its device is a wireguard-go there."""
    coalesce = None if variant == "per-event" else Timing().coalesce
    backend = MemoryBackend() if netns is None else WireGuardGoDevice(netns)
    with tempfile.TemporaryDirectory(prefix="cl-agent-scale-") as tmp:
        agent, feed = await make_agent(Path(tmp), held, Timing(coalesce=coalesce), backend)
        wg = [pid for pid, iface in wireguard_go_processes().items() if iface == agent.iface]
        wg_cpu = (lambda: cpu_seconds(wg[0])) if netns is not None and wg else (lambda: 0.0)
        sync = asyncio.create_task(agent.sync_loop())
        try:
            await until(lambda: len(backend.peers) == held, backend, 600)
            await asyncio.sleep(0.2)  # the list's save and any deferred keepalives
            gets0, applies0 = backend.gets, backend.applies
            cpu0, written0, started = time.process_time(), wchar(), time.monotonic()
            wg0 = wg_cpu()
            first = held + 2
            for i, n in enumerate(range(first, first + burst)):
                feed.send("ADDED", peer(n), at=started + i / rate if rate else 0.0)
            last_join = started + (burst - 1) / rate if rate else started
            done = await until(lambda: len(backend.peers) == held + burst, backend, 600)
            # Everything the burst causes: deferred keepalives, the trailing save.
            await asyncio.sleep(agent.timing.keepalive_delay + 0.1)
            for task in (agent._apply_task, agent._deferred, agent._save_task):
                if task is not None:
                    await task
            cpu = time.process_time() - cpu0
            written = wchar() - written0
            wg_burst = wg_cpu() - wg0
            burst_row = {
                "cpu_seconds": round(cpu + wg_burst, 3),
                "agent_cpu_seconds": round(cpu, 3),
                "wireguard_go_cpu_seconds": round(wg_burst, 3) if netns else None,
                "written_mb": round(written / 1e6, 3),
                "device_complete_after_last_join_s": round(done - last_join, 3),
                "device_complete_after_first_join_s": round(done - started, 3),
                "device_reads": backend.gets - gets0,
                "device_applies": backend.applies - applies0,
            }
            # Single changes, one at a time: an endpoint moves, the device follows.
            latencies, cpu1 = [], time.process_time()
            for i in range(single):
                moved = peer(2 + i)
                moved["public_address"] = f"203.0.113.{i % 250 + 1}"
                key = moved["public_key"]
                want = f"203.0.113.{i % 250 + 1}:51820"
                sent = time.monotonic()
                feed.send("MODIFIED", moved)
                seen = await until(
                    lambda k=key, w=want: backend.peers[k].endpoint == w, backend, 60
                )
                latencies.append(seen - sent)
            per_event = (time.process_time() - cpu1) / max(1, single)
            await asyncio.sleep(agent.timing.save_every)  # let the trailing save run
            latencies.sort()
            return {
                "variant": variant,
                "device": "wireguard-go" if netns else "memory",
                "peers_held": held,
                "burst_joins": burst,
                "joins_per_second": rate or None,
                "burst": burst_row,
                "single_events": single,
                "event_to_device_ms": {
                    "p50": round(1000 * (percentile(latencies, 50) or 0), 1),
                    "p99": round(1000 * (percentile(latencies, 99) or 0), 1),
                },
                "cpu_ms_per_single_event": round(per_event * 1000, 2),
                "rss_mib": round(rss_bytes(os.getpid()) / 2**20, 1),
                "save_errors": agent.save_errors,
                "bad_input": agent.bad_input,
            }
        finally:
            sync.cancel()
            await asyncio.gather(sync, return_exceptions=True)
            for task in (agent._apply_task, agent._deferred, agent._save_task):
                if task is not None:
                    task.cancel()
            await backend.destroy(agent.iface)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--peers", type=int, default=2000)
    p.add_argument("--burst", type=int, default=500)
    p.add_argument("--rate", type=int, default=500, help="joins/s in the burst; 0: at once")
    p.add_argument("--single", type=int, default=20)
    p.add_argument("--large", type=int, default=5000, help="0: skip the large size")
    p.add_argument(
        "--wireguard-go",
        action="store_true",
        help="the device is a real wireguard-go (root); the baseline is the same agent "
        "with the in-memory device, and the old per-event path is not run",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.peers, args.burst, args.single, args.large = 200, 50, 5, 0
    return args


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A network namespace of our own (only ``lo``, down) for wireguard-go, removed after."""
    name = f"cl-ascale-{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.wireguard_go:
        with namespace() as ns:
            rows = [await measure("coalesced", args.peers, args.burst, args.single, args.rate, ns)]
            if args.large:
                rows.append(
                    await measure("coalesced", args.large, args.burst, args.single, args.rate, ns)
                )
        # Same run, same agent, the in-memory device: what wireguard-go adds.
        rows.insert(1, await measure("coalesced", args.peers, args.burst, args.single, args.rate))
    else:
        variants = ("coalesced", "per-event")
        rows = [await measure(v, args.peers, args.burst, args.single, args.rate) for v in variants]
        if args.large:
            rows.append(await measure("coalesced", args.large, args.burst, args.single, args.rate))
    new, old = rows[0]["burst"], rows[1]["burst"]
    ratios = {
        k: round(old[k] / new[k], 1) if new[k] else None
        for k in ("cpu_seconds", "written_mb", "device_complete_after_last_join_s")
    }
    return {
        "benchmark": "cladnet.agent.scale",
        "inputs": {
            "peers": args.peers,
            "burst": args.burst,
            "rate": args.rate,
            "single": args.single,
            "large": args.large,
            "smoke": args.smoke,
            "timing": Timing().__dict__,
            "device": "wireguard-go, link down (a namespace of its own)"
            if args.wireguard_go
            else "in-memory recording backend (no wireguard-go)",
            "baseline": "the same agent with the in-memory device"
            if args.wireguard_go
            else "the old per-event path (full save and reconcile per event)",
            "controller": "in-memory list + watch stream",
        },
        "machine": machine_facts(),
        "results": rows,
        "baseline_over_coalesced": ratios,
        "target": {
            "cpu_seconds": TARGET_CPU_S,
            "written_mb": TARGET_WRITTEN_MB,
            "device_complete_after_last_join_s": TARGET_COMPLETE_S,
            "met": new["cpu_seconds"] <= TARGET_CPU_S
            and new["written_mb"] <= TARGET_WRITTEN_MB
            and new["device_complete_after_last_join_s"] <= TARGET_COMPLETE_S,
        },
    }


def main(argv: list[str] | None = None) -> int:
    clean_up_on_sigterm()
    args = parse_args(argv)
    if args.wireguard_go and (missing := root_missing()):
        print(f"bench.agent_scale: {missing}", file=sys.stderr)
        return 2
    logging.disable(logging.WARNING)  # log lines would count as bytes written
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=1))
    new, old = report["results"][0]["burst"], report["results"][1]["burst"]
    print(
        f"{args.peers} peers + {args.burst} joins: {new['cpu_seconds']} s CPU, "
        f"{new['written_mb']} MB written, device complete "
        f"{new['device_complete_after_last_join_s']} s after the last join"
        + (" (agent + wireguard-go)" if args.wireguard_go else "")
        + f" ({report['inputs']['baseline']}: {old['cpu_seconds']} s, {old['written_mb']} MB, "
        f"{old['device_complete_after_last_join_s']} s); target met: {report['target']['met']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
