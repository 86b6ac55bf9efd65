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

from cladnet import metrics
from cladnet.alarms import AlarmEngine, Event
from cladnet.backoff import Backoff
from cladnet.sequence import SequenceTracker, Verdict
from cladnet.tasks import cancel_and_wait
from collector import mqtt
from collector.notify import Notifier
from collector.store.base import MetricsStore

log = logging.getLogger("cladnet.collector")

RECEIVE_MAXIMUM = 1000  # unacknowledged batches the broker may send us (MQTT v5)
# Batches held unacknowledged (queued, and in the write in progress) at which the
# collector stops reading from the broker until a write takes or acknowledges them. The
# receive maximum should bound them, but Mosquitto 2.0.11 overshoots it once acks flow
# (each PUBACK let it send up to the receive maximum again, measured with this client
# and with paho): without this, a queue of a million batches would come in at once.
READ_PAUSE = 2 * RECEIVE_MAXIMUM
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
        self._unacked: list[int] = []  # packet ids of the batches taken since the last flush
        self._events: asyncio.Queue[list[Event]] = asyncio.Queue()  # for the notifier
        self._write: asyncio.Future[None] | None = None  # the latest store write
        self._telling: asyncio.Future[None] | None = None  # the latest round of host acks
        # The connection to pause when too much is unacknowledged: set once its flusher
        # runs (the flusher resumes it; before that, the SUBACK must still be read).
        self._reading: mqtt.Connection | None = None
        self._writing = 0  # unacknowledged batches in the write in progress
        # (network, host) → seqs stored (or found stored) since the last flush.
        self._stored: dict[tuple[str, str], list[int]] = {}

    def _options(self) -> mqtt.ConnectOptions:
        parts = urlsplit(self.broker.url)
        tls = parts.scheme == "mqtts"
        return mqtt.ConnectOptions(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            client_id=self.broker.client_id or f"cladnet-collector-{random.getrandbits(32):08x}",
            username=self.broker.username,
            password=self.broker.password,
            tls=mqtt.tls_context(self.broker.ca_file) if tls else None,
            keepalive=30,
            # A persistent session under a stable id: while this collector is away the
            # broker queues its share of the batches instead of dropping them.
            clean_start=False,
            session_expiry=self.broker.session_expiry,
            # Batches the broker may have in flight to us, unacknowledged: room for the
            # write in progress and the next one (see READ_PAUSE for the memory bound).
            receive_maximum=RECEIVE_MAXIMUM,
        )

    def _received(self, topic: str, payload: bytes, mid: int) -> None:
        """One PUBLISH off the connection: accept it; its PUBACK waits until it is stored."""
        events = self.accept(topic, payload)
        if mid:
            self._unacked.append(mid)
            # Not while a round of host acks waits for its PUBACKs: they come by reading.
            reader, telling = self._reading, self._telling
            if reader is not None and len(self._unacked) + self._writing >= READ_PAUSE:
                if telling is None or telling.done():
                    reader.pause_reading()
        if events and self.notifier is not None:
            self._events.put_nowait(events)

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

    async def flush(self, client: mqtt.Connection | None = None) -> None:
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
        self._writing = len(unacked)
        if client is not None and self._writing < READ_PAUSE:
            client.resume_reading()  # room for more beside this write
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
                self._writing = 0
                return
        self._writing = 0
        if client is not None:
            client.ack(unacked)
            client.resume_reading()
            if stored:
                # The hosts' acks go out beside the next write, not before it: one round
                # at a time (the broker's receive maximum paces them), so none pile up.
                if self._telling is not None:
                    await asyncio.wait([self._telling])
                self._telling = asyncio.ensure_future(self._tell_hosts(client, stored))

    async def _tell_hosts(
        self, client: mqtt.Connection, stored: dict[tuple[str, str], list[int]]
    ) -> None:
        """Tell each host what is safely stored, so it can drop it from its spool; all at
        once, not one broker round trip after the other."""
        try:
            codes = await asyncio.gather(
                *(
                    client.publish(
                        metrics.ack_topic(network, host), json.dumps({"seqs": seqs}).encode()
                    )
                    for (network, host), seqs in stored.items()
                )
            )
        except mqtt.MqttError:
            return  # the connection is gone: the hosts resend, and get acks then
        refused = sum(code >= 0x80 for code in codes)
        if refused:  # the agents resend and get acks later: loud, but not fatal
            self.counters["acks_refused"] += refused
            log.warning("the broker refused acks", extra={"count": refused})

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

    async def _flusher(self, client: mqtt.Connection) -> None:
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

    async def _deliver(self) -> None:
        # Alarm events from the receive path, in order; a slow webhook never holds it up.
        while True:
            await self._notify(await self._events.get())

    async def _session(self) -> None:
        client = await mqtt.connect(self._options(), self._received)
        flusher = None
        try:
            self.connected = True
            self.counters["connects"] += 1
            topic = f"$share/{self.broker.group}/{metrics.TOPIC_ROOT}/#"
            codes = await client.subscribe(topic, qos=1)
            if any(code >= 0x80 for code in codes):
                # Not authorised to read metrics: say so loudly, keep retrying.
                raise mqtt.MqttError(f"subscription to {topic} refused: {codes}")
            log.info("subscribed", extra={"topic": topic, "broker": self.broker.url})
            # Messages are taken in the connection's data_received, in arrival order; a
            # separate task flushes and acknowledges.
            flusher = asyncio.create_task(self._flusher(client))
            self._reading = client
            closed = asyncio.ensure_future(client.wait_closed())
            await asyncio.wait([closed, flusher], return_when=asyncio.FIRST_COMPLETED)
            if flusher.done():  # it failed (it never ends by itself): say why
                closed.cancel()
                flusher.result()
            await closed
        finally:
            self._reading = None
            await cancel_and_wait([flusher], mqtt.MqttError)
            telling, self._telling = self._telling, None
            if telling is not None:
                telling.cancel()
            client.close()

    async def run(self) -> None:
        """Subscribe and ingest forever; reconnect with capped backoff."""
        backoff = Backoff(RECONNECT_FIRST, RECONNECT_CAP, jitter=(0.5, 1.0))
        deliver = asyncio.create_task(self._deliver())
        try:
            await self._reconnect(backoff)
        finally:
            await cancel_and_wait([deliver])

    async def _reconnect(self, backoff: Backoff) -> None:
        while True:
            connects = self.counters["connects"]
            try:
                await self._session()
            except mqtt.MqttError as exc:
                self.counters["broker_errors"] += 1
                log.warning("broker connection lost", extra={"error": str(exc)})
            finally:
                self.connected = False
                # Unacknowledged batches come back on reconnect (or are resent).
                self._unacked = []
                self._stored = {}
                self._writing = 0
            if self.counters["connects"] > connects:  # it was up: back off afresh
                backoff.reset()
            await backoff.wait()

    async def watch_hosts(self, every: float = 1.0, missed: int = 3) -> None:
        """The built-in host-down alarm: no batch for ``missed`` intervals."""
        while True:
            await self._notify(self.engine.check_down(self.last_seen, time.time(), missed))
            await asyncio.sleep(every)
