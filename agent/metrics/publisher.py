"""Sends spooled batches to the MQTT broker at QoS 1, in order, and keeps trying."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiomqtt

from agent.metrics.spool import Spool

log = logging.getLogger("cladnet.agent")

IN_FLIGHT = 32  # batches published before waiting for their acknowledgements


@dataclass
class Broker:
    """Where and as whom to publish; from the controller's join answer."""

    url: str  # mqtt://host:port or mqtts://host:port
    username: str | None = None
    password: str | None = None

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
            tls_params=aiomqtt.TLSParameters() if tls else None,
            keepalive=30,
            timeout=10,
        )


class Publisher:
    """Drains the spool to ``topic`` whenever woken; reconnects with capped backoff."""

    def __init__(self, broker: Broker, identifier: str, topic: str, spool: Spool) -> None:
        self.broker, self.identifier, self.topic, self.spool = broker, identifier, topic, spool
        self.wake = asyncio.Event()
        self.connected = False
        self.sent = 0
        self.failures = 0

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            chunk = self.spool.pending(IN_FLIGHT)
            if not chunk:
                return
            # MQTT keeps QoS 1 messages of one session in order; waiting on a window
            # of them at once avoids one round trip per batch when draining a backlog.
            await asyncio.gather(*(client.publish(self.topic, body, qos=1) for _, body in chunk))
            for path, _ in chunk:
                self.spool.done(path)
            self.sent += len(chunk)

    async def run(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self.broker.client(self.identifier) as client:
                    self.connected, delay = True, 0.5
                    log.info("connected to the metrics broker", extra={"broker": self.broker.url})
                    while True:
                        await self._drain(client)
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
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 30.0)
