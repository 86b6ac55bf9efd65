"""The agent's controller client against real controllers: replicas and failover."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from cladnet.api_client import AsyncClient
from cladnet.keys import generate_keypair
from lab.api import make_network, make_token
from lab.components import free_port


async def test_join_and_watch_fail_over_between_controller_replicas(make_controller) -> None:
    first, second = make_controller(), make_controller()
    with first.client() as admin:
        make_network(admin, "ha", cidr="10.230.0.0/24")
        token = make_token(admin, "ha")
    dead = f"http://127.0.0.1:{free_port()}"
    client = AsyncClient(f"{dead},{first.url},{second.url}")
    try:
        joined = await client.join(token, hostname="vm1", public_key=generate_keypair()[1])
        assert client.url == first.url  # the dead one was skipped
        net = joined["network"]["id"]
        peers, revision = await client.list_peers(net)
        assert [p["name"] for p in peers] == ["vm1"]

        # The replica serving the watch is killed: the stream breaks, the next call goes on.
        async def first_event() -> dict:
            async for event in client.watch_peers(net, revision):
                if event["type"] != "BOOKMARK":
                    return event
            raise AssertionError("stream ended")

        watching = asyncio.create_task(first_event())
        await asyncio.sleep(0.5)
        first.stop(signal.SIGKILL)
        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(watching, 30)
        assert client.url == second.url
        # vm2 joins through the other replica; the resumed watch sees it.
        other = AsyncClient(second.url)
        await other.join(token, hostname="vm2", public_key=generate_keypair()[1])
        await other.close()
        event = await asyncio.wait_for(first_event(), 30)
        assert event["type"] == "ADDED" and event["peer"]["name"] == "vm2"
    finally:
        await client.close()


async def test_a_single_dead_controller_is_a_clear_error() -> None:
    client = AsyncClient(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(httpx.ConnectError):
            await client.heartbeat("h-1")
    finally:
        await client.close()
    with pytest.raises(ValueError, match="no controller"):
        AsyncClient(" , ")
