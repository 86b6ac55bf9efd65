"""Sends spooled batches to the MQTT broker at QoS 1, in order, and keeps trying."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt

from agent.metrics.spool import Spool
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

    With ``ack_topic`` (end-to-end acknowledgement) a batch leaves the spool only when
    a collector says it stored it; a broker's PUBACK is not enough, because a broker
    restart can drop what it acknowledged (Mosquitto 2.0 does not restore shared
    subscriptions from its persistence file). Unacknowledged batches are sent again
    after ``resend_after`` seconds; the collector drops the duplicates.
    """

    def __init__(
        self,
        broker: Broker,
        identifier: str,
        topic: str,
        spool: Spool,
        ack_topic: str | None = None,
        resend_after: float = 30.0,
    ) -> None:
        self.broker, self.identifier, self.topic, self.spool = broker, identifier, topic, spool
        self.ack_topic, self.resend_after = ack_topic, resend_after
        self.wake = asyncio.Event()
        self.connected = False
        self.sent = 0
        self.resent = 0
        self.failures = 0
        self._sent_at: dict[Path, float] = {}  # awaiting the collector's ack

    def _due(self, now: float) -> list[tuple[Path, bytes]]:
        due = []
        for path, body in self.spool.pending(IN_FLIGHT * 4):
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
                if self.ack_topic is None:
                    self.spool.done(path)
                else:
                    self._sent_at[path] = now
            self.sent += len(chunk)

    def _acknowledged(self, payload: bytes) -> None:
        try:
            seqs = [int(s) for s in json.loads(payload)["seqs"]]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed metrics ack")
            return
        for seq in seqs:
            path = self.spool.path_of(seq)
            self._sent_at.pop(path, None)
            self.spool.done(path)

    async def _acks(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._acknowledged(bytes(message.payload))

    async def run(self) -> None:
        """Connect, drain the spool whenever woken, reconnect with capped backoff."""
        delay = RECONNECT_FIRST
        while True:
            acks: asyncio.Task[None] | None = None
            try:
                async with self.broker.client(self.identifier) as client:
                    self.connected, delay = True, RECONNECT_FIRST
                    log.info("connected to the metrics broker", extra={"broker": self.broker.url})
                    if self.ack_topic is not None:
                        await client.subscribe(self.ack_topic, qos=1)
                        acks = asyncio.create_task(self._acks(client))
                    while True:
                        await self._drain(client)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.wake.wait(), self.resend_after / 2)
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
            # Jittered, so agents cut off together do not all come back at once.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_CAP)
