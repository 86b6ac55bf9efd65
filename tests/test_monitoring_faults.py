"""The monitoring fault matrix: whatever fails, every batch is stored once, or its loss
is the spool's bound and is counted.

Real Mosquitto (plain and anonymous with no persistence, or the deploy config with
dynamic security, with or without persistence), the controller handing out the
broker settings, the collector process (SQLite, or VictoriaMetrics), and per host the
agent's real ``Spool`` + ``Publisher``, fed by a producer that works like
``MetricsReporter.run`` (take a sequence number, spool the encoded batch, wake the
publisher) but faster. The lanes run side by side, each with its own broker and
collector, so the minute-long outage sets the test's length.

Every check goes through the collector's API: ``/v1/hosts/{host}/ingest`` (highest
sequence number, gaps, resets), the stored series itself (one point per batch, in
order, none missing), and the ingest counters (each batch stored once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agent.metrics.publisher import Broker, Publisher
from agent.metrics.reporter import MetricsReporter
from agent.metrics.spool import Spool, SpoolLimits, spool_dir, spool_status
from agent.state import Membership, StateDir
from cladnet import metrics
from cladnet.tasks import cancel_and_wait
from controller.broker import BrokerAdmin
from lab.api import make_network
from lab.components import (
    MQTT_ADMIN_PASSWORD,
    REPO,
    Collector,
    Controller,
    Mosquitto,
    Victoria,
    free_port,
    wait_until,
)
from lab.monitoring import host_credentials
from tests.support import no_device, until

RATE = 5.0  # batches per second per host
AGENTS = 2  # hosts per lane
RESEND = 3.0  # the publisher's resend_after: short, so a lane recovers in seconds
# Batch timestamps are one second apart, so the series query shows each batch as its
# own point (the real time of a batch is irrelevant here).
T0 = time.time() - 4000


@dataclass
class PlainMosquitto(Mosquitto):
    """What many operators already run: ``allow_anonymous true``, no persistence."""

    def config(self) -> str:
        return (
            f"user {os.environ.get('USER', 'root')}\nlistener {self.port} {self.host}\n"
            "allow_anonymous true\npersistence false\n"
        )

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "mosquitto.conf"
        conf.write_text(self.config())
        self.log = self.data_dir / "mosquitto.log"
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=self.log.open("ab")
        )
        wait_until(self.listening, what="mosquitto to listen")


@dataclass
class BridgedMosquitto(PlainMosquitto):
    """Broker B of deploy/mosquitto/bridge.conf.example, as shipped: its hosts publish
    here; the bridge carries their batches to ``core`` (where the collector is) and the
    collector's acknowledgements back. ``core`` is anonymous, so no bridge user."""

    core: Mosquitto | None = None

    def config(self) -> str:
        assert self.core is not None
        example = (REPO / "deploy" / "mosquitto" / "bridge.conf.example").read_text()
        bridge = [
            line.replace("BROKER_A_HOST:BROKER_A_PORT", f"127.0.0.1:{self.core.port}")
            for line in example.splitlines()
            if not line.startswith(("remote_username", "remote_password"))
        ]
        return super().config() + "\n".join(bridge) + "\n"


class FastAgent:
    """One host's metrics path: the agent's spool and publisher, fed ``RATE`` times a second."""

    def __init__(
        self, network: str, name: str, creds: dict, spool_dir: Path, limits: SpoolLimits | None
    ) -> None:
        self.network, self.name, self.creds = network, name, creds
        self.spool = Spool(spool_dir, limits)
        self.publisher = Publisher(
            Broker(creds["broker"], creds["username"], creds["password"]),
            f"cladnet-{network}-{name}",
            creds["topic"],
            self.spool,
            ack_topic=creds["ack_topic"],
            resend_after=RESEND,
        )
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def produced(self) -> int:
        return self.spool._next_seq

    def spool_one(self) -> None:
        seq = self.spool.next_seq()
        batch = metrics.Batch(
            network=self.network, host=self.name, seq=seq, ts=T0 + seq, interval=1.0
        )
        batch.add("fault_test_seq", seq)
        batch.add("agent_spool_dropped_batches_total", self.spool.dropped)
        batch.sent = time.time()
        self.spool.append(seq, batch.encode())
        self.publisher.wake.set()

    async def _produce(self) -> None:
        while True:
            self.spool_one()
            await asyncio.sleep(1 / RATE)

    def start(self, produce: bool = True) -> None:
        self.tasks.append(asyncio.create_task(self.publisher.run()))
        if produce:
            self.start_producing()

    def start_producing(self) -> None:
        self.tasks.append(asyncio.create_task(self._produce()))

    async def stop_producing(self) -> None:
        await cancel_and_wait(self.tasks[1:])
        del self.tasks[1:]


@dataclass
class Lane:
    """One fault case: its broker, collector and hosts, and what it expects stored."""

    name: str
    broker: Mosquitto
    collector: Collector
    agents: list[FastAgent]
    victoria: Victoria | None = None
    collector_restarted: bool = False
    dropped: dict[str, range] = field(default_factory=dict)  # host → seqs the bound dropped

    def ingest(self) -> dict:
        with self.collector.client() as c:
            return c.get("/v1/ingest").json()

    def host_ingest(self, host: str) -> dict:
        with self.collector.client() as c:
            r = c.get(f"/v1/hosts/{host}/ingest")
        r.raise_for_status()
        return r.json()["networks"][f"{self.name}/{host}"]

    def flowing(self) -> bool:
        hosts = self.ingest()["hosts"]
        return all(
            hosts.get(f"{self.name}/{a.name}", {}).get("highest_seq", -1) >= 10 for a in self.agents
        )

    def complete(self) -> bool:
        """The collector has every host's last batch (once production stopped)."""
        hosts = self.ingest()["hosts"]
        return all(
            hosts.get(f"{self.name}/{a.name}", {}).get("highest_seq", -1) >= a.produced - 1
            for a in self.agents
        )

    def series(self, host: str, count: int) -> list[float]:
        if self.victoria is not None:
            httpx.get(f"{self.victoria.url}/internal/force_flush", timeout=10)
        with self.collector.client() as c:
            r = c.get(
                "/v1/series",
                params={
                    "host": host,
                    "metric": "fault_test_seq",
                    "start": T0 - 0.5,
                    "end": T0 + count - 0.5,
                    "step": 1,
                    "agg": "max",
                },
            )
        r.raise_for_status()
        return [v for _, v in r.json()["points"]]

    async def settle(self) -> None:
        """Stop producing; wait until every spool is empty and the collector has it all."""
        for a in self.agents:
            await a.stop_producing()
        await until(lambda: all(len(a.spool) == 0 for a in self.agents), 90, what=f"{self.name}")
        await until(self.complete, 30, what=f"{self.name}: the last batches in the collector")

    def check(self) -> None:
        """Every batch stored exactly once, apart from what the spool's bound dropped."""
        stored_total = 0
        for a in self.agents:
            dropped = self.dropped.get(a.name, range(0))
            expected = [float(s) for s in range(a.produced) if s not in dropped]
            stats = self.host_ingest(a.name)
            assert stats["highest_seq"] == a.produced - 1, (self.name, a.name, stats)
            assert stats["gaps"] == len(dropped) and stats["resets"] == 0, (self.name, stats)
            assert self.series(a.name, a.produced) == expected, (self.name, a.name)
            stored_total += len(expected)
        counters = self.ingest()["counters"]
        assert counters.get("rejected", 0) == 0, (self.name, counters)
        if not self.collector_restarted:  # the counters are the running collector's
            assert counters["batches"] == stored_total, (self.name, counters)


async def _broker_down(lane: Lane, seconds: float) -> None:
    """Cases 1 and 2: SIGKILL the broker, keep producing, start it again."""
    lane.broker.kill()
    first = [a.produced for a in lane.agents]
    await asyncio.sleep(seconds)
    for a, f in zip(lane.agents, first, strict=True):  # what the outage made is all kept
        assert len(a.spool) >= a.produced - f > 0, (lane.name, len(a.spool), a.produced, f)
    lane.broker.start()


async def _collector_killed(lane: Lane) -> None:
    """Case 3: a burst in flight, the collector SIGKILLed mid-way, started again."""
    before = sum(a.publisher.acked for a in lane.agents)
    for a in lane.agents:
        for _ in range(400):
            a.spool_one()
    # Killed once part of the burst is stored: the rest is on the wire, at the broker,
    # in the collector's memory, or stored without its ack sent.
    await until(
        lambda: sum(a.publisher.acked for a in lane.agents) > before + 200, 60, what="the burst"
    )
    lane.collector.stop(signal.SIGKILL)
    assert any(len(a.spool) > 0 for a in lane.agents), "nothing was in flight at the kill"
    await asyncio.sleep(5)
    await asyncio.to_thread(lane.collector.start)  # the other lanes keep running
    lane.collector_restarted = True


async def _store_down(lane: Lane) -> None:
    """Case 4: VictoriaMetrics stopped 30 s; nothing is acknowledged that is not stored."""
    assert lane.victoria is not None
    lane.victoria.stop()
    # Batches made from now on cannot have been stored: none may leave a spool.
    first = [a.produced for a in lane.agents]
    await asyncio.sleep(30)
    for a, f in zip(lane.agents, first, strict=True):
        assert a.produced > f, "nothing was made during the outage"
        kept = [a.spool.path_of(s).exists() for s in range(f, a.produced)]
        assert all(kept), f"{kept.count(False)} unstored batches acknowledged"
    assert lane.ingest()["counters"].get("store_errors", 0) > 0
    await asyncio.to_thread(lane.victoria.start)


async def _restart_during_replay(lane: Lane) -> None:
    """Case 5: a backlog builds, the broker returns, and is killed again mid-replay."""
    lane.broker.kill()
    for a in lane.agents:
        for _ in range(1500):
            a.spool_one()
    sent = [a.publisher.sent for a in lane.agents]
    lane.broker.start()

    def replaying() -> bool:
        return all(a.publisher.sent >= s + 300 for a, s in zip(lane.agents, sent, strict=True))

    # Polled in the loop, not through a thread: the replay takes a second or two.
    async with asyncio.timeout(60):
        while True:
            if replaying():
                break
            await asyncio.sleep(0.01)
    lane.broker.kill()
    assert all(len(a.spool) > 100 for a in lane.agents), "the replay was over already"
    await asyncio.sleep(3)
    lane.broker.start()


async def _restart_with_full_spool(lane: Lane, bound: int) -> None:
    """Case 6: the spool fills past its bound while the broker is away; the agent
    restarts on it, makes more batches while it is full; the broker returns."""
    for a in lane.agents:
        await a.stop_producing()
    await until(lambda: all(len(a.spool) == 0 for a in lane.agents), 30, what="empty spools")
    lane.broker.kill()
    extra, more = 50, 10
    restarted = []
    for a in lane.agents:
        first = a.produced
        for _ in range(bound + extra):
            a.spool_one()
        assert len(a.spool) == bound and a.spool.dropped == extra
        await cancel_and_wait(a.tasks)  # the agent stops, and starts on the same directory
        again = FastAgent(lane.name, a.name, a.creds, a.spool.dir, SpoolLimits(max_batches=bound))
        assert len(again.spool) == bound and again.spool.dropped == extra
        again.start(produce=False)
        for _ in range(more):  # still full: each new batch drops the oldest, counted
            again.spool_one()
        assert len(again.spool) == bound and again.spool.dropped == extra + more
        status = spool_status(again.spool.dir, again.spool.limits)
        assert status["batches"] == bound and status["dropped"] == extra + more, status
        assert status["limits"]["batches"] == bound
        lane.dropped[a.name] = range(first, first + extra + more)
        restarted.append(again)
    lane.agents[:] = restarted
    lane.broker.start()
    # Production resumes once the backlog has room again (no further drops to count).
    await until(lambda: all(len(a.spool) < bound / 2 for a in lane.agents), 60, what="drain")
    for a in lane.agents:
        a.start_producing()


def _lane_hosts(
    ctl: Controller, network: str, index: int, broker_url: str | None = None
) -> list[dict]:
    """Join ``AGENTS`` hosts through the controller; their broker settings."""
    with ctl.client() as admin:
        make_network(admin, network, cidr=f"10.231.{index}.0/24", metrics_interval=1)
    out = []
    for i in range(AGENTS):
        host, creds = host_credentials(ctl, network, f"vm{i}")
        assert creds["ack_topic"] == metrics.ack_topic(network, f"vm{i}"), creds
        if broker_url is not None:  # the anonymous lanes share one controller
            creds["broker"] = broker_url
        out.append({**creds, "name": f"vm{i}", "host_id": host["host_id"]})
    return out


async def test_monitoring_loses_and_duplicates_nothing_under_faults(
    make_controller, tmp_path: Path
) -> None:
    started: list[Mosquitto | Collector | Victoria] = []
    lanes: list[Lane] = []
    tasks: list[asyncio.Task[None]] = []
    bound = 100
    try:

        def broker(name: str, kind: str) -> Mosquitto:
            cls = PlainMosquitto if kind == "plain" else Mosquitto
            b = cls(tmp_path / f"mq-{name}", free_port(), persistence=kind == "persistent")
            b.start()
            started.append(b)
            return b

        plan = {  # lane → broker kind
            "kill10": "plain",
            "kill60": "plain",
            "dynsec10": "dynsec",
            "dynsec60": "dynsec",
            "persist10": "persistent",
            "collector": "plain",
            "store": "plain",
            "replay": "plain",
            "fullspool": "plain",
            # Through a bridge: hosts publish to an edge broker, the collector is on the
            # core one, which is killed 10 s (acks come back over the bridge).
            "bridge10": "plain",
        }
        brokers = {name: broker(name, kind) for name, kind in plan.items()}
        edge = BridgedMosquitto(tmp_path / "mq-edge", free_port(), core=brokers["bridge10"])
        edge.start()
        started.append(edge)
        # Anonymous brokers: one controller with no broker users (CLADNET_MQTT_URL only);
        # dynamic security: one controller per broker, as each administers one.
        anonymous = make_controller(extra_env={"CLADNET_MQTT_URL": brokers["kill10"].url})
        victoria = Victoria(tmp_path / "vm", free_port())
        victoria.start()
        started.append(victoria)
        for index, (name, kind) in enumerate(plan.items()):
            b = brokers[name]
            if kind == "plain":
                url = edge.url if name == "bridge10" else b.url
                hosts = _lane_hosts(anonymous, name, index, url)
                assert hosts[0]["username"] is None
            else:
                ctl = make_controller(
                    extra_env={
                        "CLADNET_MQTT_URL": b.url,
                        "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
                    }
                )
                hosts = _lane_hosts(ctl, name, index)
                assert hosts[0]["username"] == hosts[0]["host_id"]
            store = f"victoria:{victoria.url}" if name == "store" else "sqlite"
            collector = Collector(b, tmp_path / f"collector-{name}", free_port(), store=store)
            collector.start()
            started.append(collector)
            limits = SpoolLimits(max_batches=bound) if name == "fullspool" else None
            agents = [
                FastAgent(name, h["name"], h, tmp_path / f"spool-{name}-{h['name']}", limits)
                for h in hosts
            ]
            lanes.append(Lane(name, b, collector, agents, victoria if name == "store" else None))
        for lane in lanes:
            for a in lane.agents:
                a.start()
        await until(lambda: all(lane.flowing() for lane in lanes), 60, what="every lane")

        faults: dict[str, Callable[[Lane], Awaitable[None]]] = {
            "kill10": lambda lane: _broker_down(lane, 10),
            "kill60": lambda lane: _broker_down(lane, 60),
            "dynsec10": lambda lane: _broker_down(lane, 10),
            "dynsec60": lambda lane: _broker_down(lane, 60),
            "persist10": lambda lane: _broker_down(lane, 10),
            "collector": _collector_killed,
            "store": _store_down,
            "replay": _restart_during_replay,
            "fullspool": lambda lane: _restart_with_full_spool(lane, bound),
            "bridge10": lambda lane: _broker_down(lane, 10),
        }

        async def run(lane: Lane) -> None:
            await faults[lane.name](lane)
            await asyncio.sleep(2)  # a little more production after the fault
            await lane.settle()

        await asyncio.gather(*(run(lane) for lane in lanes))
        for lane in lanes:
            assert all(a.publisher.end_to_end for a in lane.agents), lane.name
            lane.check()
            for a in lane.agents:
                assert spool_status(a.spool.dir)["acknowledgement"] == "collector"
    finally:
        for lane in lanes:
            for a in lane.agents:
                tasks += a.tasks
        await cancel_and_wait(tasks)
        for component in reversed(started):
            component.stop()


async def test_an_agent_whose_ack_subscription_is_refused_says_so(
    metrics_controller: Controller, mosquitto: Mosquitto, make_collector, tmp_path: Path, caplog
) -> None:
    with metrics_controller.client() as admin:
        make_network(admin, "noack", cidr="10.232.0.0/24", metrics_interval=1)
    host, creds = host_credentials(metrics_controller, "noack", "vm1")
    # A broker whose ACLs let the host publish but not hear the collectors' acks.
    admin = BrokerAdmin(mosquitto.url, mosquitto.url, "admin", MQTT_ADMIN_PASSWORD)
    answer = await admin.run(
        [
            {
                "command": "removeRoleACL",
                "rolename": host["host_id"],
                "acltype": "subscribeLiteral",
                "topic": creds["ack_topic"],
            }
        ]
    )
    assert not any(r.get("error") for r in answer), answer
    collector = make_collector()
    # The agent's state directory, as `cladnet-agent status` reads it.
    states = StateDir(tmp_path / "state")
    states.save(
        Membership(
            controller=metrics_controller.url,
            host_id=host["host_id"],
            interface="cl-noack-none",
            network={"id": "n1", "name": "noack"},
            me={"name": "vm1", "overlay_ip": "10.232.0.2"},
        )
    )
    states.save_secrets("n1", host["credential"], "unused-private-key")
    reporter = MetricsReporter(
        network="noack",
        host="vm1",
        host_id=host["host_id"],
        overlay_ip="127.0.0.1",
        spool_dir=spool_dir(states.root, "n1"),
        interval=1.0,
        device=no_device,
        peers=dict,
        broker=Broker(creds["broker"], creds["username"], creds["password"]),
        resend_after=RESEND,
    )
    caplog.set_level(logging.WARNING, logger="cladnet.agent")
    task = asyncio.create_task(reporter.run())
    try:

        def latest() -> dict | None:
            with collector.client() as c:
                r = c.get("/v1/hosts/vm1/latest")
            return r.json()["metrics"] if r.status_code == 200 else None

        # Batches still flow (on the broker's PUBACK), and the batches say how.
        shown = await until(latest, what="vm1's metrics in the collector")
        assert reporter.publisher is not None and not reporter.publisher.end_to_end
        await until(lambda: (latest() or {}).get("agent_metrics_collector_ack") == 0.0)
    finally:
        await cancel_and_wait([task])
    assert "agent_spool_dropped_batches_total" in shown
    assert any("cannot acknowledge" in r.getMessage() for r in caplog.records)
    shown_status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent.main", "status", "--state-dir", str(states.root)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    status = json.loads(shown_status.stdout)[0]["metrics_spool"]
    assert status["acknowledgement"] == "broker", status
    assert "refused" in status["reason"], status
    assert status["dropped"] == 0 and status["limits"]["batches"] == SpoolLimits().max_batches
