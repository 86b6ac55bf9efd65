"""Per-host MQTT credentials on Mosquitto through its dynamic-security plugin.

Each host gets its own broker user and a role that may publish to exactly one
topic, ``cladnet/metrics/<network>/<host>``: a compromised VM cannot forge another
host's metrics. The controller talks to the broker as the dynsec admin over MQTT
(``$CONTROL/dynamic-security/v1``); no file on the broker's machine is touched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from cladnet import metrics

log = logging.getLogger("cladnet.controller")

CONTROL = "$CONTROL/dynamic-security/v1"


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
        await self.run(
            [
                {"command": "deleteClient", "username": host_id},
                {"command": "deleteRole", "rolename": host_id},
            ]
        )
