"""Controller API calls the tests and benchmarks share (networks, tokens, joins)."""

from __future__ import annotations

import httpx

from cladnet.keys import generate_keypair
from lab.components import Controller


def make_network(admin: httpx.Client, name: str = "prod", **kw) -> dict:
    r = admin.post("/v1/networks", json={"name": name, **kw})
    assert r.status_code == 201, r.text
    return r.json()


def make_token(admin: httpx.Client, net: str, **kw) -> str:
    r = admin.post(f"/v1/networks/{net}/tokens", json=kw)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def join(
    ctl: Controller,
    token: str,
    hostname: str,
    public_key: str | None = None,
    transport: httpx.HTTPTransport | None = None,
    **kw,
) -> httpx.Response:
    body = {
        "token": token,
        "hostname": hostname,
        "public_key": public_key or generate_keypair()[1],
        "listen_port": 51820,
        **kw,
    }
    with ctl.client(token=None, transport=transport) as c:
        return c.post("/v1/join", json=body)
