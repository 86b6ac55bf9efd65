"""The agent's handling of watch events, including malformed and hostile ones (no root)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import NetworkAgent
from agent.state import StateDir
from lab.peers import host, membership
from tests.support import until


@pytest.fixture
async def agent(tmp_path: Path):
    m = membership()
    a = NetworkAgent(StateDir(tmp_path), m, "clh_x.y", "unused", backend=None)  # type: ignore[arg-type]
    yield a
    await a.client.close()


@pytest.mark.parametrize(
    "event",
    [
        "a string",
        ["a", "list"],
        {},
        {"type": "ADDED"},  # no revision, no peer
        {"type": "ADDED", "revision": 11, "peer": "h-9"},
        {"type": "ADDED", "revision": 11, "peer": {"name": "no id"}},
        {"type": "EXPLODED", "revision": 11},
        {"type": "DELETED", "revision": "eleven", "id": "h-2"},
        {"type": "DELETED", "revision": 11},
    ],
)
async def test_malformed_events_are_counted_and_change_nothing(agent, event: Any) -> None:
    assert agent._on_event(event) is False
    assert agent.bad_input == 1
    assert list(agent.m.peers) == ["h-2"]
    assert not agent.removed.is_set()


async def test_valid_events_change_the_view(agent) -> None:
    assert agent._on_event({"type": "ADDED", "revision": 11, "peer": host(3)}) is True
    assert agent._on_event({"type": "BOOKMARK", "revision": 12}) is False
    assert agent._on_event({"type": "DELETED", "revision": 13, "id": "h-2"}) is True
    assert list(agent.m.peers) == ["h-3"] and agent.m.revision == 13
    assert agent._on_event({"type": "DELETED", "revision": 14, "id": "h-1"}) is False
    assert agent.removed.is_set()


async def test_a_moved_nat_reconnects_and_resumes_the_watch(agent, monkeypatch) -> None:
    """The heartbeat says the controller sees this host at another address (its NAT
    moved): the device's endpoints are re-sent, and the watch, whose connection died
    with the NAT's mappings, is opened again (it resumes from the saved revision)."""
    calls: list[str] = []

    class Client:
        async def heartbeat(self, host_id: str, addresses: list[str]) -> dict[str, Any]:
            calls.append("heartbeat")
            return {"changed": True, "observed_address": "203.0.113.9"}

        async def reconnect(self) -> None:
            calls.append("reconnect")

        async def close(self) -> None:
            pass

    class Events:
        async def wait(self, seconds: float) -> None:
            await asyncio.sleep(0.01)

    async def addresses() -> list[str]:
        return ["192.168.1.10/24"]

    async def reconcile(force_endpoints: bool = False) -> None:
        calls.append(f"reconcile force={force_endpoints}")

    agent.client = Client()
    monkeypatch.setattr(agent, "_local_addresses", addresses)
    monkeypatch.setattr(agent, "reconcile", reconcile)
    monkeypatch.setattr(agent, "_restart_sync", lambda: calls.append("watch restarted"))
    task = asyncio.create_task(agent._follow_addresses(Events()))
    await until(lambda: "watch restarted" in calls, 5, "the watch to restart")
    agent.removed.set()
    await task
    assert calls == ["heartbeat", "reconcile force=True", "reconnect", "watch restarted"]


async def test_heartbeats_come_sooner_after_the_nat_moved(agent, monkeypatch) -> None:
    """After the controller saw this host at a new address, the next heartbeats come
    after 1x, 2x, 4x … ``recheck_after_move`` up to the usual interval: a move back to
    an address the peers' NATs still accept is noticed even though no peer goes silent."""
    from agent.daemon import Timing

    agent.timing = Timing(heartbeat=0.8, recheck_after_move=0.1, address_poll=10)
    replies = iter([True] + [False] * 5)
    waits: list[float] = []  # the wait asked for right after each heartbeat
    beats: list[int] = []

    class Client:
        async def heartbeat(self, host_id: str, addresses: list[str]) -> dict[str, Any]:
            beats.append(len(beats))
            changed = next(replies, False)
            return {"changed": changed, "observed_address": "203.0.113.9"}

        async def reconnect(self) -> None:
            pass

        async def close(self) -> None:
            pass

    class Events:
        async def wait(self, seconds: float) -> None:
            if len(waits) < len(beats):
                waits.append(seconds)
            await asyncio.sleep(seconds)

    async def addresses() -> list[str]:
        return ["192.168.1.10/24"]

    async def reconcile(force_endpoints: bool = False) -> None:
        pass

    agent.client = Client()
    monkeypatch.setattr(agent, "_local_addresses", addresses)
    monkeypatch.setattr(agent, "reconcile", reconcile)
    monkeypatch.setattr(agent, "_restart_sync", lambda: None)
    task = asyncio.create_task(agent._follow_addresses(Events()))
    await until(lambda: len(waits) >= 5, 10, "five heartbeats")
    agent.removed.set()
    await task
    assert [round(w, 1) for w in waits[:5]] == [0.1, 0.2, 0.4, 0.8, 0.8]
