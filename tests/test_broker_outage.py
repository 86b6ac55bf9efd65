"""A broker killed for 60 s while agents keep producing fast: nothing lost, nothing twice.

Real Mosquitto (SIGKILL by PID, restarted on the same port from its own persistence
file), the controller issuing per-host broker users, the collector process with
SQLite, and per host the agent's real ``Spool`` + ``Publisher`` with end-to-end acks,
fed by a producer that works like ``MetricsReporter.run`` (take a sequence number,
spool the encoded batch, wake the publisher) but ten times a second.

Every check goes through the collector's API: the ingest counters (every batch
stored once) and the per-host sequence stats (no gap, no reset), and the stored
series itself (one point per batch, in order).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from agent.metrics.publisher import Broker, Publisher
from agent.metrics.spool import Spool
from cladnet import metrics
from cladnet.tasks import cancel_and_wait
from tests.components import Collector, Controller, Mosquitto
from tests.test_controller_api import make_network
from tests.test_monitoring import _host_credentials, _ingest, _until

HOSTS = 3
RATE = 10.0  # batches per second per host: ten times the agent's fastest interval
OUTAGE = 60.0  # the figure: a minute of batches spooled by every agent
# Batch timestamps are one second apart from here on, so the series query can show
# each batch as its own point (the real time of a batch is irrelevant to the test).
T0 = time.time() - 2000


class FastAgent:
    """One host's metrics path: the agent's spool and publisher, fed ``RATE`` times a second."""

    def __init__(self, name: str, creds: dict, spool_dir: Path) -> None:
        self.name = name
        self.spool = Spool(spool_dir)
        self.publisher = Publisher(
            Broker(creds["broker"], creds["username"], creds["password"]),
            f"cladnet-{name}",
            creds["topic"],
            self.spool,
            ack_topic=creds["ack_topic"],
            resend_after=5.0,
        )
        self.produced = 0

    async def produce(self) -> None:
        """Spool a batch and wake the publisher, like ``MetricsReporter.run`` does."""
        while True:
            seq = self.spool.next_seq()
            batch = metrics.Batch(network="out", host=self.name, seq=seq, ts=T0 + seq, interval=1.0)
            batch.add("outage_test_seq", seq)
            batch.add("load1", 0.5)
            batch.sent = time.time()
            self.spool.append(seq, batch.encode())
            self.produced = seq + 1
            self.publisher.wake.set()
            await asyncio.sleep(1 / RATE)


def _kill(broker: Mosquitto) -> None:
    """SIGKILL our broker by its PID: no clean shutdown, no final persistence save."""
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGKILL)
    broker.proc.wait(10)
    broker.proc = None


def _series_values(collector: Collector, host: str, count: int) -> list[float]:
    with collector.client() as c:
        r = c.get(
            "/v1/series",
            params={
                "host": host,
                "metric": "outage_test_seq",
                "start": T0 - 0.5,
                "end": T0 + count,
                "step": 1,
                "agg": "max",
            },
        )
    r.raise_for_status()
    return [v for _, v in r.json()["points"]]


async def test_a_killed_broker_loses_and_duplicates_no_batch(
    metrics_controller: Controller, mosquitto: Mosquitto, make_collector, tmp_path: Path
) -> None:
    with metrics_controller.client() as admin:
        make_network(admin, "out", cidr="10.228.0.0/24", metrics_interval=1)
    agents = []
    for i in range(HOSTS):
        _, creds = _host_credentials(metrics_controller, "out", f"vm{i}")
        agents.append(FastAgent(f"vm{i}", creds, tmp_path / f"spool-{i}"))
    collector = make_collector()
    tasks = [asyncio.create_task(a.publisher.run()) for a in agents]
    tasks += [asyncio.create_task(a.produce()) for a in agents]
    try:

        def flowing() -> bool:
            hosts = _ingest(collector)["hosts"]
            return all(hosts.get(f"out/{a.name}", {}).get("highest_seq", -1) >= 10 for a in agents)

        await _until(flowing, 30, what="batches from every host in the collector")

        _kill(mosquitto)
        await asyncio.sleep(OUTAGE)  # the producers keep spooling meanwhile
        assert all(len(a.spool) >= OUTAGE * RATE / 2 for a in agents), "spools did not fill"
        mosquitto.start()
        # Publishers and the collector come back on their own backoff (capped at 5 s).
        await _until(lambda: all(a.publisher.connected for a in agents), 30, what="reconnects")
        await asyncio.sleep(1)  # a little more production with the broker back
        await cancel_and_wait(tasks[HOSTS:])
        produced = {a.name: a.produced for a in agents}
        await _until(lambda: all(len(a.spool) == 0 for a in agents), 60, what="spools to drain")
    finally:
        await cancel_and_wait(tasks)

    ingest = _ingest(collector)
    for name, count in produced.items():
        assert count > (OUTAGE + 5) * RATE / 2, (name, count)
        stats = ingest["hosts"][f"out/{name}"]
        assert stats["highest_seq"] == count - 1, stats
        assert stats["gaps"] == 0 and stats["resets"] == 0, stats
        # Stored: one point per batch, every sequence number, in order.
        assert _series_values(collector, name, count) == [float(s) for s in range(count)]
    # Each batch stored exactly once: re-deliveries were counted and dropped, not stored.
    assert ingest["counters"]["batches"] == sum(produced.values()), ingest["counters"]
    assert ingest["counters"]["samples"] == 2 * sum(produced.values()), ingest["counters"]
    assert ingest["counters"].get("rejected", 0) == 0
