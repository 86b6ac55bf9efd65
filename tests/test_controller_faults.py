"""Fault test: a controller is killed (-9) in the middle of deleting a network with
500 hosts. The other replica finishes the deletion (or finds it finished); nothing
under /cladnet/ is left that refers to the network, its hosts or its tokens, and the
other network is untouched. Real etcd, real controllers, killed for real."""

from __future__ import annotations

import asyncio
import os
import signal
from urllib.parse import urlparse

import aetcd
import httpx
from aetcd.rtypes import EventKind

from cladnet.keys import generate_keypair
from lab.api import make_network, make_token
from lab.components import Controller, Etcd

HOSTS = 500


async def _join_all(ctl: Controller, tokens: list[str], count: int, prefix: str) -> list[str]:
    """``count`` hosts join through the API (tokens used in turn); their host ids."""
    limit = asyncio.Semaphore(32)

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {
            "token": tokens[i % len(tokens)],
            "hostname": f"{prefix}{i}",
            "public_key": generate_keypair()[1],
            "listen_port": 51820,
        }
        async with limit:
            r = await client.post("/v1/join", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["host_id"])

    async with ctl.aclient(token=None) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(count))))


def _keys(etcd: Etcd) -> set[str]:
    """Every key under /cladnet/."""
    return {k for k in etcd.ctl("get", "--prefix", "/cladnet/", "--keys-only").split() if k}


async def test_controller_killed_during_network_deletion(make_controller, etcd: Etcd) -> None:
    a: Controller = make_controller()
    b: Controller = make_controller()
    with a.client() as admin:
        net_id = make_network(admin, "doomed", cidr="10.241.0.0/22")["id"]
        make_network(admin, "kept", cidr="10.242.0.0/24")
        # A limited token (one slot key per use) and an unlimited one (one use key each).
        doomed_tokens = [
            make_token(admin, "doomed", max_uses=HOSTS),
            make_token(admin, "doomed"),
        ]
        token_ids = [t["id"] for t in admin.get("/v1/networks/doomed/tokens").json()]
        kept_token = make_token(admin, "kept", max_uses=10)
    host_ids = await _join_all(a, doomed_tokens, HOSTS, "vm")
    await _join_all(b, [kept_token], 5, "keep")
    before = _keys(etcd)
    refs = {net_id, "doomed", *host_ids, *token_ids}

    def referring(keys: set[str]) -> list[str]:
        """Keys whose path names the network, one of its hosts or one of its tokens."""
        return sorted(k for k in keys if refs & set(k.split("/")))

    doomed_keys = referring(before)
    kept_keys = before - set(doomed_keys)
    assert len(doomed_keys) > 5 * HOSTS  # host, hostname, ip, peer, liveness, token use

    # Kill A the moment its deletion is seen removing the first host record.
    url = urlparse(etcd.url)
    client = aetcd.Client(host=url.hostname or "127.0.0.1", port=url.port or 2379)
    assert a.proc is not None
    pid = a.proc.pid
    try:
        watch = await client.watch_prefix(b"/cladnet/hosts/", kind=EventKind.DELETE)
        async with a.aclient() as admin_a:
            deletion = asyncio.create_task(
                admin_a.delete("/v1/networks/doomed", params={"force": "true"})
            )
            async with asyncio.timeout(30):
                async for _event in watch:
                    os.kill(pid, signal.SIGKILL)
                    break
            await watch.cancel()
            try:
                r = await asyncio.wait_for(deletion, 30)
                outcome = f"the DELETE answered {r.status_code}"
            except httpx.TransportError as exc:
                outcome = f"the DELETE was cut off ({type(exc).__name__})"
    finally:
        await client.close()
    a.proc.wait(10)
    a.proc = None
    left = referring(_keys(etcd))
    hosts_left = sum(1 for k in left if k.startswith("/cladnet/hosts/"))
    print(f"killed A: {outcome}; {hosts_left} of {HOSTS} host records and {len(left)} keys left")

    # B finishes what A started, or finds it finished.
    with b.client() as admin_b:
        r = admin_b.get("/v1/networks/doomed")
        if r.status_code == 200:
            r = admin_b.delete("/v1/networks/doomed", params={"force": "true"})
            assert r.status_code == 200, r.text
            print("B finished the deletion")
        else:
            assert r.status_code == 404, r.text
            print("the network was gone already")
        assert admin_b.get("/v1/networks/doomed").status_code == 404
        assert "doomed" not in [n["name"] for n in admin_b.get("/v1/networks").json()]
        kept_hosts = admin_b.get("/v1/networks/kept/hosts").json()
    after = _keys(etcd)
    assert referring(after) == [], "orphaned keys of the deleted network"
    # Everything else is as it was (but for new audit entries, and the janitor's lease
    # key, which may have moved to B).
    changed = {
        k for k in kept_keys ^ after if not k.startswith(("/cladnet/leader/", "/cladnet/audit/"))
    }
    assert changed == set(), changed
    assert sorted(h["name"] for h in kept_hosts) == [f"keep{i}" for i in range(5)]
