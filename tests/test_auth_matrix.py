"""Every route and every kind of caller → the right status. New routes must be added here
(the test fails on a route it does not know), so nothing ships unprotected by mistake."""

from __future__ import annotations

import httpx

from lab.api import join, make_network, make_token
from lab.components import ADMIN_TOKEN, Controller

PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/ca"),
    ("POST", "/v1/join"),
    ("POST", "/v1/join/challenge"),
}

# (method, path template) → who may call it: admin, viewer, self (the host itself),
# member (a host of that network).
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("GET", "/v1/networks"): {"admin", "viewer"},
    ("POST", "/v1/networks"): {"admin"},
    ("GET", "/v1/networks/{ref}"): {"admin", "viewer", "member"},
    ("DELETE", "/v1/networks/{ref}"): {"admin"},
    ("GET", "/v1/address-spaces"): {"admin", "viewer"},
    ("POST", "/v1/networks/{ref}/tokens"): {"admin"},
    ("GET", "/v1/networks/{ref}/tokens"): {"admin", "viewer"},
    ("DELETE", "/v1/networks/{ref}/tokens/{token_id}"): {"admin"},
    ("GET", "/v1/networks/{ref}/hosts"): {"admin", "viewer"},
    ("GET", "/v1/networks/{ref}/peers"): {"admin", "viewer", "member"},
    # Members read the enforced part (groups, rules); hosts never write it or their tags.
    ("GET", "/v1/networks/{ref}/policy"): {"admin", "viewer", "member"},
    ("PUT", "/v1/networks/{ref}/policy"): {"admin"},
    ("POST", "/v1/networks/{ref}/policy/test"): {"admin", "viewer"},
    ("GET", "/v1/networks/{ref}/policy/explain"): {"admin", "viewer"},
    ("GET", "/v1/whoami"): {"admin", "viewer", "self", "member", "stranger"},
    ("PUT", "/v1/hosts/{host_id}/tags"): {"admin"},
    ("GET", "/v1/hosts/{host_id}"): {"admin", "viewer", "self"},
    ("POST", "/v1/hosts/{host_id}/heartbeat"): {"admin", "self"},
    ("PUT", "/v1/hosts/{host_id}/endpoints"): {"admin", "self"},
    ("POST", "/v1/hosts/{host_id}/status"): {"admin", "self"},
    ("POST", "/v1/hosts/{host_id}/metrics-credentials"): {"admin", "self"},
    ("DELETE", "/v1/hosts/{host_id}"): {"admin", "self"},
    ("POST", "/v1/admin-tokens"): {"admin"},
    ("GET", "/v1/admin-tokens"): {"admin"},
    ("DELETE", "/v1/admin-tokens/{token_id}"): {"admin"},
    ("GET", "/v1/audit"): {"admin"},
    ("GET", "/v1/drivers"): {"admin", "viewer"},
    ("POST", "/v1/groups"): {"admin"},
    ("GET", "/v1/groups"): {"admin", "viewer"},
    ("GET", "/v1/groups/{name}"): {"admin", "viewer"},
    ("DELETE", "/v1/groups/{name}"): {"admin"},
    ("POST", "/v1/groups/{name}/actions"): {"admin"},
    ("POST", "/v1/groups/{name}/vms/{vm}/actions"): {"admin"},
    ("POST", "/v1/groups/{name}/commands"): {"admin"},
    ("GET", "/v1/groups/{name}/commands/{command_id}"): {"admin"},
    # A host's commands: its own agent only, not even the admin (no forged results).
    ("GET", "/v1/hosts/{host_id}/commands"): {"self"},
    # The collector's queries, proxied for the dashboard: readers, not hosts.
    ("GET", "/v1/monitoring/{path}"): {"admin", "viewer"},
    ("POST", "/v1/hosts/{host_id}/commands/{command_id}"): {"self"},
}
BODIES = {
    ("POST", "/v1/networks"): {"name": "made-by-matrix"},
    ("PUT", "/v1/hosts/{host_id}/endpoints"): {"endpoints": []},
    ("PUT", "/v1/networks/{ref}/policy"): {"rules": []},
    ("POST", "/v1/networks/{ref}/policy/test"): {"rules": []},
    ("PUT", "/v1/hosts/{host_id}/tags"): {"tags": ["t"]},
    ("POST", "/v1/hosts/{host_id}/status"): {"peers": []},
    ("POST", "/v1/admin-tokens"): {"role": "viewer"},
    ("POST", "/v1/groups"): {"name": "g", "members": [{"driver": "none", "region": "r"}]},
    ("POST", "/v1/groups/{name}/actions"): {"action": "suspend"},
    ("POST", "/v1/groups/{name}/vms/{vm}/actions"): {"action": "suspend"},
    ("POST", "/v1/groups/{name}/commands"): {"command": "true"},
    ("POST", "/v1/hosts/{host_id}/commands/{command_id}"): {"state": "running"},
}


def test_every_route_has_the_right_callers(controller: Controller, admin: httpx.Client) -> None:
    routes = {
        (method.upper(), path)
        for path, ops in admin.get("/openapi.json").json()["paths"].items()
        for method in ops
    }
    assert routes - PUBLIC == set(ALLOWED), "a route is missing from the auth matrix"

    make_network(admin, "m", cidr="10.251.0.0/24")
    make_network(admin, "elsewhere", cidr="10.251.1.0/24")
    target = join(controller, make_token(admin, "m"), "target").json()
    member = join(controller, make_token(admin, "m"), "member").json()
    stranger = join(controller, make_token(admin, "elsewhere"), "stranger").json()
    viewer = admin.post("/v1/admin-tokens", json={"role": "viewer"}).json()["token"]
    callers = {
        "nobody": None,
        "stranger": stranger["credential"],
        "member": member["credential"],
        "viewer": viewer,
        "self": target["credential"],
        "admin": ADMIN_TOKEN,
    }
    ids = {"ref": "m", "host_id": target["host_id"], "token_id": "t-none", "name": "g", "vm": "g-1"}
    ids["command_id"] = "cmd-none"
    ids["path"] = "alarms"
    # Leaving comes last (it ends the target host); the admin's network delete aims at
    # a network that does not exist (404 still proves it passed the auth check).
    leave = ("DELETE", "/v1/hosts/{host_id}")
    order = sorted(ALLOWED, key=lambda route: (route == leave, route))
    failures = []
    for method, template in order:
        allowed = ALLOWED[(method, template)]
        for who, token in callers.items():
            path = template.format(**ids)
            if who == "admin" and (method, template) == ("DELETE", "/v1/networks/{ref}"):
                path = "/v1/networks/absent"
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            with httpx.Client(base_url=controller.url, headers=headers, timeout=10) as c:
                r = c.request(method, path, json=BODIES.get((method, template)))
            may = who in allowed or (who == "self" and "member" in allowed)
            if who == "nobody":
                expected_ok = r.status_code == 401
            elif may:
                expected_ok = r.status_code not in (401, 403)
            else:
                expected_ok = r.status_code == 403
            if not expected_ok:
                failures.append(f"{who:8} {method:6} {template}: {r.status_code} {r.text[:80]}")
    assert not failures, "\n".join(failures)
