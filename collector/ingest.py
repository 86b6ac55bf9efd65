"""Metric batches off the broker: validate, de-duplicate, store, evaluate alarms.

Several collectors share the load through one MQTT shared subscription
(``$share/<group>/cladnet/metrics/#``); adding one needs no other change. Each
message is acknowledged only after its samples are written, so a collector that
dies mid-way gets its unacknowledged batches redelivered instead of losing them.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from cladnet.backoff import Backoff
from cladnet.sequence import SequenceTracker, Verdict
from cladnet.tasks import cancel_and_wait
from collector import mqtt_ack
from collector.notify import Notifier
from collector.store.base import MetricsStore

log = logging.getLogger("cladnet.collector")

RECEIVE_MAXIMUM = 1000  # unacknowledged batches the broker may send us (MQTT v5)
# Reconnect backoff: doubling from RECONNECT_FIRST, never longer than RECONNECT_CAP,
# so a broker that is back is used within seconds.
RECONNECT_FIRST, RECONNECT_CAP = 0.5, 5.0


@dataclass
class BrokerSettings:
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    group: str = "collectors"
    client_id: str = ""
    session_expiry: int = 7 * 86400
    ca_file: str | None = None  # mqtts: the CA to verify the broker with (None: system's)


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
        # Decoded batches waiting to be written, and how many samples they hold.
        self._pending: list[metrics.Batch] = []
        self._pending_samples = 0
        self._full = asyncio.Event()  # enough pending for a write: flush before the timer
        self._unacked: list[int] = []
        self._write: asyncio.Future[None] | None = None  # the latest store write
        # (network, host) → seqs stored (or found stored) since the last flush.
        self._stored: dict[tuple[str, str], list[int]] = {}

    def _client(self) -> aiomqtt.Client:
        parts = urlsplit(self.broker.url)
        tls = parts.scheme == "mqtts"
        # A persistent session under a stable id: while this collector is away the
        # broker queues its share of the batches instead of dropping them.
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = self.broker.session_expiry
        # Batches the broker may have in flight to us, unacknowledged: room for the
        # write in progress and the next one, and the bound on what we hold in memory.
        session.ReceiveMaximum = RECEIVE_MAXIMUM
        client = aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            username=self.broker.username,
            password=self.broker.password,
            identifier=self.broker.client_id or f"cladnet-collector-{random.getrandbits(32):08x}",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_params=aiomqtt.TLSParameters(ca_certs=self.broker.ca_file) if tls else None,
            keepalive=30,
            clean_start=False,
            properties=session,
        )
        # The PUBACK waits until the batch is stored.
        mqtt_ack.enable_manual_ack(client)
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
        self.counters["samples"] += len(batch.samples)
        self._pending.append(batch)
        self._pending_samples += len(batch.samples)
        if self._pending_samples >= self.flush_samples:
            self._full.set()
        seen = self.last_seen.get((batch.network, batch.host))
        if seen is None or batch.ts >= seen[0]:
            self.last_seen[(batch.network, batch.host)] = (batch.ts, batch.interval)
        # Sample objects only for metrics some rule watches (a rule matches by name).
        watched = {rule.metric for rule in self.engine.rules.values()}
        if not watched:
            return []
        return self.engine.observe(
            metrics.Sample(batch.network, batch.host, n, tuple(sorted(lb.items())), batch.ts, v)
            for n, lb, v in batch.samples
            if n in watched
        )

    async def flush(self, client: aiomqtt.Client | None = None) -> None:
        """Write queued samples, then acknowledge the batches they came in."""
        if self._write is not None:
            # A cancelled flush's write may still run: what it holds (or puts back)
            # comes before anything acknowledged from here on.
            await asyncio.wait([self._write])
        # Take everything queued so far; batches arriving meanwhile wait for the next.
        batches, self._pending = self._pending, []
        count, self._pending_samples = self._pending_samples, 0
        self._full.clear()
        unacked, self._unacked = self._unacked, []
        stored, self._stored = self._stored, {}
        if batches:
            write = self._write = asyncio.ensure_future(self.store.write_batches(batches))
            try:
                # Shielded: a flush cancelled because the connection dropped still
                # finishes its write. The tracker has seen these batches, so their
                # re-deliveries would be dropped as duplicates.
                await asyncio.shield(write)
            except asyncio.CancelledError:
                write.add_done_callback(lambda w: self._requeue(w, batches, count))
                raise
            except Exception:  # nothing acknowledged: put it back, try again later
                self._requeue(write, batches, count)
                self._unacked[:0] = unacked
                for key, seqs in stored.items():
                    self._stored.setdefault(key, [])[:0] = seqs
                return
        if client is not None:
            for mid in unacked:
                mqtt_ack.ack(client, mid)
            # Tell each host what is safely stored, so it can drop it from its spool;
            # all at once, not one broker round trip after the other.
            await asyncio.gather(
                *(
                    client.publish(
                        metrics.ack_topic(network, host),
                        json.dumps({"seqs": seqs}).encode(),
                        qos=1,
                    )
                    for (network, host), seqs in stored.items()
                )
            )

    def _requeue(
        self, write: asyncio.Future[None], batches: list[metrics.Batch], count: int
    ) -> None:
        """Put a failed write's batches back in front, to be written with the next flush."""
        error = "cancelled" if write.cancelled() else write.exception()
        if error is None:
            return
        self.counters["store_errors"] += 1
        log.error("storing a flush failed", extra={"error": repr(error)})
        self._pending[:0] = batches
        self._pending_samples += count

    async def _flusher(self, client: aiomqtt.Client) -> None:
        # Every flush_interval, or as soon as a write's worth is pending. The reader
        # never waits for a write, so decoding the next batches overlaps storing these.
        # A store that is down is retried with capped backoff, not five times a second;
        # meanwhile nothing is acknowledged, so the broker and the agents keep it all.
        delay = self.flush_interval
        while True:
            if delay > self.flush_interval:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):  # not wait_for: see Publisher.run
                    async with asyncio.timeout(self.flush_interval):
                        await self._full.wait()
            errors = self.counters["store_errors"]
            await self.flush(client)
            failed = self.counters["store_errors"] > errors
            delay = min(delay * 2, RECONNECT_CAP) if failed else self.flush_interval

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
            finally:
                await cancel_and_wait([flusher], aiomqtt.MqttError)

    async def run(self) -> None:
        """Subscribe and ingest forever; reconnect with capped backoff."""
        backoff = Backoff(RECONNECT_FIRST, RECONNECT_CAP, jitter=(0.5, 1.0))
        while True:
            connects = self.counters["connects"]
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
            if self.counters["connects"] > connects:  # it was up: back off afresh
                backoff.reset()
            await backoff.wait()

    async def watch_hosts(self, every: float = 1.0, missed: int = 3) -> None:
        """The built-in host-down alarm: no batch for ``missed`` intervals."""
        while True:
            await self._notify(self.engine.check_down(self.last_seen, time.time(), missed))
            await asyncio.sleep(every)
