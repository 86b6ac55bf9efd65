"""Host credentials and metric publishing against a real broker."""

from __future__ import annotations

import asyncio
import time

import aiomqtt

from cladnet.metrics import Batch
from lab.api import join, make_token
from lab.components import Controller, Mosquitto


def publish_health(
    ctl: Controller, broker: Mosquitto, network: str, host: dict, name: str, peers: dict
) -> None:
    """What an agent publishes about its peers (peer name → handshake_age_s, latency_ms):
    the per-peer series of one metrics batch, over MQTT to the collector."""
    with ctl.client(token=host["credential"]) as c:
        r = c.post(f"/v1/hosts/{host['host_id']}/metrics-credentials")
    r.raise_for_status()
    creds = r.json()
    batch = Batch(network=network, host=name, seq=0, ts=time.time(), interval=2.0)
    for peer, figures in peers.items():
        if figures.get("handshake_age_s") is not None:
            batch.add("wireguard_peer_handshake_age_seconds", figures["handshake_age_s"], peer=peer)
        batch.add("wireguard_peer_receive_bytes_total", 10.0, peer=peer)
        batch.add("wireguard_peer_transmit_bytes_total", 10.0, peer=peer)
        if figures.get("latency_ms") is not None:
            batch.add("wireguard_peer_latency_seconds", figures["latency_ms"] / 1000, peer=peer)
    asyncio.run(publish(broker, creds, creds["topic"], batch.encode()))


async def publish(broker: Mosquitto, creds: dict, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=creds["username"],
        password=creds["password"],
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.publish(topic, payload, qos=1)


def host_credentials(ctl: Controller, net: str, hostname: str) -> tuple[dict, dict]:
    with ctl.client() as admin:
        token = make_token(admin, net)
    joined = join(ctl, token, hostname)
    assert joined.status_code == 200, joined.text
    body = joined.json()
    with ctl.client(token=body["credential"]) as host:
        r = host.post(f"/v1/hosts/{body['host_id']}/metrics-credentials")
    assert r.status_code == 200, r.text
    return body, r.json()
