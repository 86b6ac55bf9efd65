"""The access policy through a real controller on a real etcd: versions, tests on write,
admin-only tags, and the policy in the peer watch stream."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from cladnet.keys import generate_keypair
from lab.api import join, make_network, make_token
from lab.components import Controller
from tests.support import Watcher, assert_error

POLICY: dict[str, Any] = {
    "groups": {"web": ["tag:web"], "db": ["tag:db"]},
    "rules": [{"src": ["group:web"], "dst": ["group:db"], "proto": "tcp", "ports": [5432]}],
    "tests": [
        {"src": "group:web", "dst": "group:db", "proto": "tcp", "port": 5432, "expect": "allow"},
        {"src": "group:web", "dst": "tag:bastion", "proto": "tcp", "port": 22, "expect": "deny"},
    ],
}


@pytest.fixture
def net(admin: httpx.Client) -> str:
    make_network(admin, "prod", cidr="10.44.0.0/24")
    return "prod"


def test_a_new_network_has_an_explicit_allow_all_policy(admin: httpx.Client, net: str) -> None:
    body = admin.get(f"/v1/networks/{net}/policy").json()
    assert body["version"] == 0 and body["default"] and body["allows_all"]
    assert body["policy"]["rules"] == [{"src": ["*"], "dst": ["*"], "proto": "any"}]


def test_writes_are_versioned_and_guarded(admin: httpx.Client, net: str) -> None:
    r = admin.put(f"/v1/networks/{net}/policy", json=POLICY)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1 and not r.json()["allows_all"] and not r.json()["default"]
    stored = admin.get(f"/v1/networks/{net}/policy").json()
    assert stored["version"] == 1 and stored["policy"]["tests"] == POLICY["tests"]
    # An edit based on version 0 would lose version 1: refused.
    stale = admin.put(f"/v1/networks/{net}/policy", params={"if_version": 0}, json=POLICY)
    assert_error(stale, 409, "version_conflict")
    ok = admin.put(f"/v1/networks/{net}/policy", params={"if_version": 1}, json=POLICY)
    assert ok.json()["version"] == 2


def test_concurrent_writes_lose_nothing(
    admin: httpx.Client, controller: Controller, net: str
) -> None:
    """Twelve writers at once: every write gets its own version (compare on mod_revision)."""
    versions: list[int] = []
    lock = threading.Lock()

    def write() -> None:
        with controller.client() as c:
            r = c.put(f"/v1/networks/{net}/policy", json=POLICY)
            assert r.status_code == 200, r.text
            with lock:
                versions.append(r.json()["version"])

    threads = [threading.Thread(target=write) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(versions) == list(range(1, 13))
    assert admin.get(f"/v1/networks/{net}/policy").json()["version"] == 12


def test_a_write_whose_tests_fail_is_rejected_with_the_failing_case(
    admin: httpx.Client, net: str
) -> None:
    broken = {**POLICY, "rules": [{"src": "*", "dst": "*", "proto": "any"}]}
    r = admin.put(f"/v1/networks/{net}/policy", json=broken)
    body = assert_error(r, 422, "policy_tests_failed")
    assert "tests[1] group:web → tag:bastion tcp:22 denied" in body["message"]
    assert "allowed by rule 0" in body["message"]
    assert admin.get(f"/v1/networks/{net}/policy").json()["version"] == 0  # nothing written

    dry = admin.post(f"/v1/networks/{net}/policy/test", json=broken).json()
    assert not dry["passed"] and dry["failures"][0].startswith("tests[1]")
    assert admin.post(f"/v1/networks/{net}/policy/test", json=POLICY).json()["passed"]
    assert admin.get(f"/v1/networks/{net}/policy").json()["version"] == 0  # a dry run

    invalid = admin.put(f"/v1/networks/{net}/policy", json={"rules": [{"src": "x", "dst": "*"}]})
    assert "rules[0].src[0]" in assert_error(invalid, 400, "invalid_policy")["message"]


def test_tests_may_name_real_hosts(admin: httpx.Client, controller: Controller, net: str) -> None:
    join(controller, make_token(admin, net), "db-1")
    doc = {
        "rules": [{"src": "tag:web", "dst": "host:db-1", "proto": "tcp", "ports": ["5000-6000"]}],
        "tests": [{"src": "tag:web", "dst": "host:db-1", "port": 5432, "expect": "allow"}],
    }
    assert admin.put(f"/v1/networks/{net}/policy", json=doc).status_code == 200
    gone = {**doc, "tests": [{**doc["tests"][0], "dst": "host:db-2"}]}
    message = assert_error(
        admin.put(f"/v1/networks/{net}/policy", json=gone), 422, "policy_tests_failed"
    )
    assert "no host host:db-2" in message["message"]


def test_only_an_admin_tags_a_host(admin: httpx.Client, controller: Controller, net: str) -> None:
    host = join(controller, make_token(admin, net), "vm1").json()
    hid = host["host_id"]
    with controller.client(host["credential"]) as agent:
        assert_error(agent.put(f"/v1/hosts/{hid}/tags", json={"tags": ["db"]}), 403, "forbidden")
        # Nor through the calls a host may make about itself.
        r = agent.put(f"/v1/hosts/{hid}/endpoints", json={"tags": ["db"]})
        assert r.status_code == 422
    assert admin.get(f"/v1/hosts/{hid}").json()["tags"] == []
    r = admin.put(f"/v1/hosts/{hid}/tags", json={"tags": ["web", "db", "web"]})
    assert r.status_code == 200 and r.json()["tags"] == ["db", "web"]
    assert_error(
        admin.put(f"/v1/hosts/{hid}/tags", json={"tags": ["no spaces"]}), 422, "invalid_request"
    )
    assert admin.get(f"/v1/hosts/{hid}").json()["tags"] == ["db", "web"]
    # A re-join (new key, same host) neither drops nor sets tags: they are the admin's.
    body = {"token": make_token(admin, net), "hostname": "vm1", "public_key": generate_keypair()[1]}
    with controller.client(host["credential"]) as agent:
        assert agent.post("/v1/join", json=body).status_code == 200
        assert agent.post("/v1/join", json={**body, "tags": ["admin"]}).status_code == 422
    assert admin.get(f"/v1/hosts/{hid}").json()["tags"] == ["db", "web"]


def test_members_read_the_enforced_part_only(
    admin: httpx.Client, controller: Controller, net: str
) -> None:
    host = join(controller, make_token(admin, net), "vm1").json()
    admin.put(f"/v1/networks/{net}/policy", json=POLICY)
    with controller.client(host["credential"]) as agent:
        body = agent.get(f"/v1/networks/{net}/policy").json()
        listed = agent.get(f"/v1/networks/{net}/peers").json()
    assert body["version"] == 1 and "tests" not in body["policy"]
    assert body["policy"]["groups"] == POLICY["groups"]
    assert listed["policy"] == {"version": 1, "document": body["policy"]}


def test_the_policy_rides_the_peer_watch(
    admin: httpx.Client, controller: Controller, net: str
) -> None:
    token = make_token(admin, net)
    host = join(controller, token, "vm-a").json()
    plain = Watcher(controller, net, since=None, token=host["credential"])
    listed = admin.get(f"/v1/networks/{net}/peers").json()
    resumed = Watcher(controller, net, since=listed["revision"], token=host["credential"])
    try:
        first = plain.next()  # at list time: the current policy comes first
        assert first["type"] == "POLICY" and first["policy"]["version"] == 0
        assert plain.next()["type"] == "ADDED"
        admin.put(f"/v1/networks/{net}/policy", json=POLICY)
        admin.put(f"/v1/hosts/{host['host_id']}/tags", json={"tags": ["db"]})
        for w in (plain, resumed):
            changed = w.next()
            assert changed["type"] == "POLICY" and changed["policy"]["version"] == 1
            assert "tests" not in changed["policy"]["document"]
            assert changed["policy"]["document"]["rules"][0]["ports"] == ["5432"]
            tagged = w.next()
            assert tagged["type"] == "MODIFIED" and tagged["peer"]["tags"] == ["db"]
    finally:
        plain.close()
        resumed.close()
    # The policy is not a peer: lists and the hosts view leave it out.
    assert [p["name"] for p in admin.get(f"/v1/networks/{net}/peers").json()["peers"]] == ["vm-a"]
    assert [h["name"] for h in admin.get(f"/v1/networks/{net}/hosts").json()] == ["vm-a"]


def test_deleting_a_network_takes_its_policy(admin: httpx.Client, net: str) -> None:
    admin.put(f"/v1/networks/{net}/policy", json=POLICY)
    assert admin.delete(f"/v1/networks/{net}").status_code == 200
    make_network(admin, net, cidr="10.44.0.0/24")
    assert admin.get(f"/v1/networks/{net}/policy").json()["version"] == 0


def test_explain_says_which_rule_allows_or_blocks_a_pair(
    admin: httpx.Client, controller: Controller, net: str
) -> None:
    token = make_token(admin, net)
    ids = {name: join(controller, token, name).json()["host_id"] for name in ("web-1", "db-1")}
    url = f"/v1/networks/{net}/policy/explain"
    # A new network: the allow-all policy, said as such, and the path each way.
    body = admin.get(url, params={"src": "web-1", "dst": "db-1"}).json()
    assert body["default"] and body["allows_all"] and body["peers"]
    assert body["forward"]["reason"] == body["reverse"]["reason"] == "allow-all policy (rule 0)"
    assert set(body["path"]) == {"forward", "reverse"}
    for name, tags in (("web-1", ["web"]), ("db-1", ["db"])):
        admin.put(f"/v1/hosts/{ids[name]}/tags", json={"tags": tags}).raise_for_status()
    admin.put(f"/v1/networks/{net}/policy", json=POLICY).raise_for_status()
    viewer = admin.post("/v1/admin-tokens", json={"role": "viewer", "description": "v"})
    with controller.client(viewer.json()["token"]) as v:  # readers may ask; by id or name
        q = {"src": ids["web-1"], "dst": "db-1", "proto": "tcp", "port": 5432}
        body = v.get(url, params=q).json()
    assert (body["src"], body["dst"], body["version"], body["default"]) == (
        "web-1",
        "db-1",
        1,
        False,
    )
    assert body["forward"]["allowed"] and body["forward"]["rules"][0]["index"] == 0
    assert not body["reverse"]["allowed"] and body["reverse"]["reason"].startswith("default deny")
    assert body["peers"]  # one-way: db keeps web in its peer list, its filter drops web
    closed = admin.get(url, params={**q, "port": 22}).json()
    assert not closed["forward"]["allowed"] and closed["peers"]
    # Documented errors: unknown host or network, a port without tcp/udp, a bad protocol.
    assert_error(admin.get(url, params={"src": "web-9", "dst": "db-1"}), 404, "host_not_found")
    assert_error(
        admin.get("/v1/networks/nope/policy/explain", params={"src": "a", "dst": "b"}),
        404,
        "network_not_found",
    )
    assert_error(admin.get(url, params={**q, "proto": "icmp"}), 400, "invalid_query")
    assert_error(admin.get(url, params={**q, "proto": "sctp"}), 422, "invalid_request")
    with controller.client(join(controller, token, "vm9").json()["credential"]) as host:
        assert_error(host.get(url, params=q), 403, "forbidden")
