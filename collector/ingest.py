"""Metric batches off the broker: validate, de-duplicate, store, evaluate alarms.

Several collectors share the load through one MQTT shared subscription
(``$share/<group>/cladnet/metrics/#``); adding one needs no other change. Each
message is acknowledged only after its samples are written, so a collector that
dies mid-way gets its unacknowledged batches redelivered instead of losing them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cladnet import metrics
from cladnet.alarms import AlarmEngine, Event
from cladnet.sequence import SequenceTracker, Verdict
from cladnet.tasks import cancel_and_wait
from collector.notify import Notifier
from collector.store.base import MetricsStore

log = logging.getLogger("cladnet.collector")


@dataclass
class BrokerSettings:
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    group: str = "collectors"
    client_id: str = ""
    session_expiry: int = 7 * 86400


class Ingest:
    """The collector's MQTT side and the live state built from it."""

    def __init__(
        self,
        broker: BrokerSettings,
        store: MetricsStore,
        engine: AlarmEngine,
        notifier: Notifier | None = None,
        flush_interval: float = 0.2,
        flush_samples: int = 20_000,
    ) -> None:
        self.broker, self.store, self.engine, self.notifier = broker, store, engine, notifier
        self.flush_interval, self.flush_samples = flush_interval, flush_samples
        self.tracker = SequenceTracker()
        self.counters: Counter[str] = Counter()
        # (network, host) → (last batch time, interval): host-down and the live view.
        self.last_seen: dict[tuple[str, str], tuple[float, float]] = {}
        self.connected = False
        self._pending: list[metrics.Sample] = []
        self._unacked: list[int] = []
        # (network, host) → seqs stored (or found stored) since the last flush.
        self._stored: dict[tuple[str, str], list[int]] = {}

    def _client(self) -> aiomqtt.Client:
        parts = urlsplit(self.broker.url)
        tls = parts.scheme == "mqtts"
        # A persistent session under a stable id: while this collector is away the
        # broker queues its share of the batches instead of dropping them.
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = self.broker.session_expiry
        client = aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            username=self.broker.username,
            password=self.broker.password,
            identifier=self.broker.client_id or f"cladnet-collector-{random.getrandbits(32):08x}",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_params=aiomqtt.TLSParameters() if tls else None,
            keepalive=30,
            clean_start=False,
            properties=session,
        )
        # aiomqtt has no switch for it; paho's manual acknowledgement lets the PUBACK
        # wait until the batch is stored.
        client._client.manual_ack_set(True)
        return client

    def accept(self, topic: str, payload: bytes) -> list[Event]:
        """Validate and de-duplicate one batch; queue its samples; return alarm events."""
        try:
            batch = metrics.decode(payload, topic)
        except metrics.BatchError as exc:
            self.counters["rejected"] += 1
            log.warning("rejected a batch", extra={"topic": topic, "error": str(exc)})
            return []
        key = f"{batch.network}/{batch.host}"
        self._stored.setdefault((batch.network, batch.host), []).append(batch.seq)
        if self.tracker.check(key, batch.seq, batch.ts) is Verdict.DUPLICATE:
            self.counters["duplicates"] += 1  # acknowledged again: the first ack was lost
            return []
        self.counters["batches"] += 1
        samples = batch.flat()
        self.counters["samples"] += len(samples)
        self._pending.extend(samples)
        seen = self.last_seen.get((batch.network, batch.host))
        if seen is None or batch.ts >= seen[0]:
            self.last_seen[(batch.network, batch.host)] = (batch.ts, batch.interval)
        return self.engine.observe(samples)

    async def flush(self, client: aiomqtt.Client | None = None) -> None:
        """Write queued samples, then acknowledge the batches they came in."""
        # Take everything queued so far; batches arriving meanwhile wait for the next.
        samples, self._pending = self._pending, []
        unacked, self._unacked = self._unacked, []
        stored, self._stored = self._stored, {}
        if samples:
            try:
                await self.store.write(samples)
            except Exception as exc:  # nothing acknowledged: put it back, try again later
                self.counters["store_errors"] += 1
                log.error("storing a flush failed", extra={"error": repr(exc)})
                self._pending[:0], self._unacked[:0] = samples, unacked
                for key, seqs in stored.items():
                    self._stored.setdefault(key, [])[:0] = seqs
                return
        if client is not None:
            for mid in unacked:
                client._client.ack(mid, 1)
            # Tell each host what is safely stored, so it can drop it from its spool.
            for (network, host), seqs in stored.items():
                body = json.dumps({"seqs": seqs}).encode()
                await client.publish(metrics.ack_topic(network, host), body, qos=1)

    async def _flusher(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush(client)

    async def _notify(self, events: list[Event]) -> None:
        if events and self.notifier is not None:
            await self.notifier.send(events)

    async def _session(self) -> None:
        async with self._client() as client:
            self.connected = True
            self.counters["connects"] += 1
            topic = f"$share/{self.broker.group}/{metrics.TOPIC_ROOT}/#"
            granted = await client.subscribe(topic, qos=1)
            codes = granted if isinstance(granted, list) else [granted]
            if any(getattr(c, "is_failure", False) for c in codes):
                # Not authorised to read metrics: say so loudly, keep retrying.
                raise aiomqtt.MqttError(f"subscription to {topic} refused: {codes}")
            log.info("subscribed", extra={"topic": topic, "broker": self.broker.url})
            # Messages are read by one uninterrupted loop (cancelling a pending read can
            # drop a message already taken off the queue); a separate task flushes.
            flusher = asyncio.create_task(self._flusher(client))
            try:
                async for message in client.messages:
                    events = self.accept(str(message.topic), bytes(message.payload))
                    if message.qos > 0:
                        self._unacked.append(message.mid)
                    await self._notify(events)
                    if len(self._pending) >= self.flush_samples:
                        await self.flush(client)
            finally:
                await cancel_and_wait([flusher], aiomqtt.MqttError)

    async def run(self) -> None:
        """Subscribe and ingest forever; reconnect with capped backoff."""
        delay = 0.5
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                self.counters["broker_errors"] += 1
                log.warning("broker connection lost", extra={"error": str(exc)})
            finally:
                self.connected = False
                # Unacknowledged batches come back on reconnect (or are resent).
                self._unacked = []
                self._stored = {}
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 30.0)

    async def watch_hosts(self, every: float = 1.0, missed: int = 3) -> None:
        """The built-in host-down alarm: no batch for ``missed`` intervals."""
        while True:
            await self._notify(self.engine.check_down(self.last_seen, time.time(), missed))
            await asyncio.sleep(every)
