"""An agent's work per change is O(what changed): an endpoint change rebuilds no DNS
zone and compiles no packet filter; a rename, an add or a removal does (no root,
in-memory device and controller, the DNS server and nft replaced by spies)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent import firewall
from agent.daemon import NetworkAgent, Timing
from agent.names import Names
from bench.agent_scale import MemoryBackend, make_agent, peer
from cladnet import dns
from cladnet import policy as acl

# Sources by label: the filter lists every peer's overlay address.
POLICY = {"version": 1, "document": {"rules": [{"src": "label:cloud=bench", "dst": "*"}]}}


class Work:
    """Counts zone builds and ruleset compiles and loads."""

    def __init__(self) -> None:
        self.zones = 0
        self.compiles = 0
        self.loads: list[str] = []


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Work:
    counts = Work()
    build_zone, nft_ruleset = dns.build_zone, acl.nft_ruleset

    def counted_zone(*args: Any) -> dns.Zone:
        counts.zones += 1
        return build_zone(*args)

    def counted_ruleset(*args: Any) -> str:
        counts.compiles += 1
        return nft_ruleset(*args)

    async def load(ruleset: str) -> None:
        counts.loads.append(ruleset)

    monkeypatch.setattr(dns, "build_zone", counted_zone)
    monkeypatch.setattr(acl, "nft_ruleset", counted_ruleset)
    monkeypatch.setattr(firewall, "apply", load)
    # The host resolver is left alone. The DNS server cannot bind (its overlay address
    # exists nowhere here): a retry after each change, which must not rebuild the zone.
    monkeypatch.setenv("CLADNET_DNS", "off")
    return counts


async def _running(tmp_path: Path, held: int) -> tuple[NetworkAgent, Any, asyncio.Task[None]]:
    agent, feed = await make_agent(tmp_path, held, Timing(coalesce=0.01, keepalive_delay=0.01))
    agent.m.policy = POLICY
    sync = asyncio.create_task(agent.sync_loop())
    await _settle(agent, lambda: len(agent.backend.peers) == held)  # type: ignore[attr-defined]
    return agent, feed, sync


async def _settle(agent: NetworkAgent, done: Any = lambda: True) -> None:
    for _ in range(200):
        tasks = [agent._apply_task, agent._deferred]
        idle = not agent._changed and all(t is None or t.done() for t in tasks)
        if idle and done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the agent did not settle")


async def _stop(sync: asyncio.Task[None]) -> None:
    sync.cancel()
    await asyncio.gather(sync, return_exceptions=True)


async def test_an_endpoint_change_rebuilds_no_zone_and_loads_no_filter(
    tmp_path: Path, work: Work
) -> None:
    agent, feed, sync = await _running(tmp_path, 50)
    backend: MemoryBackend = agent.backend  # type: ignore[assignment]
    try:
        assert work.zones >= 1 and len(work.loads) == 1, "the listing named and filtered"
        zones, compiles = work.zones, work.compiles
        for step in range(5):
            moved = {**peer(20), "public_address": f"203.0.113.{step + 1}"}
            feed.send("MODIFIED", moved)
            await _settle(agent, lambda m=moved: _endpoint_of(backend, m) is not None)
        assert (work.zones, work.compiles, len(work.loads)) == (zones, compiles, 1)
    finally:
        await _stop(sync)


async def test_a_rename_an_add_and_a_removal_rebuild_names_and_filter(
    tmp_path: Path, work: Work
) -> None:
    agent, feed, sync = await _running(tmp_path, 20)
    backend: MemoryBackend = agent.backend  # type: ignore[assignment]
    names = agent.names
    try:
        zones, compiles = work.zones, work.compiles
        feed.send("MODIFIED", {**peer(5), "name": "renamed"})
        await _settle(agent, lambda: names.zone is not None and _named(names, "renamed"))
        assert (work.zones, work.compiles) == (zones + 1, compiles + 1)

        feed.send("ADDED", peer(100))
        await _settle(agent, lambda: _named(names, "vm100"))
        assert "10.80.0.100" in work.loads[-1], "the new peer's address is in the filter"
        assert (work.zones, work.compiles) == (zones + 2, compiles + 2)

        feed.queue.put_nowait(
            (0.0, {"type": "DELETED", "revision": feed.revision + 1, "id": peer(100)["id"]})
        )
        await _settle(agent, lambda: not _named(names, "vm100"))
        assert "10.80.0.100" not in work.loads[-1]
        assert (work.zones, work.compiles) == (zones + 3, compiles + 3)
        assert len(backend.peers) == 20
    finally:
        await _stop(sync)


def _named(names: Names, host: str) -> bool:
    assert names.zone is not None
    return f"{host}.{names.zone.domain}" in names.zone.names()


def _endpoint_of(backend: MemoryBackend, record: dict[str, Any]) -> str | None:
    config = backend.peers.get(str(record["public_key"]))
    want = str(record["public_address"])
    return config.endpoint if config and config.endpoint and want in config.endpoint else None


async def test_the_periodic_full_reconcile_runs_off_the_event_path(
    tmp_path: Path, work: Work
) -> None:
    agent, feed, sync = await _running(tmp_path, 30)
    backend: MemoryBackend = agent.backend  # type: ignore[assignment]
    agent.timing.full_resync = 0.2
    try:
        await asyncio.sleep(0.3)  # a full reconcile is due
        reads = backend.gets
        moved = {**peer(10), "public_address": "203.0.113.10"}
        feed.send("MODIFIED", moved)
        await _settle(agent, lambda: _endpoint_of(backend, moved) is not None)
        assert backend.gets == reads, "the event was applied without reading the device"
        resync = asyncio.create_task(agent.resync_loop())
        await _settle(agent, lambda: backend.gets > reads)
        resync.cancel()
        await asyncio.gather(resync, return_exceptions=True)
    finally:
        await _stop(sync)
