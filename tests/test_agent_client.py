"""The agent's controller client against real controllers: replicas and failover."""

from __future__ import annotations

import asyncio
import signal
import ssl

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


async def test_a_ca_bundle_is_loaded_once_and_never_for_plain_http(monkeypatch) -> None:
    """Loading httpx's CA bundle costs ≈ 90 ms of CPU, and an agent makes a client at
    join, at start and on every reconnect: https replicas share one verifying context
    per process; plain-http replicas (nothing to verify) load none."""
    from cladnet.api_client import aio

    loads: list[ssl.SSLContext] = []
    real = httpx.create_ssl_context

    def counted() -> ssl.SSLContext:
        loads.append(real())
        return loads[-1]

    monkeypatch.setattr(aio.httpx, "create_ssl_context", counted)
    aio._default_tls.cache_clear()
    try:
        plain = AsyncClient("http://127.0.0.1:1,http://127.0.0.2:1")
        await plain.reconnect()
        assert loads == [] and plain._verify is False
        first, second = AsyncClient("https://127.0.0.1:1"), AsyncClient("http://a:1,https://b:1")
        await first.reconnect()
        assert len(loads) == 1
        assert first._verify is second._verify is loads[0]
        assert loads[0].verify_mode is ssl.CERT_REQUIRED and loads[0].check_hostname
        await asyncio.gather(plain.close(), first.close(), second.close())
    finally:
        aio._default_tls.cache_clear()
