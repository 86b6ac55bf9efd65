"""Manual MQTT acknowledgements, through aiomqtt's private paho client.

aiomqtt 2.5.1 acknowledges every QoS 1 message as soon as it is delivered and has
no switch for it. The collector must acknowledge a batch only once it is stored, so
this module reaches into ``aiomqtt.Client._client`` (the paho client) for paho's
public ``manual_ack_set`` and ``ack``. It is the only place that does; pyproject
pins ``aiomqtt==2.5.1`` and ``paho-mqtt>=2.1,<3`` for it, and
tests/test_dependency_adapters.py fails when either changes underneath.
"""

from __future__ import annotations

import aiomqtt
import paho.mqtt.client as paho

PINNED_AIOMQTT = "2.5.1"


def _paho(client: aiomqtt.Client) -> paho.Client:
    inner = client._client  # private: aiomqtt has no public way to it
    if not isinstance(inner, paho.Client):
        raise TypeError(f"aiomqtt.Client._client is {type(inner).__name__}, not paho's Client")
    return inner


def enable_manual_ack(client: aiomqtt.Client) -> None:
    """Stop the client from acknowledging QoS 1 messages on delivery; call before connecting."""
    _paho(client).manual_ack_set(True)


def ack(client: aiomqtt.Client, mid: int) -> None:
    """Send the PUBACK for a QoS 1 message received with manual acknowledgement on."""
    _paho(client).ack(mid, 1)
