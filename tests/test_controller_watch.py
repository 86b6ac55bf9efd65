"""Peer list + watch: deltas, resume after a cut stream or a controller restart, 410."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from lab.api import join, make_network, make_token
from lab.components import Controller
from tests.support import Watcher


@pytest.fixture
def net(admin: httpx.Client) -> Iterator[str]:
    make_network(admin, "prod", cidr="10.40.0.0/24")
    yield "prod"


def test_list_then_watch_deltas(admin: httpx.Client, controller: Controller, net: str) -> None:
    token = make_token(admin, net)
    a = join(controller, token, "vm-a").json()
    listed = admin.get(f"/v1/networks/{net}/peers").json()
    assert [p["name"] for p in listed["peers"]] == ["vm-a"]

    w = Watcher(controller, net, since=listed["revision"])
    try:
        assert w.status == 200
        b = join(controller, token, "vm-b").json()
        added = w.next()
        assert added["type"] == "ADDED" and added["peer"]["id"] == b["host_id"]
        assert added["revision"] > listed["revision"]
        assert "credential_hash" not in json.dumps(added)

        with controller.client(a["credential"]) as agent:
            agent.put(
                f"/v1/hosts/{a['host_id']}/endpoints", json={"endpoints": ["198.51.100.1:51820"]}
            )
            # A heartbeat that changes nothing must not wake watchers.
            agent.post(f"/v1/hosts/{a['host_id']}/heartbeat")
            agent.delete(f"/v1/hosts/{a['host_id']}")
        modified = w.next()
        assert modified["type"] == "MODIFIED" and modified["peer"]["endpoints"] == [
            "198.51.100.1:51820"
        ]
        deleted = w.next()
        assert deleted == {"type": "DELETED", "revision": deleted["revision"], "id": a["host_id"]}
        # Keep-alive lines arrive on an idle stream (the fixture sets 1 s) with a revision.
        bookmark = w.next(skip_bookmarks=False)
        assert bookmark["type"] == "BOOKMARK" and bookmark["revision"] >= deleted["revision"]
    finally:
        w.close()


def test_watch_without_since_starts_with_current_peers(
    admin, controller: Controller, net: str
) -> None:
    token = make_token(admin, net)
    join(controller, token, "vm-a")
    w = Watcher(controller, net, since=None)
    try:
        policy = w.next()  # the network's access policy comes first
        assert policy["type"] == "POLICY" and policy["policy"]["version"] == 0
        first = w.next()
        assert first["type"] == "ADDED" and first["peer"]["name"] == "vm-a"
        join(controller, token, "vm-b")
        assert w.next()["peer"]["name"] == "vm-b"
    finally:
        w.close()


def test_agent_can_watch_its_own_network_only(admin, controller: Controller, net: str) -> None:
    a = join(controller, make_token(admin, net), "vm-a").json()
    make_network(admin, "other", cidr="10.41.0.0/24")
    w = Watcher(controller, net, since=0, token=a["credential"])
    try:
        assert w.status == 200
    finally:
        w.close()
    w = Watcher(controller, "other", since=0, token=a["credential"])
    assert w.status == 403 and w.body["error"] == "forbidden"
    w.close()


def _replay(ctl: Controller, net: str, since: int, count: int) -> list[dict]:
    w = Watcher(ctl, net, since=since)
    try:
        assert w.status == 200, getattr(w, "body", None)
        return [w.next() for _ in range(count)]
    finally:
        w.close()


def test_resume_after_cut_stream_misses_nothing(admin, controller: Controller, net: str) -> None:
    token = make_token(admin, net)
    revision = admin.get(f"/v1/networks/{net}/peers").json()["revision"]
    w = Watcher(controller, net, since=revision)
    join(controller, token, "vm-1")
    seen = w.next()
    w.close()  # the client's stream is cut
    # Changes while nobody watches …
    for i in range(2, 5):
        join(controller, token, f"vm-{i}")
    # … are all delivered, in order, when it resumes from its last revision.
    events = _replay(controller, net, seen["revision"], 3)
    assert [e["peer"]["name"] for e in events] == ["vm-2", "vm-3", "vm-4"]
    assert [e["revision"] for e in events] == sorted(e["revision"] for e in events)


def test_resume_after_controller_restart(
    admin, make_controller, controller: Controller, net: str
) -> None:
    token = make_token(admin, net)
    revision = admin.get(f"/v1/networks/{net}/peers").json()["revision"]
    w = Watcher(controller, net, since=revision)
    join(controller, token, "vm-1")
    seen = w.next()
    controller.stop()
    assert w.next(timeout=15)["type"] == "CLOSED"
    w.close()
    # A change while the controller is away is written through another replica.
    other = make_controller()
    join(other, token, "vm-2")
    controller.start()
    events = _replay(controller, net, seen["revision"], 1)
    assert events[0]["type"] == "ADDED" and events[0]["peer"]["name"] == "vm-2"


def test_compacted_revision_answers_410(admin, controller: Controller, etcd, net: str) -> None:
    token = make_token(admin, net)
    old = admin.get(f"/v1/networks/{net}/peers").json()["revision"]
    for i in range(3):
        join(controller, token, f"vm-{i}")
    current = admin.get(f"/v1/networks/{net}/peers").json()["revision"]
    etcd.ctl("compact", str(current))
    w = Watcher(controller, net, since=old)
    assert w.status == 410
    assert w.body["error"] == "revision_compacted"
    w.close()
    # Listing again and watching from the new revision works.
    events_from_now = Watcher(controller, net, since=current)
    try:
        assert events_from_now.status == 200
        join(controller, token, "vm-new")
        assert events_from_now.next()["peer"]["name"] == "vm-new"
    finally:
        events_from_now.close()


def test_many_watchers_each_get_one_event_per_change(
    admin, controller: Controller, net: str
) -> None:
    token = make_token(admin, net)
    revision = admin.get(f"/v1/networks/{net}/peers").json()["revision"]
    watchers = [Watcher(controller, net, since=revision) for _ in range(20)]
    try:
        join(controller, token, "vm-x")
        for w in watchers:
            event = w.next()
            assert event["type"] == "ADDED" and event["peer"]["name"] == "vm-x"
    finally:
        for w in watchers:
            w.close()
