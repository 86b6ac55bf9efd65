"""Operator roles (admin, viewer) and the audit log of mutating calls."""

from __future__ import annotations

import time

import httpx

from lab.api import join, make_network, make_token
from lab.components import Controller
from tests.support import assert_error


def _as(ctl: Controller, token: str) -> httpx.Client:
    return ctl.client(token=token)


def test_viewers_read_everything_and_change_nothing(controller: Controller, admin) -> None:
    make_network(admin, "roles", cidr="10.235.0.0/24")
    created = admin.post("/v1/admin-tokens", json={"role": "viewer", "description": "ops"})
    assert created.status_code == 201, created.text
    viewer_token = created.json()["token"]
    assert "hash" not in created.json()
    token = make_token(admin, "roles")
    host = join(controller, token, "vm1").json()
    with _as(controller, viewer_token) as viewer:
        assert [n["name"] for n in viewer.get("/v1/networks").json()] == ["roles"]
        assert viewer.get("/v1/networks/roles/hosts").status_code == 200
        assert viewer.get(f"/v1/hosts/{host['host_id']}").status_code == 200
        assert viewer.get("/v1/networks/roles/peers").status_code == 200
        assert viewer.get("/v1/address-spaces").status_code == 200
        # Each token says who it is (the dashboard hides an admin's buttons from viewers).
        me = viewer.get("/v1/whoami").json()
        assert me["role"] == "viewer" and me["token_id"] == created.json()["id"]
    assert admin.get("/v1/whoami").json()["role"] == "admin"
    with _as(controller, host["credential"]) as agent:
        me = agent.get("/v1/whoami").json()
        assert (me["role"], me["host_id"]) == ("host", host["host_id"]) and me["network_id"]
    with _as(controller, viewer_token) as viewer:
        for method, path, body in [
            ("POST", "/v1/networks", {"name": "nope"}),
            ("DELETE", "/v1/networks/roles", None),
            ("POST", "/v1/networks/roles/tokens", {}),
            ("POST", "/v1/admin-tokens", {"role": "admin"}),
            ("DELETE", f"/v1/hosts/{host['host_id']}", None),
            ("POST", f"/v1/hosts/{host['host_id']}/heartbeat", {}),
            ("GET", "/v1/audit", None),
        ]:
            assert_error(viewer.request(method, path, json=body), 403, "forbidden")
    # Admin tokens can be listed (without hashes) and revoked.
    listed = admin.get("/v1/admin-tokens").json()
    assert [t["role"] for t in listed] == ["viewer"] and "hash" not in listed[0]
    assert admin.delete(f"/v1/admin-tokens/{listed[0]['id']}").status_code == 204
    with _as(controller, viewer_token) as viewer:
        # (the controller caches token lookups for a few seconds)
        for _ in range(60):
            if viewer.get("/v1/networks").status_code == 401:
                break
            time.sleep(0.2)
        assert viewer.get("/v1/networks").status_code == 401
    bad_role = admin.post("/v1/admin-tokens", json={"role": "root"})
    assert bad_role.status_code == 422 and bad_role.json()["error"]


def test_mutating_calls_are_audited(controller: Controller, admin) -> None:
    make_network(admin, "audited", cidr="10.236.0.0/24")
    token = make_token(admin, "audited")
    host = join(controller, token, "vm1").json()
    with controller.client(token=host["credential"]) as agent:
        agent.post(f"/v1/hosts/{host['host_id']}/heartbeat", json={})  # telemetry: not audited
    admin.post("/v1/networks", json={"name": "BAD NAME"})  # refused, still audited
    entries = admin.get("/v1/audit", params={"limit": 10}).json()["entries"]
    seen = [(e["method"], e["path"], e["status"], e["who"].split(":")[0]) for e in entries]
    assert seen == [
        ("POST", "/v1/networks", 422, "admin"),
        ("POST", "/v1/join", 200, "join-token"),
        ("POST", "/v1/networks/audited/tokens", 201, "admin"),
        ("POST", "/v1/networks", 201, "admin"),
    ]
    assert all(e["ts"] > 0 and e["source"] == "127.0.0.1" for e in entries)
