"""An agent never destroys itself on an ambiguous answer.

A controller started on an empty or restored etcd, or behind a wrong URL, answers
401/404 for hosts that are alive: the agent keeps its tunnels, keys and state, says
so once (log line, gauge, ``status``) and follows the controller again when it knows
the host again. Only the host's own DELETED event in its authenticated watch, or
``cladnet-agent leave``, tears it down.

The decision logic runs without root on fakes; the fleet-level behaviour on real
agents (namespaces, wireguard-go), a real controller and real etcds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.daemon import NetworkAgent, Timing
from agent.metrics.reporter import MetricsReporter
from agent.standing import OK, REFUSED, UNREACHABLE, UNRECOGNISED, Standing, classify
from agent.state import StateDir
from cladnet.api_client import ApiClientError
from lab.agents import Agent, full_mesh
from lab.api import make_network, make_token
from lab.components import Controller, Etcd, free_port, wait_until
from lab.netns import Lab
from lab.peers import host, membership

# --- the decision logic (no root) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "state"),
    [
        (ApiClientError(401, "unauthorized", "invalid token"), UNRECOGNISED),
        (ApiClientError(404, "network_not_found", "gone"), UNRECOGNISED),
        (ApiClientError(404, "not_found", "wrong URL"), UNRECOGNISED),
        (ApiClientError(403, "forbidden", "not a member"), UNRECOGNISED),
        (ApiClientError(429, "rate_limited", ""), UNREACHABLE),
        (ApiClientError(503, "etcd_unavailable", ""), UNREACHABLE),
        (ApiClientError(500, "internal", ""), UNREACHABLE),
        (ApiClientError(422, "invalid_request", ""), REFUSED),
        (httpx.ConnectError("refused"), UNREACHABLE),
        (httpx.ReadTimeout("slow"), UNREACHABLE),
    ],
)
def test_error_answers_map_to_a_standing_never_to_removal(exc: Exception, state: str) -> None:
    assert classify(exc) == state


def test_standing_changes_once_per_change_not_per_retry() -> None:
    changes: list[tuple[str, str]] = []
    s = Standing(lambda old, new, _: changes.append((old, new)), clock=lambda: 5.0)
    for _ in range(10):  # retries in the same state: nothing new to say
        s.failed("watch", ApiClientError(401, "unauthorized", ""))
    s.failed("heartbeat", ApiClientError(404, "host_not_found", ""))
    assert changes == [(OK, UNRECOGNISED)] and s.since == 5.0
    # The worst channel wins: the watch answering again is not enough …
    s.ok("watch")
    assert s.state == UNRECOGNISED and s.gauges()["agent_controller_unrecognised"] == 1
    # … both must.
    s.ok("heartbeat")
    assert changes[-1] == (UNRECOGNISED, OK) and s.gauges()["agent_controller_unrecognised"] == 0
    s.failed("watch", httpx.ConnectError("refused"))
    assert changes[-1] == (OK, UNREACHABLE) and s.gauges()["agent_controller_unreachable"] == 1
    # A restart resumes from the saved standing (an unknown one reads as ok).
    assert Standing(lambda *_: None, UNRECOGNISED, since=1.0).since == 1.0
    assert Standing(lambda *_: None, "bogus").state == OK


def test_the_gauges_go_out_with_every_batch(tmp_path: Path) -> None:
    async def device() -> Any:
        raise AssertionError("not read by build()")

    s = Standing(lambda *_: None, UNRECOGNISED)
    reporter = MetricsReporter(
        network="n",
        host="vm1",
        host_id="h-1",
        overlay_ip="10.0.0.1",
        spool_dir=tmp_path,
        interval=2.0,
        device=device,
        peers=dict,
        gauges=s.gauges,
    )
    samples = {name: value for name, _, value in reporter.build(time.time()).samples}
    assert samples["agent_controller_unrecognised"] == 1.0
    assert samples["agent_controller_unreachable"] == 0.0


class FakeController:
    """Scripted answers for list and watch; an exception in a script is raised."""

    def __init__(self, lists: list[Any], watches: list[Any]) -> None:
        self.lists, self.watches = lists, watches
        self.listed = 0

    async def list_peers_and_policy(
        self, network_id: str
    ) -> tuple[list[dict[str, Any]], int, dict[str, Any] | None]:
        self.listed += 1
        answer = self.lists.pop(0) if self.lists else ([host(1), host(2)], 20)
        if isinstance(answer, Exception):
            raise answer
        return (*answer, None)  # no policy

    async def watch_peers(self, network_id: str, since: int) -> AsyncIterator[dict[str, Any]]:
        answer = self.watches.pop(0) if self.watches else None
        if isinstance(answer, Exception):
            raise answer
        for event in answer or []:
            yield event
        if answer is None:
            await asyncio.Event().wait()  # an open stream with nothing to say

    async def close(self) -> None:
        pass


class FakeBackend:
    def __init__(self) -> None:
        self.destroyed: list[str] = []

    async def destroy(self, iface: str) -> None:
        self.destroyed.append(iface)


def fake_agent(tmp_path: Path, controller: FakeController) -> tuple[NetworkAgent, FakeBackend]:
    m = membership()
    states = StateDir(tmp_path)
    states.save_secrets(m.network_id, "clh_x.y", "private-key")
    states.save(m)
    backend = FakeBackend()
    timing = Timing(backoff_min=0.001, backoff_max=0.01)
    agent = NetworkAgent(states, m, "clh_x.y", "private-key", backend, timing)  # type: ignore[arg-type]
    agent.client = controller  # type: ignore[assignment]

    async def nothing(*_: Any, **__: Any) -> None:
        await asyncio.Event().wait()

    async def reconcile(force_endpoints: bool = False) -> None:
        pass

    # The device, addresses and metrics need root and are tested elsewhere.
    agent.reconcile = reconcile  # type: ignore[method-assign]
    agent.address_loop = nothing  # type: ignore[method-assign]
    agent.metrics_loop = nothing  # type: ignore[method-assign]
    return agent, backend


def _said(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


async def test_ambiguous_answers_keep_everything_and_resume(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="cladnet.agent")
    unknown = [
        ApiClientError(401, "unauthorized", "invalid token"),  # an empty etcd
        ApiClientError(404, "network_not_found", "network 'n-1' does not exist"),
        ApiClientError(404, "not_found", "Not Found"),  # a wrong URL
        ([host(2)], 3),  # a restored etcd that predates this host
    ]
    controller = FakeController(
        lists=[*unknown, ([host(1), host(2)], 20)],
        watches=[
            ApiClientError(503, "etcd_unavailable", ""),
            [{"type": "ADDED", "revision": 21, "peer": host(3)}],
        ],
    )
    agent, backend = fake_agent(tmp_path, controller)
    run = asyncio.create_task(agent.run())
    try:
        await _until(lambda: "h-3" in agent.m.peers)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    assert not agent.removed.is_set() and backend.destroyed == []
    net = tmp_path / "networks" / "n-1"
    assert (net / "private.key").read_text().strip() == "private-key"
    assert (net / "credential").exists() and (net / "membership.json").exists()
    # It listed again after each unrecognised answer, and followed the watch after.
    assert controller.listed == 5 and agent.m.revision == 21
    # One line per change of standing, not one per retry.
    assert _said(caplog, "does not recognise this host") == 1
    assert _said(caplog, "controller not available") == 1
    assert _said(caplog, "controller answers again") == 2
    assert agent.standing.state == OK
    saved = json.loads((net / "membership.json").read_text())
    assert saved["controller_state"] == OK and saved["controller_state_since"] is not None


async def test_own_deleted_event_tears_down(tmp_path) -> None:
    controller = FakeController(
        lists=[],
        watches=[[{"type": "DELETED", "revision": 30, "id": "h-1"}]],
    )
    agent, backend = fake_agent(tmp_path, controller)
    await asyncio.wait_for(agent.run(), 10)
    assert agent.removed.is_set() and backend.destroyed == ["cl-test"]
    assert not (tmp_path / "networks" / "n-1").exists()


async def _until(predicate: Any) -> None:
    for _ in range(1000):  # 10 s
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("condition not met")


# --- real agents, a real controller, real etcds (root) -----------------------------------


# Retries are capped at Timing.backoff_max (30 s ±20 %): four caps is generous.
RESUME_TIMEOUT = 4 * Timing().backoff_max


def _status(agent: Agent) -> dict[str, Any]:
    r = agent.lab.run(
        agent.ns,
        sys.executable,
        "-m",
        "agent.main",
        "--log-level",
        "error",
        "status",
        "--state-dir",
        str(agent.state_dir),
    )
    (network,) = json.loads(r.stdout)
    return network


def _secrets(agent: Agent) -> dict[str, str]:
    net = next(agent.state_dir.glob("networks/*"))
    return {name: (net / name).read_text() for name in ("private.key", "credential")}


def _gauge(url: str) -> float | None:
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("agent_controller_unrecognised{"):
            return float(line.split()[1])
    return None


def _intact(agent: Agent) -> bool:
    """Running, with its interface and state; fails the test at once otherwise."""
    running = agent.proc is not None and agent.proc.poll() is None
    has_state = agent.membership() is not None
    link = agent.lab.run(agent.ns, "ip", "link", "show", agent.interface, check=False)
    assert running and has_state and link.returncode == 0, (
        f"vm{agent.index} tore itself down\n{agent.log_text()}"
    )
    return True


def _log_count(agent: Agent, text: str) -> int:
    return sum(text in line for p in agent.logs for line in p.read_text().splitlines())


@pytest.mark.root
def test_controller_on_an_empty_etcd_tears_nothing_down(
    mesh_controller: Controller, etcd: Etcd, agents, lab: Lab, tmp_path: Path
) -> None:
    with mesh_controller.client() as admin:
        make_network(admin, "mesh", cidr="10.216.0.0/24", keepalive=5, metrics_interval=1)
        token = make_token(admin, "mesh")
    hosts = agents(2)
    port = free_port()
    metrics = f"http://{lab.address(1)}:{port}/metrics"
    hosts[0].join(mesh_controller.url, token, "--metrics-listen", f"{lab.address(1)}:{port}")
    hosts[1].join(mesh_controller.url, token)
    full_mesh(hosts)
    ips = {a.index: a.overlay_ip() for a in hosts}
    secrets = {a.index: _secrets(a) for a in hosts}
    assert all(_status(a)["controller"] == "ok" for a in hosts)
    wait_until(lambda: _gauge(metrics) == 0.0, 30, what="the gauge at 0")

    # The controller comes back on an EMPTY etcd (a wrong or wiped cluster).
    empty = Etcd.serving(tmp_path / "etcd-empty")
    original = mesh_controller.etcd_url
    try:
        empty.start()
        mesh_controller.stop()
        mesh_controller.etcd_url = empty.url
        mesh_controller.start()
        for a in hosts:
            wait_until(
                lambda a=a: _intact(a) and _status(a)["controller"] == "unrecognised",
                RESUME_TIMEOUT,
                what=f"vm{a.index} to report it is not recognised",
            )
        wait_until(lambda: _gauge(metrics) == 1.0, 30, what="the gauge at 1")
        # A while of retries (the backoff doubles from 0.5 s): the overlay keeps working.
        until = time.monotonic() + 20
        while time.monotonic() < until:
            for a, b in ((hosts[0], hosts[1]), (hosts[1], hosts[0])):
                assert lab.ping(a.ns, ips[b.index], count=1, wait=2) or lab.ping(
                    a.ns, ips[b.index], count=2, wait=2
                ), f"vm{a.index} -> vm{b.index}\n{a.log_text()}"
            time.sleep(2)
        for a in hosts:
            assert a.proc is not None and a.proc.poll() is None, a.log_text()
            assert _secrets(a) == secrets[a.index]  # keys and credential untouched
            assert len(a.wg_peers()) == 1 and a.membership() is not None
            # Many retries, one line.
            assert _log_count(a, "watch failed") >= 3, a.log_text()
            assert _log_count(a, "does not recognise this host") == 1, a.log_text()

        # Restored: the controller is back on the original etcd.
        mesh_controller.stop()
        mesh_controller.etcd_url = original
        mesh_controller.start()
    finally:
        empty.stop()
    for a in hosts:
        wait_until(
            lambda a=a: _status(a)["controller"] == "ok",
            RESUME_TIMEOUT,
            what=f"vm{a.index} to be recognised again",
        )
    wait_until(lambda: _gauge(metrics) == 0.0, 30, what="the gauge back at 0")
    # They follow the controller again: a new host appears on both.
    new = agents(3)[-1]
    new.join(mesh_controller.url, token)
    full_mesh([*hosts, new], timeout=RESUME_TIMEOUT)
    for a in hosts:
        assert _log_count(a, "controller answers again") >= 1, a.log_text()


@pytest.mark.root
def test_an_authenticated_removal_tears_down(mesh_controller: Controller, agents, lab) -> None:
    with mesh_controller.client() as admin:
        make_network(admin, "mesh", cidr="10.217.0.0/24", keepalive=5)
        token = make_token(admin, "mesh")
    hosts = agents(2)
    for a in hosts:
        a.join(mesh_controller.url, token)
    full_mesh(hosts)
    keep, gone = hosts
    host_id = (gone.membership() or {})["host_id"]
    # The admin removes the host: its own DELETED event reaches its watch.
    with mesh_controller.client() as admin:
        assert admin.delete(f"/v1/hosts/{host_id}").status_code == 200
    assert gone.proc is not None
    assert gone.proc.wait(30) == 0, gone.log_text()
    assert lab.run(gone.ns, "ip", "link", "show", gone.interface, check=False).returncode != 0
    assert list(gone.state_dir.glob("networks/*")) == []
    wait_until(lambda: keep.wg_peers() == {}, 20, what="vm1 to drop the removed host")
    assert _log_count(gone, "this host was removed from the network") == 1
