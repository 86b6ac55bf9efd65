"""Sends spooled batches to the MQTT broker at QoS 1, in order, and keeps trying."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt

from agent.metrics.spool import Spool
from cladnet.backoff import Backoff
from cladnet.tasks import cancel_and_wait

log = logging.getLogger("cladnet.agent")

IN_FLIGHT = 32  # batches published before waiting for their acknowledgements
# Reconnect backoff: doubling from RECONNECT_FIRST, never longer than RECONNECT_CAP,
# so a broker that is back gets the spooled batches within seconds.
RECONNECT_FIRST, RECONNECT_CAP = 0.5, 5.0


@dataclass
class Broker:
    """Where and as whom to publish; from the controller's join answer."""

    url: str  # mqtt://host:port or mqtts://host:port
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # mqtts: the CA to verify the broker with (None: system's)

    def client(self, identifier: str) -> aiomqtt.Client:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(
                f"broker URL must be mqtt://host[:port] or mqtts://…, got {self.url!r}"
            )
        tls = parts.scheme == "mqtts"
        return aiomqtt.Client(
            parts.hostname,
            parts.port or (8883 if tls else 1883),
            username=self.username,
            password=self.password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_params=aiomqtt.TLSParameters(ca_certs=self.ca_file) if tls else None,
            keepalive=30,
            timeout=10,
        )


class Publisher:
    """Drains the spool to ``topic``; reconnects with capped backoff.

    End-to-end acknowledgement: a batch leaves the spool only when a collector says on
    ``ack_topic`` that it stored it; a broker's PUBACK is not enough, because a broker
    restart can drop what it acknowledged (without persistence, or before the
    collectors re-subscribe: Mosquitto 2.0 does not restore shared subscriptions).
    Unacknowledged batches are sent again after ``resend_after`` seconds; the
    collector drops the duplicates. Only when the broker refuses the subscription to
    ``ack_topic`` (or there is none: benchmarks) does the PUBACK count, and the agent
    says so (log, status, metric).
    """

    def __init__(
        self,
        broker: Broker,
        identifier: str,
        topic: str,
        spool: Spool,
        ack_topic: str | None,
        resend_after: float = 30.0,
    ) -> None:
        self.broker, self.identifier, self.topic, self.spool = broker, identifier, topic, spool
        self.ack_topic, self.resend_after = ack_topic, resend_after
        self.wake = asyncio.Event()
        self.connected = False
        self.sent = 0
        self.resent = 0
        self.failures = 0
        self.acked = 0  # batches freed by a collector's ack (re-acks not counted)
        # True while a collector's ack is what frees a batch; False when the broker
        # refused the ack subscription and its PUBACK has to do.
        self.end_to_end = True
        self._delivery: dict[str, object] | None = None  # as last saved for the status
        self._last_ack = time.monotonic()
        self._sent_at: dict[Path, float] = {}  # awaiting the collector's ack

    def _set_delivery(self, end_to_end: bool, reason: str | None, stalled: bool = False) -> None:
        """Switch acknowledgement mode; log and save for ``cladnet-agent status`` on change."""
        if end_to_end != self.end_to_end:
            self._sent_at.clear()  # resent (and freed) under the new mode
        self.end_to_end = end_to_end
        state: dict[str, object] = {
            "acknowledgement": "collector" if end_to_end else "broker",
            "reason": reason,
            "ack_topic": self.ack_topic,
        }
        if state == self._delivery:
            return
        self._delivery = state
        self.spool.save_delivery({**state, "since": time.time()})
        if not end_to_end:
            log.warning(
                "collectors cannot acknowledge batches: a batch leaves the spool on the "
                "broker's PUBACK, so a broker restart (or one without the collectors "
                "subscribed) can lose batches",
                extra={"ack_topic": self.ack_topic, "reason": reason},
            )
        elif stalled:
            log.warning(
                "no collector has acknowledged a batch for a while: batches stay in the "
                "spool; check that collectors run and that the broker lets this host "
                "read its ack topic",
                extra={"ack_topic": self.ack_topic, "buffered": len(self.spool)},
            )
        else:
            log.info("batches are acknowledged end to end by a collector")

    def _check_stalled(self, now: float) -> None:
        """Say so when batches wait for a collector's ack much longer than a resend."""
        waiting = bool(self._sent_at) and now - self._last_ack > 3 * self.resend_after
        if self.end_to_end:
            reason = "no collector acknowledgement: batches kept" if waiting else None
            self._set_delivery(True, reason, stalled=waiting)

    def _due(self, now: float) -> list[tuple[Path, bytes]]:
        due = []
        pending = self.spool.pending(IN_FLIGHT * 4)
        if pending and self._sent_at:  # forget batches the spool dropped at its bound
            oldest = pending[0][0]
            self._sent_at = {p: t for p, t in self._sent_at.items() if p >= oldest}
        for path, body in pending:
            sent = self._sent_at.get(path)
            if sent is None or now - sent >= self.resend_after:
                due.append((path, body))
                if sent is not None:
                    self.resent += 1
            if len(due) >= IN_FLIGHT:
                break
        return due

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            chunk = self._due(time.monotonic())
            if not chunk:
                return
            # MQTT keeps QoS 1 messages of one session in order; waiting on a window
            # of them at once avoids one round trip per batch when draining a backlog.
            await asyncio.gather(*(client.publish(self.topic, body, qos=1) for _, body in chunk))
            now = time.monotonic()
            for path, _ in chunk:
                if not self.end_to_end:
                    self.spool.done(path)
                elif path.exists():  # not acknowledged (and removed) while we waited
                    self._sent_at[path] = now
            self.sent += len(chunk)

    def _acknowledged(self, payload: bytes) -> None:
        try:
            seqs = [int(s) for s in json.loads(payload)["seqs"]]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed metrics ack")
            return
        self._last_ack = time.monotonic()
        for seq in seqs:
            path = self.spool.path_of(seq)
            self._sent_at.pop(path, None)
            self.acked += self.spool.done(path)

    async def _acks(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._acknowledged(bytes(message.payload))

    async def run(self) -> None:
        """Connect, drain the spool whenever woken, reconnect with capped backoff."""
        # Jittered, so agents cut off together do not all come back at once.
        backoff = Backoff(RECONNECT_FIRST, RECONNECT_CAP, jitter=(0.5, 1.0))
        while True:
            acks: asyncio.Task[None] | None = None
            try:
                async with self.broker.client(self.identifier) as client:
                    self.connected = True
                    backoff.reset()
                    log.info("connected to the metrics broker", extra={"broker": self.broker.url})
                    refused = "no ack topic configured"
                    if self.ack_topic is not None:
                        refused = _refused(await client.subscribe(self.ack_topic, qos=1))
                    self._set_delivery(not refused, refused or None)
                    if not refused:
                        self._last_ack = time.monotonic()  # a fresh session: a fresh wait
                        acks = asyncio.create_task(self._acks(client))
                    while True:
                        await self._drain(client)
                        self._check_stalled(time.monotonic())
                        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                        # cancellation that lands as the event is set, and the task never ends.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.resend_after / 2):
                                await self.wake.wait()
                        self.wake.clear()
            except aiomqtt.MqttError as exc:
                self.failures += 1
                log.warning(
                    "metrics broker unreachable, buffering",
                    extra={"error": str(exc), "buffered": len(self.spool)},
                )
            finally:
                self.connected = False
                await cancel_and_wait([acks], aiomqtt.MqttError)
            await backoff.wait()


def _refused(granted: object) -> str:
    """The broker's reason for refusing a subscription, or "" if it was granted."""
    codes = granted if isinstance(granted, list | tuple) else [granted]
    bad = [str(c) for c in codes if getattr(c, "is_failure", False) or c == 0x80]
    return f"subscription to the ack topic refused: {', '.join(bad)}" if bad else ""
