"""Several controller replicas against one etcd: uniqueness holds under concurrency."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx

from cladnet.keys import generate_keypair
from lab.api import make_network, make_token


async def joins(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], token: str, n: int
) -> list[httpx.Response]:
    """``n`` joins at once with fresh keys, alternating between the two replicas."""
    return await asyncio.gather(
        *(
            clients[i % 2].post(
                "/v1/join",
                json={"token": token, "hostname": f"vm-{i}", "public_key": generate_keypair()[1]},
            )
            for i in range(n)
        )
    )


async def test_200_concurrent_joins_across_two_controllers(make_controller) -> None:
    one, two = make_controller(), make_controller()
    with one.client() as admin:
        make_network(admin, "big", cidr="10.90.0.0/23", expected_hosts=300)
        token = make_token(admin, "big")

    limits = httpx.Limits(max_connections=100)
    async with (
        one.aclient(token=None, limits=limits) as c1,
        two.aclient(token=None, limits=limits) as c2,
    ):
        results = await joins((c1, c2), token, 200)

    assert [r.status_code for r in results] == [200] * 200, {
        r.text for r in results if r.status_code != 200
    }
    ips = [r.json()["overlay_ip"] for r in results]
    assert len(set(ips)) == 200
    cidr = ipaddress.IPv4Network("10.90.0.0/23")
    assert all(ipaddress.IPv4Address(ip) in cidr for ip in ips)
    assert len({r.json()["host_id"] for r in results}) == 200

    with two.client() as admin:
        peers = admin.get("/v1/networks/big/peers").json()["peers"]
    assert sorted(p["overlay_ip"] for p in peers) == sorted(ips)


async def test_concurrent_joins_fill_a_small_network_exactly(make_controller) -> None:
    one, two = make_controller(), make_controller()
    with one.client() as admin:
        make_network(admin, "small", cidr="10.91.0.0/27", expected_hosts=30)  # 30 addresses
        token = make_token(admin, "small")
    async with one.aclient(token=None) as c1, two.aclient(token=None) as c2:
        results = await joins((c1, c2), token, 40)
    ok = [r for r in results if r.status_code == 200]
    full = [r for r in results if r.status_code == 409]
    assert len(ok) == 30 and len(full) == 10
    assert all(r.json()["error"] == "network_full" for r in full)
    assert len({r.json()["overlay_ip"] for r in ok}) == 30


async def test_limited_token_is_never_overused(make_controller) -> None:
    one, two = make_controller(), make_controller()
    with one.client() as admin:
        make_network(admin, "net", cidr="10.92.0.0/24")
        token = make_token(admin, "net", max_uses=5)
    async with one.aclient(token=None) as c1, two.aclient(token=None) as c2:
        results = await joins((c1, c2), token, 20)
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 5, [r.text for r in results]
    assert all(
        r.json()["error"] in ("token_exhausted", "contention")
        for r in results
        if r.status_code != 200
    )


async def test_overlapping_network_creates_race_one_winner(make_controller) -> None:
    one, two = make_controller(), make_controller()
    cidrs = ["10.100.0.0/16", "10.100.0.0/24", "10.100.128.0/17", "10.100.7.0/24"] * 3
    async with one.aclient() as c1, two.aclient() as c2:
        results = await asyncio.gather(
            *(
                (c1 if i % 2 else c2).post("/v1/networks", json={"name": f"n{i}", "cidr": cidr})
                for i, cidr in enumerate(cidrs)
            )
        )
        # Same name from both replicas at once: exactly one wins.
        same_name = await asyncio.gather(
            *((c1 if i % 2 else c2).post("/v1/networks", json={"name": "dup"}) for i in range(6))
        )
        listed = (await c1.get("/v1/networks")).json()
    created = [r.json() for r in results if r.status_code == 201]
    nets = [ipaddress.IPv4Network(n["cidr"]) for n in listed if n["name"] != "dup"]
    for i, a in enumerate(nets):
        for b in nets[i + 1 :]:
            assert not a.overlaps(b), (a, b)
    assert len(created) >= 1
    assert all(r.status_code in (201, 409) for r in results)
    assert [r.status_code for r in same_name].count(201) == 1
    assert sum(1 for n in listed if n["name"] == "dup") == 1
    # The auto-picked CIDR for "dup" overlaps nothing either.
    dup = ipaddress.IPv4Network(next(n["cidr"] for n in listed if n["name"] == "dup"))
    assert not any(dup.overlaps(n) for n in nets)


async def test_an_address_freed_through_another_controller_is_used_when_the_network_is_full(
    make_controller,
) -> None:
    """A controller's address hint is stale after a host leaves through another replica;
    a full network is read again before a join is refused."""
    one, two = make_controller(), make_controller()
    with one.client() as admin:
        make_network(admin, "tiny", cidr="10.92.0.0/29", expected_hosts=6)  # 6 addresses
        token = make_token(admin, "tiny")
    with one.client(token=None) as c1:
        joined = [
            c1.post(
                "/v1/join",
                json={"token": token, "hostname": f"vm-{i}", "public_key": generate_keypair()[1]},
            ).json()
            for i in range(6)
        ]
        assert all("overlay_ip" in j for j in joined), joined
        with two.client(token=joined[2]["credential"]) as leaver:
            r = leaver.delete(f"/v1/hosts/{joined[2]['host_id']}")
            assert r.status_code in (200, 204), r.text
        again = c1.post(
            "/v1/join",
            json={"token": token, "hostname": "vm-new", "public_key": generate_keypair()[1]},
        )
        assert again.status_code == 200, again.text
        assert again.json()["overlay_ip"] == joined[2]["overlay_ip"]
        full = c1.post(
            "/v1/join",
            json={"token": token, "hostname": "vm-more", "public_key": generate_keypair()[1]},
        )
        assert full.status_code == 409 and full.json()["error"] == "network_full"
