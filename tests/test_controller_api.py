"""The controller against a real etcd: networks, tokens, join, host calls, auth."""

from __future__ import annotations

import ipaddress
import os
import stat

import httpx
import pytest

from cladnet.keys import generate_keypair
from lab.api import join, make_network, make_token
from lab.components import ADMIN_TOKEN, Controller
from tests.support import assert_error

# --- networks ----------------------------------------------------------------------------


def test_create_network_with_and_without_cidr(admin: httpx.Client) -> None:
    chosen = make_network(admin, "alpha", cidr="10.77.0.0/24", mtu=1400, listen_port=51900)
    assert chosen["cidr"] == "10.77.0.0/24"
    assert chosen["mtu"] == 1400 and chosen["listen_port"] == 51900

    auto = make_network(admin, "beta", expected_hosts=300)
    net = ipaddress.IPv4Network(auto["cidr"])
    assert net.is_private and net.num_addresses - 2 >= 600  # 2x headroom
    assert not net.overlaps(ipaddress.IPv4Network("10.77.0.0/24"))

    names = [n["name"] for n in admin.get("/v1/networks").json()]
    assert names == ["alpha", "beta"]
    assert admin.get("/v1/networks/alpha").json()["id"] == chosen["id"]
    assert admin.get(f"/v1/networks/{auto['id']}").json()["name"] == "beta"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        # The schema's pattern says these (so the server refuses what the document refuses).
        ({"name": "x", "cidr": "10.0.0.0/33"}, 422, "invalid_request"),
        ({"name": "x", "cidr": "banana"}, 422, "invalid_request"),
        ({"name": "x", "cidr": "8.8.8.0/24"}, 422, "invalid_request"),
        ({"name": "x", "cidr": "172.32.0.0/24"}, 422, "invalid_request"),
        ({"name": "x", "cidr": "10.0.0.0/31"}, 422, "invalid_request"),
        ({"name": "x\n"}, 422, "invalid_request"),
        ({"name": "x", "cidr": "10.50.0.0/28", "expected_hosts": 20}, 400, "cidr_too_small"),
        ({"name": "Bad_Name"}, 422, "invalid_request"),
        ({"name": "x", "mtu": 100}, 422, "invalid_request"),
        ({"name": "x", "listen_port": 70000}, 422, "invalid_request"),
        ({"name": "x", "surprise": 1}, 422, "invalid_request"),
    ],
)
def test_create_network_rejections_write_nothing(admin: httpx.Client, body, status, code) -> None:
    assert_error(admin.post("/v1/networks", json=body), status, code)
    assert admin.get("/v1/networks").json() == []


def test_a_cidr_with_host_bits_is_its_network(admin: httpx.Client) -> None:
    assert make_network(admin, "x", cidr="10.0.0.1/24")["cidr"] == "10.0.0.0/24"


def test_network_conflicts(admin: httpx.Client, controller: Controller) -> None:
    make_network(admin, "one", cidr="10.10.0.0/16")
    assert_error(
        admin.post("/v1/networks", json={"name": "one", "cidr": "10.20.0.0/24"}),
        409,
        "network_exists",
    )
    assert_error(
        admin.post("/v1/networks", json={"name": "two", "cidr": "10.10.5.0/24"}),
        409,
        "cidr_overlaps_network",
    )
    assert_error(
        admin.post("/v1/networks", json={"name": "two", "cidr": "10.0.0.0/8"}),
        409,
        "cidr_overlaps_network",
    )
    # A host's underlay subnet is taken too.
    token = make_token(admin, "one")
    r = join(controller, token, "vm1", addresses=["192.168.7.10/24"])
    assert r.status_code == 200, r.text
    assert_error(
        admin.post("/v1/networks", json={"name": "two", "cidr": "192.168.7.128/25"}),
        409,
        "cidr_overlaps_underlay",
    )
    # The planner leaves that subnet out too.
    spaces = admin.get("/v1/address-spaces", params={"hosts": 50}).json()
    block = next(b for b in spaces["blocks"] if b["block"] == "192.168.0.0/16")
    for free in block["free"]:
        assert not ipaddress.IPv4Network(free).overlaps(ipaddress.IPv4Network("192.168.7.0/24"))
    assert [n["name"] for n in admin.get("/v1/networks").json()] == ["one"]


def test_delete_network_needs_force_when_it_has_hosts(
    admin: httpx.Client, controller: Controller
) -> None:
    net = make_network(admin, "gone", cidr="10.30.0.0/24")
    token = make_token(admin, "gone")
    assert join(controller, token, "vm1").status_code == 200
    assert_error(admin.delete("/v1/networks/gone"), 409, "network_has_hosts")
    assert admin.get("/v1/networks/gone").status_code == 200
    assert admin.delete("/v1/networks/gone", params={"force": "true"}).status_code == 200
    assert_error(admin.get("/v1/networks/gone"), 404, "network_not_found")
    assert_error(admin.get(f"/v1/networks/{net['id']}/peers"), 404, "network_not_found")
    # The name and the CIDR are free again; the old token is gone with the network.
    make_network(admin, "gone", cidr="10.30.0.0/24")
    assert_error(join(controller, token, "vm2"), 401, "invalid_token")


def test_address_spaces(admin: httpx.Client) -> None:
    make_network(admin, "a", cidr="10.0.0.0/9")
    r = admin.get("/v1/address-spaces", params={"hosts": 1000})
    assert r.status_code == 200
    body = r.json()
    assert body["prefix_len"] <= 21  # 2046 usable >= 2 x 1000
    assert [b["block"] for b in body["blocks"]] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
    assert body["blocks"][0]["free"] == ["10.128.0.0/9"]
    rec = ipaddress.IPv4Network(body["recommended"])
    assert rec.prefixlen == body["prefix_len"]
    assert not rec.overlaps(ipaddress.IPv4Network("10.0.0.0/9"))
    assert_error(admin.get("/v1/address-spaces", params={"hosts": 0}), 422, "invalid_request")


# --- join and host calls -------------------------------------------------------------------


def test_join_allocates_ip_and_rejoin_keeps_it(admin: httpx.Client, controller: Controller) -> None:
    make_network(admin, "prod", cidr="10.40.0.0/24")
    token = make_token(admin, "prod")
    priv, pub = generate_keypair()
    r = join(controller, token, "vm1", pub, addresses=["10.0.1.5/24"], labels={"cloud": "aws"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert ipaddress.IPv4Address(body["overlay_ip"]) in ipaddress.IPv4Network("10.40.0.0/24")
    assert body["prefix_len"] == 24
    assert body["observed_address"] == "127.0.0.1"
    assert body["network"]["name"] == "prod"
    assert body["credential"].startswith("clh_")
    assert priv not in r.text

    # The same name and key again, with only the token: not the host (its key is public).
    assert_error(join(controller, token, "vm1", pub), 409, "key_in_use")
    # Proven by its credential, it re-joins: same IP, and the old credential is replaced.
    with controller.client(body["credential"]) as c:
        again = c.post("/v1/join", json={"token": token, "hostname": "vm1", "public_key": pub})
    assert again.status_code == 200, again.text
    assert again.json()["overlay_ip"] == body["overlay_ip"]
    assert again.json()["host_id"] == body["host_id"]
    with controller.client(body["credential"]) as old:
        assert_error(old.post(f"/v1/hosts/{body['host_id']}/heartbeat"), 401, "unauthorized")

    # Same name, other key: a new host needs another name; replace=true needs a proof.
    other = generate_keypair()[1]
    assert_error(join(controller, token, "vm1", other), 409, "hostname_taken")
    assert_error(join(controller, token, "vm1", other, replace=True), 403, "proof_required")
    peers = admin.get("/v1/networks/prod/peers").json()["peers"]
    assert [p["public_key"] for p in peers] == [pub]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"public_key": "not-base64!"}, "invalid_request"),
        ({"public_key": "AAAA"}, "invalid_request"),
        ({"hostname": "-bad-"}, "invalid_request"),
        ({"addresses": ["10.0.0.300/24"]}, "invalid_request"),
        ({"labels": {"BAD KEY": "x"}}, "invalid_request"),
        ({"private_key": "x"}, "invalid_request"),
    ],
)
def test_join_rejects_bad_input(admin: httpx.Client, controller: Controller, change, code) -> None:
    make_network(admin, "prod", cidr="10.40.0.0/24")
    token = make_token(admin, "prod")
    body = {"token": token, "hostname": "vm1", "public_key": generate_keypair()[1], **change}
    with controller.client(token=None) as c:
        assert_error(c.post("/v1/join", json=body), 422, code)
    assert admin.get("/v1/networks/prod/peers").json()["peers"] == []


def test_join_token_rules(admin: httpx.Client, controller: Controller, etcd) -> None:
    make_network(admin, "prod", cidr="10.40.0.0/24")
    assert_error(join(controller, "clj_nope.nope", "vm1"), 401, "invalid_token")
    assert_error(join(controller, "garbage", "vm1"), 401, "invalid_token")
    assert_error(join(controller, ADMIN_TOKEN, "vm1"), 401, "invalid_token")

    once = make_token(admin, "prod", max_uses=1)
    assert join(controller, once, "vm1").status_code == 200
    assert_error(join(controller, once, "vm2"), 403, "token_exhausted")

    tokens = admin.get("/v1/networks/prod/tokens").json()
    assert len(tokens) == 1 and tokens[0]["uses"] == 1 and "hash" not in tokens[0]
    # Only the hash is stored.
    dump = etcd.ctl("get", "--prefix", "/cladnet/tokens/")
    assert once.split(".", 1)[1] not in dump

    revoked = make_token(admin, "prod")
    token_id = revoked.split(".")[0].removeprefix("clj_")
    assert admin.delete(f"/v1/networks/prod/tokens/{token_id}").status_code == 204
    assert_error(join(controller, revoked, "vm3"), 401, "invalid_token")


def test_network_exhaustion(admin: httpx.Client, controller: Controller) -> None:
    make_network(admin, "tiny", cidr="10.60.0.0/30", expected_hosts=2)
    token = make_token(admin, "tiny")
    ips = {join(controller, token, f"vm{i}").json()["overlay_ip"] for i in range(2)}
    assert ips == {"10.60.0.1", "10.60.0.2"}
    body = assert_error(join(controller, token, "vm3"), 409, "network_full")
    assert "tiny" in body["message"]


def test_host_calls_and_isolation(admin: httpx.Client, controller: Controller) -> None:
    make_network(admin, "prod", cidr="10.40.0.0/24")
    make_network(admin, "other", cidr="10.41.0.0/24")
    token = make_token(admin, "prod")
    a = join(controller, token, "vm-a", addresses=["10.0.1.5/24"]).json()
    b = join(controller, token, "vm-b").json()
    c = join(controller, make_token(admin, "other"), "vm-c").json()

    with controller.client(a["credential"]) as agent:
        r = agent.post(f"/v1/hosts/{a['host_id']}/heartbeat", json={"addresses": ["10.0.2.7/24"]})
        assert r.status_code == 200, r.text
        assert r.json()["changed"] is True and r.json()["observed_address"] == "127.0.0.1"
        assert agent.post(f"/v1/hosts/{a['host_id']}/heartbeat").json()["changed"] is False

        r = agent.put(
            f"/v1/hosts/{a['host_id']}/endpoints", json={"endpoints": ["198.51.100.1:51820"]}
        )
        assert r.status_code == 200 and r.json()["endpoints"] == ["198.51.100.1:51820"]
        # Per-peer status went to the collector: the old route is gone, and writes nothing.
        assert_error(agent.post(f"/v1/hosts/{a['host_id']}/status", json={}), 410, "gone")
        assert agent.get(f"/v1/networks/{a['network']['id']}/peers").status_code == 200
        assert agent.get(f"/v1/networks/{a['network']['id']}").status_code == 200

        # Another host of the same network, or of another: 403, and nothing changes.
        for victim in (b, c):
            hid = victim["host_id"]
            assert_error(agent.post(f"/v1/hosts/{hid}/heartbeat"), 403, "forbidden")
            assert_error(
                agent.put(f"/v1/hosts/{hid}/endpoints", json={"public_key": generate_keypair()[1]}),
                403,
                "forbidden",
            )
            assert_error(
                agent.post(f"/v1/hosts/{hid}/status", json={"peers": []}), 403, "forbidden"
            )
            assert_error(agent.delete(f"/v1/hosts/{hid}"), 403, "forbidden")
            assert_error(agent.get(f"/v1/hosts/{hid}"), 403, "forbidden")
        assert_error(agent.get(f"/v1/networks/{c['network']['id']}/peers"), 403, "forbidden")
        # Agents cannot use the management API.
        assert_error(agent.get("/v1/networks"), 403, "forbidden")
        assert_error(agent.post("/v1/networks", json={"name": "evil"}), 403, "forbidden")

    hosts = {h["name"]: h for h in admin.get("/v1/networks/prod/hosts").json()}
    assert hosts["vm-a"]["addresses"] == ["10.0.2.7/24"]
    assert "status" not in hosts["vm-a"]
    assert hosts["vm-a"]["last_seen"] is not None
    assert admin.get(f"/v1/hosts/{b['host_id']}").json()["name"] == "vm-b"

    # Leave releases the IP and the name.
    with controller.client(a["credential"]) as agent:
        assert agent.delete(f"/v1/hosts/{a['host_id']}").status_code == 200
        assert_error(agent.post(f"/v1/hosts/{a['host_id']}/heartbeat"), 401, "unauthorized")
    names = [p["name"] for p in admin.get("/v1/networks/prod/peers").json()["peers"]]
    assert names == ["vm-b"]


def test_observed_address_follows_the_source(admin: httpx.Client, controller: Controller) -> None:
    make_network(admin, "prod", cidr="10.40.0.0/24")
    token = make_token(admin, "prod")
    first = httpx.HTTPTransport(local_address="127.0.0.2")
    r = join(controller, token, "vm1", transport=first)
    assert r.json()["observed_address"] == "127.0.0.2"
    cred, host_id = r.json()["credential"], r.json()["host_id"]
    moved = httpx.HTTPTransport(local_address="127.0.0.3")
    with controller.client(cred, transport=moved) as agent:
        hb = agent.post(f"/v1/hosts/{host_id}/heartbeat").json()
    assert hb["observed_address"] == "127.0.0.3" and hb["changed"] is True
    host = admin.get(f"/v1/hosts/{host_id}").json()
    assert host["public_address"] == "127.0.0.3"
    assert host["public_address_changed_at"] is not None


# --- auth ------------------------------------------------------------------------------------

ROUTES = [
    ("POST", "/v1/networks", {"name": "x"}),
    ("GET", "/v1/networks", None),
    ("GET", "/v1/networks/x", None),
    ("DELETE", "/v1/networks/x", None),
    ("GET", "/v1/address-spaces", None),
    ("POST", "/v1/networks/x/tokens", {}),
    ("GET", "/v1/networks/x/tokens", None),
    ("DELETE", "/v1/networks/x/tokens/abc", None),
    ("GET", "/v1/networks/x/peers", None),
    ("GET", "/v1/networks/x/hosts", None),
    ("GET", "/v1/hosts/h-1", None),
    ("POST", "/v1/hosts/h-1/heartbeat", {}),
    ("PUT", "/v1/hosts/h-1/endpoints", {}),
    ("POST", "/v1/hosts/h-1/status", {"peers": []}),
    ("DELETE", "/v1/hosts/h-1", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_route_needs_a_token(controller: Controller, method: str, path: str, body) -> None:
    for token in (None, "wrong", "cla_abc.def", "clh_h-1.nope"):
        with controller.client(token=token) as c:
            assert_error(c.request(method, path, json=body), 401, "unauthorized")


def test_open_routes_and_metrics(controller: Controller, admin: httpx.Client) -> None:
    with controller.client(token=None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.get("/readyz").json()["status"] == "ready"
        assert_error(c.get("/nope"), 404, "not_found")
        admin.get("/v1/networks")
        text = c.get("/metrics").text
    assert (
        'cladnet_controller_http_requests_total{method="GET",route="/v1/networks",status="200"}'
        in text
    )
    assert "cladnet_controller_api_errors_total" in text


def test_generated_admin_token_file(make_controller) -> None:
    ctl = make_controller(admin_token=None)
    path = ctl.state_dir / "admin-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = path.read_text().strip()
    with ctl.client(token) as c:
        assert c.get("/v1/networks").status_code == 200
    # A second replica with its own state dir accepts the same token (its hash is in etcd).
    other = make_controller(admin_token=None)
    with other.client(token) as c:
        assert c.get("/v1/networks").status_code == 200
    # A restart reuses the file.
    ctl.stop()
    ctl.start()
    assert path.read_text().strip() == token
