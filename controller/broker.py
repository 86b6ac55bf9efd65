"""Per-host MQTT credentials on Mosquitto through its dynamic-security plugin.

Each host gets its own broker user and a role that may publish to exactly one
topic, ``cladnet/metrics/<network>/<host>``: a compromised VM cannot forge another
host's metrics. The controller talks to the broker as the dynsec admin over MQTT
(``$CONTROL/dynamic-security/v1``); no file on the broker's machine is touched.

A user lives as long as its host: ``leave`` removes it at once, and ``prune`` removes
every host user whose host is gone (a deleted network or group, a removal, a broker
that was away at the time). Prune is a reconcile, not bookkeeping: it compares the
broker's users with etcd's hosts, so nothing can be forgotten on the way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from cladnet import metrics
from controller.telemetry import BROKER_CLEANUP_FAILURES, BROKER_USERS_REMOVED

log = logging.getLogger("cladnet.controller")

CONTROL = "$CONTROL/dynamic-security/v1"
HOST_USER = re.compile(r"h-[0-9a-f]{16}")  # a host id (tokens.new_id("h-")) names its user
DELETE_BATCH = 50  # users per dynsec request (two commands each)


class BrokerError(Exception):
    """The broker refused a command or could not be reached."""


@dataclass
class BrokerAdmin:
    """Dynsec admin connection settings; ``public_url`` is what agents are told."""

    public_url: str
    admin_url: str
    username: str
    password: str
    timeout: float = 10.0
    ca_file: str | None = None  # mqtts: the CA to verify the broker with (None: system's)

    def _client(self) -> aiomqtt.Client:
        parts = urlsplit(self.admin_url)
        tls = parts.scheme == "mqtts"
        return aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            username=self.username,
            password=self.password,
            identifier=f"cladnet-controller-{uuid.uuid4().hex[:8]}",
            tls_params=aiomqtt.TLSParameters(ca_certs=self.ca_file) if tls else None,
            timeout=self.timeout,
        )

    async def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send dynsec commands; return their responses (each may carry an ``error``)."""
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client() as client:
                    await client.subscribe(f"{CONTROL}/response", qos=1)
                    await client.publish(CONTROL, json.dumps({"commands": commands}), qos=1)
                    async for message in client.messages:
                        return list(json.loads(bytes(message.payload)).get("responses", []))
        except (aiomqtt.MqttError, TimeoutError, ValueError) as exc:
            raise BrokerError(f"broker admin at {self.admin_url}: {exc!r}") from exc
        raise BrokerError("broker closed the connection without answering")

    async def register(self, host_id: str, network: str, host: str) -> dict[str, str]:
        """(Re)create the host's broker user; returns what the agent needs to publish."""
        password = secrets.token_urlsafe(24)
        topic = metrics.topic(network, host)
        acks = metrics.ack_topic(network, host)
        # Deleting first makes this idempotent (a re-join gets a fresh password).
        await self.run(
            [
                {"command": "deleteClient", "username": host_id},
                {"command": "deleteRole", "rolename": host_id},
            ]
        )
        responses = await self.run(
            [
                {
                    "command": "createRole",
                    "rolename": host_id,
                    "acls": [
                        {
                            "acltype": "publishClientSend",
                            "topic": topic,
                            "priority": 10,
                            "allow": True,
                        },
                        {
                            "acltype": "subscribeLiteral",
                            "topic": acks,
                            "priority": 10,
                            "allow": True,
                        },
                    ],
                },
                {
                    "command": "createClient",
                    "username": host_id,
                    "password": password,
                    "roles": [{"rolename": host_id}],
                },
            ]
        )
        errors = [r["error"] for r in responses if r.get("error")]
        if errors:
            raise BrokerError("; ".join(errors))
        return {
            "broker": self.public_url,
            "username": host_id,
            "password": password,
            "topic": topic,
            "ack_topic": acks,
        }

    async def unregister(self, host_id: str) -> None:
        """Delete the host's user (its connections are dropped) and role."""
        await self._delete([host_id])

    async def _delete(self, host_ids: list[str]) -> None:
        for i in range(0, len(host_ids), DELETE_BATCH):
            commands = []
            for host_id in host_ids[i : i + DELETE_BATCH]:
                commands.append({"command": "deleteClient", "username": host_id})
                commands.append({"command": "deleteRole", "rolename": host_id})
            await self.run(commands)

    async def host_users(self) -> list[str]:
        """The broker users made for hosts (others, such as the collector's, are not)."""
        command = {"command": "listClients", "verbose": False, "count": -1, "offset": 0}
        (response,) = await self.run([command])
        if response.get("error"):
            raise BrokerError(f"listClients: {response['error']}")
        clients = response.get("data", {}).get("clients", [])
        return [c for c in clients if isinstance(c, str) and HOST_USER.fullmatch(c)]

    async def prune(self, hosts: Callable[[], Awaitable[set[str]]]) -> int:
        """Delete the users of hosts not in ``hosts()``; returns how many went."""
        # Users first, hosts second: a host whose user is listed existed before the
        # listing, so a host joining meanwhile is never taken for a gone one.
        users = await self.host_users()
        if not users:
            return 0
        known = await hosts()
        gone = [u for u in users if u not in known]
        if gone:
            await self._delete(gone)
            BROKER_USERS_REMOVED.inc(len(gone))
            log.info("broker users of gone hosts removed", extra={"count": len(gone)})
        return len(gone)


class BrokerJanitor:
    """Prunes gone hosts' broker users now and then, and at once when woken (leader only)."""

    def __init__(
        self, broker: BrokerAdmin, hosts: Callable[[], Awaitable[set[str]]], interval: float
    ) -> None:
        self.broker, self.hosts, self.interval = broker, hosts, interval
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Hosts went (a network or group was deleted): prune soon."""
        self._wake.set()

    async def run(self) -> None:
        """Forever: prune, then wait ``interval`` or a wake-up; a broker away is retried."""
        while True:
            self._wake.clear()
            started = time.monotonic()
            try:
                await self.broker.prune(self.hosts)
            except BrokerError as exc:
                BROKER_CLEANUP_FAILURES.inc()
                log.warning("broker user cleanup failed", extra={"error": str(exc)})
            # At most one prune per second however often it is woken.
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
