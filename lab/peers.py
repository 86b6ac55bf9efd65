"""Peer and network records as the controller streams them, for plan tests."""

from __future__ import annotations

import base64
from typing import Any

from agent.state import Membership

NETWORK = {
    "id": "n-1",
    "name": "lab",
    "cidr": "10.77.0.0/24",
    "mtu": 1420,
    "listen_port": 51820,
    "keepalive": 25,
}


def key(n: int) -> str:
    """A distinct, well-formed base64 key per number."""
    return base64.b64encode(bytes([n]) * 32).decode()


def host(n: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"h-{n}",
        "name": f"vm{n}",
        "network_id": "n-1",
        "public_key": key(n),
        "overlay_ip": f"10.77.0.{n}",
        "listen_port": 51820,
        "addresses": [],
        "public_address": None,
        "endpoints": [],
        "labels": {},
        "updated_at": 1700000000.0,
    }
    base.update(fields)
    return base


def membership(interface: str = "cl-test", revision: int = 10) -> Membership:
    """Host 1's membership of :data:`NETWORK`, holding host 2, as an agent test starts."""
    return Membership(
        controller="http://127.0.0.1:9",
        host_id="h-1",
        interface=interface,
        network=NETWORK,
        me=host(1),
        peers={"h-2": host(2)},
        revision=revision,
    )
