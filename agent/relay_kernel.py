"""Latched relay pairs forwarded by the kernel (nftables DNAT/SNAT, one ``cl-relay-<id>``
table per relay); the relay's Python only sets flows up and tears them down.

Python still receives every pair's first packets (latching, filtering), junk and
strangers; once both sides of a pair are latched, :meth:`KernelFlows.sync` installs the
pair's flow (see :mod:`cladnet.relay_nft`) and the kernel forwards its WireGuard packets
from then on. The rules' counters tell Python when a side was last heard (so a silent
side can still be re-latched after a NAT rebinding) and feed the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from cladnet import relay_nft

log = logging.getLogger("cladnet.relay")


class _Side(Protocol):
    latched: tuple[str, int] | None
    last_seen: float


class _Pair(Protocol):
    @property
    def sides(self) -> tuple[_Side, _Side]: ...


class NftError(Exception):
    """``nft`` failed."""


async def nft(*args: str, stdin: str | None = None) -> str:
    """Run ``nft ARGS`` (the ruleset on stdin when given); its stdout, or NftError."""
    proc = await asyncio.create_subprocess_exec(
        "nft",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise NftError(err.decode(errors="replace").strip() or f"nft exited {proc.returncode}")
    return out.decode()


def unavailable() -> str | None:
    """Why this process cannot forward in the kernel, or None when it can."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("nft") is None:
        return "nft not found"
    try:
        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
            return "net.ipv4.ip_forward is 0 (set it to 1 to forward latched pairs in the kernel)"
    except OSError as exc:
        return f"cannot read net.ipv4.ip_forward: {exc}"
    return None


class KernelFlows:
    """The kernel flows of one relay process: installed for every pair whose two sides
    are latched, replaced when a side re-latches, removed with the pair."""

    def __init__(self, relay_id: str, port_range: tuple[int, int], snat_ip: str | None) -> None:
        self.table = relay_nft.table_name(relay_id)
        self.port_range, self.snat_ip = port_range, snat_ip
        self.flows: dict[tuple[int, int], relay_nft.Flow] = {}
        self._seen: dict[tuple[int, int], tuple[int, int]] = {}
        # A random start: zones of an earlier run (entries still in conntrack) are not
        # handed out again right away.
        self._zone = random.randint(1, 65535)

    def _next_zone(self) -> int:
        self._zone = self._zone % 65535 + 1
        return self._zone

    async def start(self) -> None:
        """Install the empty table, replacing one a crashed run of this relay left."""
        await self._load({})
        log.info("forwarding latched pairs in the kernel", extra={"table": self.table})

    async def stop(self) -> None:
        """Remove the table (the pairs' packets go nowhere until another relay has them)."""
        try:
            await nft("delete", "table", "ip", self.table)
        except (NftError, OSError) as exc:
            log.warning("could not remove the relay's table", extra={"error": str(exc)})
        self.flows = {}

    async def _load(self, flows: dict[tuple[int, int], relay_nft.Flow]) -> None:
        text = relay_nft.ruleset(self.table, self.port_range, flows.values(), self.snat_ip)
        await nft("-f", "-", stdin=text)
        self.flows, self._seen = flows, {}  # a new table starts its counters at zero

    async def sync(self, pairs: Mapping[tuple[int, int], _Pair]) -> tuple[int, int]:
        """Note what the kernel forwarded since the last call (each side heard from gets
        ``last_seen`` now), then install/replace/remove flows to match ``pairs``.
        Returns (packets, bytes) the kernel forwarded since the last call."""
        packets, nbytes = 0, 0
        if self.flows:
            listing = json.loads(await nft("-j", "list", "table", "ip", self.table))
            now = time.monotonic()
            by_port = {ports[0]: pair for ports, pair in pairs.items()}
            for (port, index), (p, n) in relay_nft.counters(listing).items():
                old_p, old_b = self._seen.get((port, index), (0, 0))
                pair = by_port.get(port)
                if p > old_p and pair is not None:
                    pair.sides[index].last_seen = now
                packets, nbytes = packets + p - old_p, nbytes + n - old_b
                self._seen[port, index] = (p, n)
        wanted: dict[tuple[int, int], relay_nft.Flow] = {}
        for ports, pair in pairs.items():
            first, second = pair.sides[0].latched, pair.sides[1].latched
            if first is None or second is None:
                continue
            old = self.flows.get(ports)
            if old is None or old.sources != (first, second):
                old = relay_nft.Flow(ports, (first, second), self._next_zone())
            wanted[ports] = old
        if wanted != self.flows:
            added = sorted(set(wanted.items()) - set(self.flows.items()))
            removed = sorted(set(self.flows) - set(wanted))
            await self._load(wanted)
            for ports, flow in added:
                log.info("pair forwarded in the kernel", extra={"ports": ports, "zone": flow.zone})
            if removed:
                log.info("kernel flows removed", extra={"ports": removed})
        return packets, nbytes
