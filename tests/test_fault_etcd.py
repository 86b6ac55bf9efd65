"""Fault test: a 3-member etcd cluster loses its leader during 200 concurrent joins
through two controllers. Every join succeeds (an agent retries what fails cleanly),
no overlay IP is handed out twice, and the state is consistent afterwards."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from cladnet.api_client import ApiClientError, AsyncClient
from cladnet.keys import generate_keypair
from lab.api import make_network, make_token
from lab.components import Controller, EtcdCluster, free_port

JOINS = 200


@pytest.fixture
def cluster(tmp_path: Path):
    c = EtcdCluster(tmp_path / "etcd")
    c.base_dir.mkdir()
    c.start()
    yield c
    c.stop()


async def _join(client: httpx.AsyncClient, token: str, name: str, outcomes: Counter) -> dict:
    """Join like an agent: retry what failed cleanly (5xx, broken connection)."""
    private, public = generate_keypair()
    body = {"token": token, "hostname": name, "public_key": public}
    for _ in range(40):
        try:
            r = await client.post("/v1/join", json=body)
            if r.status_code == 409 and r.json()["error"] == "key_in_use":
                # An earlier try joined but its answer was lost (etcd applied the txn
                # as the leader died): prove the key and re-join, as the agent does.
                outcomes["rejoined_with_key_proof"] += 1
                agent = AsyncClient(str(client.base_url))
                try:
                    joined = await agent.rejoin(token, private, hostname=name)
                    assert joined is not None, "key_in_use, yet no host has the key"
                    return joined
                except ApiClientError as exc:
                    assert exc.status >= 500, exc
                    r = httpx.Response(exc.status, json={"error": exc.code})
                finally:
                    await agent.close()
        except httpx.TransportError:
            outcomes["transport_error"] += 1
        else:
            if r.status_code == 200:
                return r.json()
            assert r.status_code >= 500, r.text  # never a 4xx for a valid join
            assert r.json()["error"], r.text  # and a clean JSON error
            outcomes[f"http_{r.status_code}_{r.json()['error']}"] += 1
        await asyncio.sleep(0.25)
    raise AssertionError(f"{name} never joined")


async def test_leader_killed_during_concurrent_joins(cluster: EtcdCluster, tmp_path: Path) -> None:
    controllers = [
        Controller(etcd_url=cluster.url, state_dir=tmp_path / f"ctl{i}", port=free_port())
        for i in range(2)
    ]
    for c in controllers:
        c.start()
    try:
        with controllers[0].client() as admin:
            make_network(admin, "fault", cidr="10.240.0.0/22")
            token = make_token(admin, "fault", max_uses=JOINS)
        outcomes: Counter = Counter()
        clients = [c.aclient(token=None) for c in controllers]
        tasks = [
            asyncio.create_task(_join(clients[i % 2], token, f"vm{i}", outcomes))
            for i in range(JOINS)
        ]
        await asyncio.sleep(0.3)  # joins in flight
        victim = cluster.leader()
        cluster.kill(victim)
        killed = time.monotonic()
        results = await asyncio.gather(*tasks)
        print(
            f"killed leader {victim}; joins done {time.monotonic() - killed:.1f}s later; "
            f"clean failures retried: {dict(outcomes)}"
        )
        for client in clients:
            await client.aclose()

        ips = [r["overlay_ip"] for r in results]
        assert len(set(ips)) == JOINS, "an overlay IP was handed out twice"
        assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.240.0.0/22") for ip in ips)
        with controllers[1].client() as admin:
            peers = admin.get("/v1/networks/fault/peers").json()["peers"]
            tokens = admin.get("/v1/networks/fault/tokens").json()
        assert sorted(p["overlay_ip"] for p in peers) == sorted(ips)
        assert len({p["name"] for p in peers}) == JOINS
        assert tokens[0]["uses"] == JOINS  # the limited token was not over-used
    finally:
        for c in controllers:
            c.stop()
