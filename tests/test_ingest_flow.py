"""Ingest's flow control against a real Mosquitto: what the collector holds unacknowledged
is bounded by the collector itself (it stops reading), whatever the broker sends, while
a write waits and while the store is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.ingest import AGENT_PASSWORD, AGENT_USER, make_agent_user
from cladnet import metrics
from cladnet.alarms import AlarmEngine
from cladnet.tasks import cancel_and_wait
from collector import ingest as ingest_module
from collector import mqtt
from collector.ingest import BrokerSettings, Ingest
from collector.store.base import StoreError
from collector.store.sqlite import SqliteStore
from lab.components import MQTT_COLLECTOR_PASSWORD, Mosquitto, free_port
from tests.support import until

HOSTS, SEQS = 4, 100


class GatedStore(SqliteStore):
    """SQLite whose writes wait (or fail, ``failing``) until ``gate`` is set; records
    what it stored."""

    def __init__(self, path: Path, failing: bool) -> None:
        super().__init__(path)
        self.gate, self.failing = asyncio.Event(), failing
        self.stored: list[tuple[str, int]] = []

    async def write_batches(self, batches: Sequence[metrics.Batch]) -> None:
        if self.failing and not self.gate.is_set():
            raise StoreError("down")
        await self.gate.wait()
        await super().write_batches(batches)
        self.stored += [(b.host, b.seq) for b in batches]


def _payload(host: int, seq: int) -> bytes:
    b = metrics.Batch("flow", f"vm{host}", seq, time.time() - 1000 + seq, 2.0)
    for i in range(80):
        b.add("cpu_usage_ratio", i / 100, cpu=str(i))
    return b.encode()


@pytest.mark.parametrize("failing", [False, True], ids=["write-waits", "store-down"])
async def test_the_collector_stops_reading_while_too_much_is_unacknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: bool
) -> None:
    # A broker that may send everything at once; the collector's own bound holds.
    monkeypatch.setattr(ingest_module, "RECEIVE_MAXIMUM", 65535)
    monkeypatch.setattr(ingest_module, "READ_PAUSE", 100)
    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    broker.start()
    make_agent_user(broker)
    store = GatedStore(tmp_path / "metrics.db", failing)
    settings = BrokerSettings(
        url=broker.url,
        username="cladnet-collector",
        password=MQTT_COLLECTOR_PASSWORD,
        client_id="flow-collector",
    )
    ingest = Ingest(settings, store, AlarmEngine(), flush_interval=0.05)
    task = asyncio.create_task(ingest.run())
    publisher = None
    try:
        await until(lambda: ingest.connected, 10, what="the collector to connect")
        await asyncio.sleep(0.3)  # subscribed
        options = mqtt.ConnectOptions(
            broker.host,
            broker.port,
            "flow-agent",
            username=AGENT_USER,
            password=AGENT_PASSWORD,
            clean_start=True,
        )
        publisher = await mqtt.connect(options, lambda *_: None)
        codes = await asyncio.gather(
            *(
                publisher.publish(metrics.topic("flow", f"vm{h}"), _payload(h, s))
                for s in range(SEQS)
                for h in range(HOSTS)
            )
        )
        assert set(codes) == {0}
        await asyncio.sleep(2.0)  # store down: several retries, each must keep the bound
        # Nothing stored, nothing acknowledged: reading stopped at the bound (queued and
        # in the write that waits; what one read of the socket held may come on top),
        # far below what was sent.
        taken = ingest.counters["batches"]
        assert 100 <= taken <= 200, taken
        assert not store.stored
        store.gate.set()
        await until(lambda: len(store.stored) >= HOSTS * SEQS, 30, what="every batch stored")
        await asyncio.sleep(0.3)
        expected = {(f"vm{h}", s) for h in range(HOSTS) for s in range(SEQS)}
        assert sorted(store.stored) == sorted(expected)  # every batch, each once
        assert ingest.counters["batches"] == HOSTS * SEQS
    finally:
        if publisher is not None:
            publisher.close()
        await cancel_and_wait([task])
        await store.close()
        broker.stop()
