"""Metrics end to end with real components: Mosquitto (dynamic security), the
controller issuing per-host broker users, the collector process and its API."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import aiomqtt
import httpx
import pytest

from agent.metrics.exposition import MetricsServer
from agent.metrics.publisher import Broker
from agent.metrics.reporter import MetricsReporter
from cladnet.metrics import Batch
from lab.api import join, make_network, make_token
from lab.components import (
    MQTT_COLLECTOR_PASSWORD,
    Collector,
    Controller,
    Mosquitto,
    Victoria,
    free_port,
)
from lab.monitoring import host_credentials, publish
from tests.support import no_device, until


async def _collect(broker: Mosquitto, received: list[tuple[str, bytes]], ready: asyncio.Event):
    async with aiomqtt.Client(
        broker.host, broker.port, username="cladnet-collector", password=MQTT_COLLECTOR_PASSWORD
    ) as client:
        await client.subscribe("cladnet/metrics/#", qos=1)
        ready.set()
        async for message in client.messages:
            received.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]


async def test_a_host_may_publish_only_to_its_own_topic(
    metrics_controller: Controller, mosquitto: Mosquitto
) -> None:
    with metrics_controller.client() as admin:
        make_network(admin, "mon", cidr="10.220.0.0/24", metrics_interval=5)
    vm1, creds1 = host_credentials(metrics_controller, "mon", "vm1")
    _, creds2 = host_credentials(metrics_controller, "mon", "vm2")
    assert creds1["topic"] == "cladnet/metrics/mon/vm1"
    assert creds1["broker"] == mosquitto.url and creds1["interval"] == 5
    assert creds1["password"] != creds2["password"]

    received: list[tuple[str, bytes]] = []
    ready = asyncio.Event()
    listener = asyncio.create_task(_collect(mosquitto, received, ready))
    await asyncio.wait_for(ready.wait(), 10)
    await publish(mosquitto, creds1, "cladnet/metrics/mon/vm1", b"mine")
    # vm1 pretending to be vm2, or writing elsewhere: the broker drops it.
    for topic in ("cladnet/metrics/mon/vm2", "cladnet/metrics/mon/vm1/x", "other"):
        try:
            await publish(mosquitto, creds1, topic, b"forged")
        except aiomqtt.MqttError:
            pass  # refused outright is fine too
    await publish(mosquitto, creds2, "cladnet/metrics/mon/vm2", b"vm2's own")
    await asyncio.sleep(0.5)
    listener.cancel()
    assert sorted(received) == [
        ("cladnet/metrics/mon/vm1", b"mine"),
        ("cladnet/metrics/mon/vm2", b"vm2's own"),
    ]
    # A wrong password or no user at all cannot connect.
    for bad in ({**creds1, "password": "wrong"}, {"username": None, "password": None}):
        with pytest.raises(aiomqtt.MqttError):
            await publish(mosquitto, bad, "cladnet/metrics/mon/vm1", b"x")
    # Asking again rotates the password; the old one stops working. Leaving removes the user.
    with metrics_controller.client(token=vm1["credential"]) as host:
        rotated = host.post(f"/v1/hosts/{vm1['host_id']}/metrics-credentials").json()
        with pytest.raises(aiomqtt.MqttError):
            await publish(mosquitto, creds1, creds1["topic"], b"old password")
        await publish(mosquitto, rotated, rotated["topic"], b"new password")
        assert host.delete(f"/v1/hosts/{vm1['host_id']}").status_code == 200
    with pytest.raises(aiomqtt.MqttError):
        await publish(mosquitto, rotated, rotated["topic"], b"after leaving")


def test_metrics_credentials_need_the_hosts_own_credential(
    metrics_controller: Controller,
) -> None:
    with metrics_controller.client() as admin:
        make_network(admin, "mon", cidr="10.221.0.0/24")
    vm1, _ = host_credentials(metrics_controller, "mon", "vm1")
    vm2, _ = host_credentials(metrics_controller, "mon", "vm2")
    with metrics_controller.client(token=vm2["credential"]) as other:
        r = other.post(f"/v1/hosts/{vm1['host_id']}/metrics-credentials")
    assert r.status_code == 403, r.text
    with metrics_controller.client(token=None) as anonymous:
        r = anonymous.post(f"/v1/hosts/{vm1['host_id']}/metrics-credentials")
    assert r.status_code == 401 and r.json()["error"]


def test_without_a_broker_metrics_are_reported_as_disabled(controller: Controller) -> None:
    with controller.client() as admin:
        make_network(admin, "mon", cidr="10.222.0.0/24")
        token = make_token(admin, "mon")
    body = join(controller, token, "vm1").json()
    with controller.client(token=body["credential"]) as host:
        r = host.post(f"/v1/hosts/{body['host_id']}/metrics-credentials")
    assert r.status_code == 404 and r.json()["error"] == "metrics_disabled"


# --- the pipeline: agent reporter → broker → collector → API ------------------------------


def _reporter(creds: dict, host: dict, spool: Path, **kw) -> MetricsReporter:
    return MetricsReporter(
        network="mon",
        host=host["name"],
        host_id=host["host_id"],
        overlay_ip="127.0.0.1",  # the latency prober binds here; there are no peers
        spool_dir=spool,
        interval=1.0,
        device=no_device,
        peers=dict,
        broker=Broker(creds["broker"], creds["username"], creds["password"]),
        ack_topic=creds["ack_topic"],
        resend_after=3.0,
        **kw,
    )


def _ingest(collector: Collector) -> dict:
    with collector.client() as c:
        return c.get("/v1/ingest").json()


async def test_batches_reach_the_collector_and_survive_a_broker_outage(
    metrics_controller: Controller, mosquitto: Mosquitto, make_collector, tmp_path: Path
) -> None:
    with metrics_controller.client() as admin:
        make_network(admin, "mon", cidr="10.223.0.0/24", metrics_interval=1)
    host, creds = host_credentials(metrics_controller, "mon", "vm1")
    host["name"] = "vm1"
    collector = make_collector()
    reporter = _reporter(creds, host, tmp_path / "spool")
    task = asyncio.create_task(reporter.run())
    try:

        def latest() -> dict | None:
            with collector.client() as c:
                hosts = c.get("/v1/metrics/latest", params={"network": "mon"}).json()["hosts"]
            return hosts.get("vm1")

        vm1 = await until(latest, what="vm1's metrics in the collector")
        assert vm1["up"] is True and vm1["network"] == "mon"
        assert 0 <= vm1["metrics"]["cpu_usage_ratio"] <= 1
        assert vm1["metrics"]["memory_total_bytes"] > 0
        assert any(k.startswith('network_receive_bytes_total{interface="') for k in vm1["metrics"])

        # The broker goes away: batches wait on disk …
        mosquitto.stop()
        await until(lambda: len(reporter.spool) >= 3, what="batches to pile up in the spool")
        # … and arrive, in order and complete, when it returns.
        mosquitto.start()
        await until(lambda: len(reporter.spool) == 0, 30, what="the spool to drain")
        last_seq = reporter.spool._next_seq - 1
        await until(
            lambda: (
                _ingest(collector)["hosts"].get("mon/vm1", {}).get("highest_seq", -1) >= last_seq
            ),
            what="the collector to have every batch",
        )
        stats = _ingest(collector)["hosts"]["mon/vm1"]
        assert stats["gaps"] == 0 and stats["resets"] == 0, stats
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    last_seq = reporter.spool._next_seq - 1  # the last batch the first run made

    # The agent restarts with unsent batches on disk: numbering continues, nothing lost.
    mosquitto.stop()
    offline = _reporter(creds, host, tmp_path / "spool")
    unsent = offline.build(time.time())  # taken while the broker is away, never sent
    offline.spool.append(unsent.seq, unsent.encode())
    restarted = _reporter(creds, host, tmp_path / "spool")
    assert len(restarted.spool) == 1 and restarted.spool._next_seq == last_seq + 2
    mosquitto.start()
    task = asyncio.create_task(restarted.run())
    try:
        # The broker restarted and forgot the collector's shared subscription: what it
        # accepted before the collector came back is resent, as no collector acked it.
        def complete() -> bool:
            stats = _ingest(collector)["hosts"]["mon/vm1"]
            return stats["highest_seq"] >= last_seq + 3 and stats["gaps"] == 0

        await until(complete, 30, what="every batch after the restart")
        assert _ingest(collector)["hosts"]["mon/vm1"]["resets"] == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_batch_delivered_twice_is_stored_once(
    metrics_controller: Controller, mosquitto: Mosquitto, make_collector
) -> None:
    with metrics_controller.client() as admin:
        make_network(admin, "mon", cidr="10.224.0.0/24")
    _, creds = host_credentials(metrics_controller, "mon", "vm1")
    collector = make_collector()
    now = time.time()
    batch = Batch(network="mon", host="vm1", seq=0, ts=now - 5, interval=2.0)
    batch.add("load1", 0.5)
    for _ in range(2):
        await publish(mosquitto, creds, creds["topic"], batch.encode())
    later = Batch(network="mon", host="vm1", seq=1, ts=now - 3, interval=2.0)
    later.add("load1", 1.5)
    await publish(mosquitto, creds, creds["topic"], later.encode())

    def points() -> list:
        with collector.client() as c:
            return c.get(
                "/v1/series",
                params={"host": "vm1", "metric": "load1", "since": 60, "step": 1, "agg": "last"},
            ).json()["points"]

    await until(lambda: len(points()) >= 2, what="both batches stored")
    await asyncio.sleep(0.5)  # a stored duplicate would show up by now
    assert [v for _, v in points()] == [0.5, 1.5]
    counters = _ingest(collector)["counters"]
    assert counters["batches"] == 2 and counters["duplicates"] == 1


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    handler = type("Hook", (_Webhook,), {"received": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", handler.received
    server.shutdown()
    server.server_close()


@pytest.fixture
def smtp() -> Iterator[tuple[int, list]]:
    from aiosmtpd.controller import Controller as SmtpController

    class Handler:
        def __init__(self) -> None:
            self.messages: list = []

        async def handle_DATA(self, server, session, envelope) -> str:
            self.messages.append(envelope)
            return "250 OK"

    handler = Handler()
    port = free_port()
    ctl = SmtpController(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    yield port, handler.messages
    ctl.stop()


async def test_alarms_notify_once_per_episode_and_on_host_down(
    metrics_controller: Controller, mosquitto: Mosquitto, make_collector, webhook, smtp
) -> None:
    hook_url, posts = webhook
    smtp_port, mails = smtp
    with metrics_controller.client() as admin:
        make_network(admin, "mon", cidr="10.225.0.0/24")
    _, creds = host_credentials(metrics_controller, "mon", "vm1")
    collector = make_collector(
        "--webhook",
        hook_url,
        "--smtp-host",
        "127.0.0.1",
        "--smtp-port",
        str(smtp_port),
        "--smtp-to",
        "ops@example.org",
    )
    with collector.client() as c:
        r = c.post(
            "/v1/alarms",
            json={
                "name": "memory",
                "metric": "memory_usage_ratio",
                "network": "mon",
                "op": ">",
                "threshold": 0.5,
                "for_s": 1,
            },
        )
        assert r.status_code == 201, r.text
    start = time.time()
    for seq, value in enumerate([0.6, 0.7, 0.8, 0.9, 0.1, 0.2]):
        b = Batch(network="mon", host="vm1", seq=seq, ts=start + seq, interval=1.0)
        b.add("memory_usage_ratio", value)
        await publish(mosquitto, creds, creds["topic"], b.encode())
    memory = lambda: [p for p in posts if p["cladnet"]["rule_name"] == "memory"]  # noqa: E731
    await until(lambda: len(memory()) == 2, what="firing and resolved webhooks")
    assert [p["cladnet"]["state"] for p in memory()] == ["firing", "resolved"]
    assert "FIRING" in memory()[0]["text"] and "memory_usage_ratio" in memory()[0]["text"]
    # No more batches: the built-in host-down alarm fires, once.
    await until(
        lambda: any(p["cladnet"]["rule_id"] == "host_down" for p in posts), what="host down"
    )
    await asyncio.sleep(1.5)
    assert sum(p["cladnet"]["rule_id"] == "host_down" for p in posts) == 1
    with collector.client() as c:
        active = c.get("/v1/alarms").json()["alarms"]
    assert [a["rule_id"] for a in active] == ["host_down"]
    await until(lambda: len(mails) >= 3, what="alarm e-mails")
    assert all("ops@example.org" in m.rcpt_tos for m in mails)


def test_the_collector_api_needs_a_token_and_rejects_bad_input(make_collector) -> None:
    collector = make_collector()
    with httpx.Client(base_url=collector.url) as anonymous:
        r = anonymous.get("/v1/metrics/latest")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    with collector.client(token="wrong") as c:
        assert c.get("/v1/alarms").status_code == 401
    with collector.client() as c:
        bad_op = c.post(
            "/v1/alarms",
            json={
                "name": "x",
                "metric": "cpu_usage_ratio",
                "network": "n",
                "op": "=>",
                "threshold": 1,
            },
        )
        assert bad_op.status_code == 422 and "op" in bad_op.json()["message"]
        bad_agg = c.get("/v1/series", params={"host": "h", "metric": "m", "agg": "p99"})
        assert bad_agg.status_code == 422
        assert c.delete("/v1/alarms/r-nope").status_code == 404
        assert c.get("/v1/alarms").json()["rules"] == []
        assert c.get("/v1/hosts/nobody/latest").json()["error"] == "not_found"
        assert c.get("/v1/hosts/nobody/ingest").status_code == 404


async def test_collectors_in_one_group_share_the_batches(
    metrics_controller: Controller, mosquitto: Mosquitto, make_collector
) -> None:
    with metrics_controller.client() as admin:
        make_network(admin, "mon", cidr="10.226.0.0/24")
    hosts = [host_credentials(metrics_controller, "mon", f"vm{i}")[1] for i in range(4)]
    first, second = make_collector(), make_collector()
    await asyncio.sleep(0.5)
    now = time.time()
    for i, creds in enumerate(hosts):
        for seq in range(10):
            b = Batch(network="mon", host=f"vm{i}", seq=seq, ts=now + seq, interval=2.0)
            b.add("load1", 1.0)
            await publish(mosquitto, creds, creds["topic"], b.encode())
    counts = lambda: [_ingest(c)["counters"].get("batches", 0) for c in (first, second)]  # noqa: E731
    await until(lambda: sum(counts()) == 40, what="all 40 batches")
    assert all(n > 0 for n in counts()), counts()


async def test_the_agent_serves_prometheus_text(tmp_path: Path) -> None:
    server = MetricsServer("127.0.0.1", free_port())
    reporter = MetricsReporter(
        network="mon",
        host="vm1",
        host_id="h-1",
        overlay_ip="127.0.0.1",
        spool_dir=tmp_path / "spool",
        interval=1.0,
        device=no_device,
        peers=dict,
        server=server,
    )
    tasks = [asyncio.create_task(server.run()), asyncio.create_task(reporter.run())]
    try:
        async with httpx.AsyncClient() as http:

            async def scrape() -> str:
                for _ in range(50):
                    try:
                        r = await http.get(f"http://127.0.0.1:{server.port}/metrics")
                        if "cpu_usage_ratio" in r.text:
                            return r.text
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
                raise AssertionError("no metrics served")

            text = await scrape()
            assert 'memory_usage_ratio{network="mon",host="vm1"}' in text
            assert (await http.get(f"http://127.0.0.1:{server.port}/other")).status_code == 404
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(reporter.spool) == 0  # no broker: nothing is buffered for nobody


async def test_the_collector_stores_in_victoriametrics(
    metrics_controller: Controller, mosquitto: Mosquitto, make_collector, tmp_path: Path
) -> None:
    vm = Victoria(tmp_path / "vm", free_port())
    vm.start()
    try:
        with metrics_controller.client() as admin:
            make_network(admin, "mon", cidr="10.227.0.0/24")
        _, creds = host_credentials(metrics_controller, "mon", "vm1")
        collector = make_collector(store=f"victoria:{vm.url}")
        now = time.time()
        for seq in range(3):
            b = Batch(network="mon", host="vm1", seq=seq, ts=now - 3 + seq, interval=1.0)
            b.add("load1", float(seq))
            await publish(mosquitto, creds, creds["topic"], b.encode())

        def stored() -> float | None:
            httpx.get(f"{vm.url}/internal/force_flush", timeout=5)
            with collector.client() as c:
                hosts = c.get("/v1/metrics/latest", params={"network": "mon"}).json()["hosts"]
            return hosts.get("vm1", {}).get("metrics", {}).get("load1")

        assert await until(lambda: stored() == 2.0, what="the newest value from VictoriaMetrics")
    finally:
        vm.stop()
