"""An agent's cost per change: watch events coalesced, the device diffed per changed
peer, the state saved at a bounded rate (no root, in-memory device and controller)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.daemon import Timing
from agent.state import StateDir
from bench.agent_scale import MemoryBackend, make_agent, peer
from cladnet import mesh
from lab.peers import NETWORK, host, key

# --- the pure incremental path ---------------------------------------------------------


def _random_peer(rng: random.Random, n: int) -> dict[str, Any]:
    """Host ``n`` with, sometimes, another's address or key, or a broken key."""
    fields: dict[str, Any] = {}
    roll = rng.random()
    if roll < 0.2:
        fields["overlay_ip"] = f"10.77.0.{rng.randint(2, 12)}"
    elif roll < 0.35:
        fields["public_key"] = key(rng.randint(2, 12))
    elif roll < 0.4:
        fields["public_key"] = "not a key"
    if rng.random() < 0.3:
        fields["public_address"] = f"203.0.113.{rng.randint(1, 9)}"
    return host(n, **fields)


def test_incremental_plans_equal_the_full_plan_through_conflicting_changes() -> None:
    rng = random.Random(13)
    me = host(1)
    peers: dict[str, dict[str, Any]] = {}
    index = mesh.ConflictIndex()
    applied: dict[str, mesh.PeerConfig] = {}
    device: dict[str, mesh.PeerConfig] = {}  # by key, as a device would hold them
    for _ in range(400):
        n = rng.randint(2, 12)
        pid = f"h-{n}"
        if pid in peers and rng.random() < 0.3:
            del peers[pid]
        else:
            peers[pid] = _random_peer(rng, n)
        affected = index.update(peers, {pid})
        planned = mesh.plan_peers(NETWORK, me, [peers[p] for p in affected if p in peers])
        before = {p: applied.pop(p) for p in affected if p in applied}
        applied.update(planned.configs)
        changes = mesh.diff_plans(before, planned.configs)
        for k in changes.peers_to_remove:
            del device[k]
        for config in changes.peers_to_add:
            device[config.public_key] = config
        for k, u in changes.peers_to_update.items():
            device[k] = mesh.PeerConfig(
                public_key=k,
                allowed_ips=u.allowed_ips or device[k].allowed_ips,
                endpoint=u.endpoint or device[k].endpoint,
                keepalive=device[k].keepalive if u.keepalive is None else u.keepalive,
            )
        full = mesh.plan(NETWORK, me, list(peers.values()))
        # A planned endpoint of None leaves the device's as it is (as mesh.diff does).
        assert device == {
            k: c if c.endpoint is not None else replace(c, endpoint=device[k].endpoint)
            for k, c in full.peers.items()
            if k in device
        }
        assert device.keys() == full.peers.keys()
        assert applied == {p: full.peers[k] for p, k in full.ids.items()}


def test_a_change_plans_only_the_peers_it_can_displace() -> None:
    peers = {f"h-{n}": host(n) for n in range(2, 50)}
    index = mesh.ConflictIndex()
    index.rebuild(peers)
    peers["h-7"] = host(7, public_address="203.0.113.7")
    assert index.update(peers, {"h-7"}) == {"h-7"}
    # h-8 takes h-3's address: h-3 (first by id) keeps it, h-8 is left out …
    peers["h-8"] = host(8, overlay_ip="10.77.0.3")
    assert index.update(peers, {"h-8"}) == {"h-3", "h-8"}
    # … until h-3 leaves: both are planned again, and h-8 gets the address.
    del peers["h-3"]
    assert index.update(peers, {"h-3"}) == {"h-3", "h-8"}
    planned = mesh.plan_peers(NETWORK, host(1), [peers["h-8"]])
    assert planned.configs["h-8"].allowed_ips == ("10.77.0.3/32",)


def test_diff_plans_keeps_a_roamed_endpoint_and_defers_low_keepalives() -> None:
    me = host(200)
    a = mesh.plan_peers(NETWORK, me, [host(2, public_address="203.0.113.2")]).configs
    changes = mesh.diff_plans({}, a, own_key=key(200))
    assert [p.keepalive for p in changes.peers_to_add] == [0]
    assert changes.keepalive_deferred == (key(2),)
    # Same plan again: nothing, whatever endpoint the device roamed to meanwhile.
    assert not mesh.diff_plans(a, a, own_key=key(200))
    b = mesh.plan_peers(NETWORK, me, [host(2, public_address="203.0.113.9")]).configs
    assert mesh.diff_plans(a, b).peers_to_update[key(2)].fields() == ["endpoint"]


# --- the agent -----------------------------------------------------------------------------


async def _settle(agent: Any) -> None:
    for _ in range(200):
        tasks = [agent._apply_task, agent._deferred]
        if not agent._changed and all(t is None or t.done() for t in tasks):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the agent did not settle")


async def test_a_burst_of_joins_costs_a_few_device_reads_and_saves(tmp_path: Path) -> None:
    agent, feed = await make_agent(tmp_path, 100, Timing(save_every=30, keepalive_delay=0.05))
    backend: MemoryBackend = agent.backend  # type: ignore[assignment]
    saves: list[int] = []
    save = agent.states.save
    agent.states.save = lambda m: (saves.append(len(m.peers)), save(m))[1]  # type: ignore[method-assign]
    appended: list[int] = []  # peers per incremental save
    save_changes = agent.states.save_changes
    agent.states.save_changes = lambda m, c: (appended.append(len(c)), save_changes(m, c))[1]  # type: ignore[method-assign]
    sync = asyncio.create_task(agent.sync_loop())
    try:
        for _ in range(100):
            if len(backend.peers) == 100:
                break
            await asyncio.sleep(0.05)
        assert len(backend.peers) == 100 and saves == [100]
        reads, applies = backend.gets, backend.applies
        for n in range(102, 302):
            feed.send("ADDED", peer(n))
        await asyncio.sleep(0.3)
        await _settle(agent)
        assert len(backend.peers) == 300
        # Per event it was one device read, one apply and one save each (200 of each).
        assert backend.gets == reads, "the burst was applied without reading the device"
        assert backend.applies - applies < 20
        assert len(saves) == 1, "no save before save_every has passed"
        # The trailing save: only the changed peers written, every peer loaded, at the
        # revision of the last event.
        agent.timing.save_every = 0
        agent._save_task.cancel()  # type: ignore[union-attr]
        feed.send("MODIFIED", peer(150))
        await asyncio.sleep(0.2)
        await _settle(agent)
        assert saves == [100] and appended == [200]  # the joins (150 among them)
        agent.states.save_secrets(NETWORK_ID, "clh_x.y", "unused")
        stored = StateDir(tmp_path).load(NETWORK_ID)[0]
        assert len(stored.peers) == 300 and stored.revision == feed.revision
    finally:
        sync.cancel()
        await asyncio.gather(sync, return_exceptions=True)


async def test_a_failed_apply_is_retried_with_a_full_reconcile(tmp_path: Path) -> None:
    agent, feed = await make_agent(tmp_path, 10, Timing(backoff_min=0.05, keepalive_delay=0.05))
    backend: MemoryBackend = agent.backend  # type: ignore[assignment]
    sync = asyncio.create_task(agent.sync_loop())
    try:
        await asyncio.sleep(0.2)
        await _settle(agent)
        real_apply, failures = backend.apply, [1]

        async def flaky(name: str, changes: Any, private_key: str | None = None) -> None:
            from agent.wireguard.backend import WireGuardError

            if failures:
                failures.pop()
                raise WireGuardError("device busy")
            await real_apply(name, changes, private_key)

        backend.apply = flaky  # type: ignore[method-assign]
        reads = backend.gets
        feed.send("ADDED", peer(50))
        await asyncio.sleep(0.5)
        await _settle(agent)
        assert key_of(50) in backend.peers
        assert backend.gets > reads, "after a failure the device is read whole again"
    finally:
        sync.cancel()
        await asyncio.gather(sync, return_exceptions=True)


NETWORK_ID = "n-bench"


def key_of(n: int) -> str:
    return str(peer(n)["public_key"])
