"""Planning and diffing the WireGuard device: pure functions, no root, no I/O."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

from cladnet import mesh
from cladnet.mesh import DeviceState, PeerConfig, PeerState, PeerUpdate
from lab.peers import NETWORK, host, key


def state_of(device: mesh.DesiredDevice) -> DeviceState:
    """What a device that holds exactly ``device`` would report."""
    peers = {
        k: PeerState(
            public_key=k, allowed_ips=p.allowed_ips, endpoint=p.endpoint, keepalive=p.keepalive
        )
        for k, p in device.peers.items()
    }
    return DeviceState(listen_port=device.listen_port, peers=peers)


# --- same site and endpoints ---------------------------------------------------------------


def test_same_site_label_uses_private_address_in_shared_subnet() -> None:
    me = host(1, labels={"site": "dc1"}, addresses=["10.0.1.5/24"], public_address="203.0.113.1")
    peer = host(
        2,
        labels={"site": "dc1"},
        addresses=["172.16.0.9/16", "10.0.1.6/24"],
        public_address="203.0.113.2",
    )
    assert mesh.same_site(me, peer)
    assert mesh.choose_endpoint(me, peer) == "10.0.1.6:51820"


def test_same_site_without_shared_subnet_uses_first_address() -> None:
    me = host(1, labels={"site": "dc1"}, addresses=["10.0.1.5/24"])
    peer = host(
        2, labels={"site": "dc1"}, addresses=["10.0.2.7/24", "10.0.3.7/24"], listen_port=51999
    )
    assert mesh.choose_endpoint(me, peer) == "10.0.2.7:51999"


def test_same_cloud_region_vpc_is_same_site() -> None:
    labels = {"cloud": "aws", "region": "eu-west-1", "vpc": "vpc-1"}
    me = host(1, labels=labels, addresses=["10.0.1.5/24"], public_address="203.0.113.1")
    peer = host(2, labels=dict(labels), addresses=["10.0.1.6/24"], public_address="203.0.113.2")
    assert mesh.same_site(me, peer)
    assert mesh.choose_endpoint(me, peer) == "10.0.1.6:51820"


def test_other_vpc_or_missing_label_is_not_same_site() -> None:
    me = host(1, labels={"cloud": "aws", "region": "eu-west-1", "vpc": "vpc-1"})
    assert not mesh.same_site(
        me, host(2, labels={"cloud": "aws", "region": "eu-west-1", "vpc": "vpc-2"})
    )
    partial = {"cloud": "aws", "region": "eu-west-1"}
    assert not mesh.same_site(host(1, labels=partial), host(2, labels=dict(partial)))


def test_same_public_address_and_shared_subnet_is_same_site() -> None:
    me = host(1, addresses=["192.168.1.10/24"], public_address="198.51.100.7")
    peer = host(2, addresses=["192.168.1.11/24"], public_address="198.51.100.7")
    assert mesh.same_site(me, peer)
    assert mesh.choose_endpoint(me, peer) == "192.168.1.11:51820"


def test_same_subnet_behind_different_public_addresses_is_not_same_site() -> None:
    # Two clouds may both use 192.168.1.0/24: the subnet alone proves nothing.
    me = host(1, addresses=["192.168.1.10/24"], public_address="198.51.100.7")
    peer = host(2, addresses=["192.168.1.11/24"], public_address="198.51.100.8")
    assert not mesh.same_site(me, peer)
    assert mesh.choose_endpoint(me, peer) == "198.51.100.8:51820"


def test_same_public_address_without_shared_subnet_is_not_same_site() -> None:
    me = host(1, addresses=["192.168.1.10/24"], public_address="198.51.100.7")
    peer = host(2, addresses=["192.168.2.11/24"], public_address="198.51.100.7")
    assert not mesh.same_site(me, peer)


def test_different_clouds_use_public_endpoint() -> None:
    me = host(1, labels={"cloud": "aws", "region": "r", "vpc": "v"}, addresses=["10.0.1.5/24"])
    peer = host(
        2,
        labels={"cloud": "gcp", "region": "r", "vpc": "v"},
        addresses=["10.0.1.6/24"],
        public_address="203.0.113.9",
        listen_port=51821,
    )
    assert not mesh.same_site(me, peer)
    assert mesh.choose_endpoint(me, peer) == "203.0.113.9:51821"


def test_explicit_endpoint_wins_over_public_address() -> None:
    me = host(1, labels={"site": "a"})
    peer = host(
        2,
        labels={"site": "b"},
        public_address="203.0.113.9",
        endpoints=["198.51.100.1:4000", "198.51.100.2:4000"],
    )
    assert mesh.choose_endpoint(me, peer) == "198.51.100.1:4000"


def test_no_public_address_means_no_endpoint() -> None:
    me = host(1, labels={"site": "a"}, addresses=["10.0.1.5/24"])
    peer = host(2, labels={"site": "b"}, addresses=["10.0.1.6/24"])
    assert mesh.choose_endpoint(me, peer) is None


def test_ipv6_endpoints_are_bracketed_and_normalized() -> None:
    me = host(1)
    peer = host(2, public_address="2001:db8:0::1")
    assert mesh.choose_endpoint(me, peer) == "[2001:db8::1]:51820"
    assert mesh.normalize_endpoint("[2001:0db8::0001]:1") == "[2001:db8::1]:1"


# --- plan ----------------------------------------------------------------------------------


def test_plan_device_fields_and_self_excluded() -> None:
    me = host(1, listen_port=51999)
    twin = host(9, public_key=me["public_key"])  # same key under another id: still me
    device = mesh.plan(NETWORK, me, [me, twin, host(2, public_address="203.0.113.2")])
    assert device.address == "10.77.0.1/24"
    assert device.mtu == 1420
    assert device.listen_port == 51999
    assert list(device.peers) == [key(2)]
    assert device.peers[key(2)] == PeerConfig(
        public_key=key(2),
        allowed_ips=("10.77.0.2/32",),
        endpoint="203.0.113.2:51820",
        keepalive=25,
    )


def test_plan_port_falls_back_to_network() -> None:
    assert mesh.plan(NETWORK, host(1, listen_port=None), []).listen_port == 51820


def test_plan_keepalive_off_on_same_site_and_override() -> None:
    me = host(1, labels={"site": "dc1"}, addresses=["10.0.1.5/24"])
    local = host(2, labels={"site": "dc1"}, addresses=["10.0.1.6/24"])
    remote = host(3, labels={"site": "dc2"}, public_address="203.0.113.3")
    device = mesh.plan(NETWORK, me, [local, remote])
    assert device.peers[key(2)].keepalive == 0
    assert device.peers[key(3)].keepalive == 25
    forced = mesh.plan(NETWORK, me, [local, remote], keepalive_override=5)
    assert {p.keepalive for p in forced.peers.values()} == {5}


# --- diff ----------------------------------------------------------------------------------


def _mesh(*peers: dict[str, Any]) -> mesh.DesiredDevice:
    return mesh.plan(NETWORK, host(1), [host(1), *peers])


def test_diff_of_device_equal_to_plan_is_empty() -> None:
    device = _mesh(host(2, public_address="203.0.113.2"), host(3, public_address="203.0.113.3"))
    changes = mesh.diff(device, state_of(device))
    assert not changes
    assert changes == mesh.DeviceChanges()


def test_diff_ignores_allowed_ip_spelling_and_endpoint_form() -> None:
    device = _mesh(host(2, public_address="2001:db8::2"))
    reported = DeviceState(
        listen_port=51820,
        peers={
            key(2): PeerState(
                public_key=key(2),
                allowed_ips=("10.77.0.2",),
                endpoint="[2001:0db8:0:0::2]:51820",
                keepalive=25,
            )
        },
    )
    assert not mesh.diff(device, reported)


def test_diff_adding_one_peer_is_only_an_add() -> None:
    before = _mesh(host(2, public_address="203.0.113.2"))
    after = _mesh(host(2, public_address="203.0.113.2"), host(3, public_address="203.0.113.3"))
    changes = mesh.diff(after, state_of(before))
    assert changes == mesh.DeviceChanges(peers_to_add=(after.peers[key(3)],))


def test_diff_endpoint_change_is_only_an_endpoint_update() -> None:
    before = _mesh(host(2, public_address="203.0.113.2"), host(3, public_address="203.0.113.3"))
    after = _mesh(host(2, public_address="203.0.113.2"), host(3, public_address="198.51.100.3"))
    changes = mesh.diff(after, state_of(before))
    assert changes == mesh.DeviceChanges(
        peers_to_update={key(3): PeerUpdate(public_key=key(3), endpoint="198.51.100.3:51820")}
    )
    assert changes.peers_to_update[key(3)].fields() == ["endpoint"]


def test_diff_removing_a_peer() -> None:
    before = _mesh(host(2, public_address="203.0.113.2"), host(3, public_address="203.0.113.3"))
    after = _mesh(host(2, public_address="203.0.113.2"))
    assert mesh.diff(after, state_of(before)) == mesh.DeviceChanges(peers_to_remove=(key(3),))


def test_diff_listen_port_change() -> None:
    device = _mesh(host(2, public_address="203.0.113.2"))
    reported = replace(state_of(device), listen_port=40000)
    assert mesh.diff(device, reported) == mesh.DeviceChanges(listen_port=51820)


def test_diff_allowed_ips_and_keepalive_changes() -> None:
    device = _mesh(host(2, public_address="203.0.113.2"))
    peer = state_of(device).peers[key(2)]
    reported = DeviceState(
        listen_port=51820,
        peers={key(2): replace(peer, allowed_ips=("10.77.0.99/32",), keepalive=0)},
    )
    update = mesh.diff(device, reported).peers_to_update[key(2)]
    assert update == PeerUpdate(public_key=key(2), allowed_ips=("10.77.0.2/32",), keepalive=25)


def test_unknown_endpoint_never_clears_a_learned_one() -> None:
    device = _mesh(host(2))  # no public address: nothing to plan
    assert device.peers[key(2)].endpoint is None
    reported = state_of(device)
    learned = replace(reported.peers[key(2)], endpoint="203.0.113.50:40001")
    assert not mesh.diff(device, DeviceState(listen_port=51820, peers={key(2): learned}))


def test_roamed_endpoint_is_kept_until_the_plan_moves_the_peer() -> None:
    applied = _mesh(host(2, public_address="203.0.113.2"))
    # The peer's packets came from its NAT's port, and the device followed them.
    roamed = DeviceState(
        listen_port=51820,
        peers={
            key(2): replace(state_of(applied).peers[key(2)], endpoint="203.0.113.2:61000"),
        },
    )
    assert not mesh.diff(applied, roamed, applied=applied)
    assert mesh.diff(applied, roamed).peers_to_update[key(2)].endpoint == "203.0.113.2:51820"
    moved = _mesh(host(2, public_address="198.51.100.2"))
    update = mesh.diff(moved, roamed, applied=applied).peers_to_update[key(2)]
    assert update == PeerUpdate(public_key=key(2), endpoint="198.51.100.2:51820")


def test_endpoint_refresh_resends_every_kept_endpoint() -> None:
    before = _mesh(host(2, public_address="203.0.113.2"), host(3))
    after = _mesh(
        host(2, public_address="203.0.113.2"), host(3), host(4, public_address="203.0.113.4")
    )
    changes = mesh.with_endpoint_refresh(mesh.diff(after, state_of(before)), after)
    assert [p.public_key for p in changes.peers_to_add] == [key(4)]
    assert changes.peers_to_update == {
        key(2): PeerUpdate(public_key=key(2), endpoint="203.0.113.2:51820")
    }
    assert mesh.summary(changes) == {"add": [key(4)[:8]], "update": {key(2)[:8]: ["endpoint"]}}


# --- hostile or broken input ---------------------------------------------------------------


def test_unusable_peers_are_skipped_with_a_reason_and_the_rest_kept() -> None:
    me = host(1)
    good = host(2)
    bad = [
        host(3, public_key="not-a-key"),
        host(4, public_key=base64.b64encode(bytes(32)).decode()),  # all-zero key
        host(5, overlay_ip="10.99.0.5"),  # outside the network
        host(6, overlay_ip="banana"),
        host(7, overlay_ip="10.77.0.2"),  # claims vm2's address
        host(8, overlay_ip="10.77.0.1"),  # claims mine
        host(9, listen_port=70000),
        "not even an object",
    ]
    device = mesh.plan(NETWORK, me, [good, *bad])
    assert list(device.peers) == [key(2)]
    reasons = dict(device.skipped)
    assert reasons["h-3"] == reasons["h-4"] == "invalid public key"
    assert "outside" in reasons["h-5"] and reasons["h-6"] == "invalid overlay address"
    assert "claimed twice" in reasons["h-7"] and "claimed twice" in reasons["h-8"]
    assert reasons["h-9"] == "invalid listen port"
    assert reasons["?"] == "not an object"


def test_a_bad_peer_never_removes_a_working_one() -> None:
    me, peer = host(1), host(2)
    before = mesh.plan(NETWORK, me, [peer])
    # A newcomer that claims a working peer's address changes nothing on the device.
    with_garbage = mesh.plan(NETWORK, me, [peer, host(3, overlay_ip="10.77.0.2")])
    assert not mesh.diff(with_garbage, state_of(before))


def test_of_two_new_peers_only_the_lower_key_starts_the_handshake() -> None:
    """Both ends adding each other with a keepalive would start crossing handshakes; the
    host with the higher key adds the peer without it and gets it on the next diff."""
    me, lower, higher = (
        host(2, public_address="203.0.113.2"),
        host(1, public_address="203.0.113.1"),
        host(3, public_address="203.0.113.3"),
    )
    device = mesh.plan(NETWORK, me, [me, lower, higher])
    assert {p.keepalive for p in device.peers.values()} == {NETWORK["keepalive"]} != {0}
    empty = DeviceState(listen_port=None, peers={})
    first = mesh.diff(device, empty, own_key=me["public_key"])
    added = {p.public_key: p.keepalive for p in first.peers_to_add}
    assert added == {key(1): 0, key(3): NETWORK["keepalive"]}
    assert first.keepalive_deferred == (key(1),)
    assert mesh.summary(first)["keepalive_later"] == [key(1)[:8]]

    # Applied: the next diff gives the held-back keepalive and holds nothing back.
    held = state_of(device)
    held.peers[key(1)] = replace(held.peers[key(1)], keepalive=0)
    second = mesh.diff(device, held, own_key=me["public_key"])
    assert second.peers_to_update == {
        key(1): mesh.PeerUpdate(public_key=key(1), keepalive=NETWORK["keepalive"])
    }
    assert not second.peers_to_add and not second.keepalive_deferred

    # The other end of each pair: of the two, exactly one holds back.
    def held_back_by(other: dict[str, Any]) -> tuple[str, ...]:
        theirs = mesh.plan(NETWORK, other, [other, me])
        return mesh.diff(theirs, empty, own_key=other["public_key"]).keepalive_deferred

    assert held_back_by(lower) == ()  # while I hold it back
    assert held_back_by(higher) == (me["public_key"],)  # while I do not
    # Without a key (or same-site peers, keepalive 0) nothing is held back.
    assert not mesh.diff(device, empty).keepalive_deferred


def test_a_peer_getting_its_first_endpoint_is_added_anew() -> None:
    """WireGuard counted an initiation it could not send while the peer had no endpoint
    (and would hold the next back 5 s): such a peer is removed and added again; one
    that had an endpoint is only updated."""
    from cladnet.mesh import DeviceChanges, PeerConfig, PeerUpdate, readd_first_endpoints

    waiting = PeerConfig("k1", ("10.0.0.2/32",), "203.0.113.50:40002", 25, "relayed via x")
    moved = PeerConfig("k2", ("10.0.0.3/32",), "203.0.113.50:40004", 25, "relayed via y")
    changes = DeviceChanges(
        peers_to_update={
            "k1": PeerUpdate("k1", endpoint="203.0.113.50:40002"),
            "k2": PeerUpdate("k2", endpoint="203.0.113.50:40004"),
        }
    )
    out = readd_first_endpoints(changes, {"k1": False, "k2": True}, [waiting, moved])
    assert out.peers_to_remove == ("k1",) and out.peers_to_add == (waiting,)
    assert list(out.peers_to_update) == ["k2"]
    assert readd_first_endpoints(changes, {}, [waiting, moved]) == changes


def test_a_relayed_peer_that_roamed_off_its_relay_is_set_back() -> None:
    """WireGuard roams a peer's endpoint to where a packet came from; for a relayed
    peer that address dies with the peer's NAT while the plan (unchanged) says relay:
    only relayed peers whose device endpoint differs from the plan are set back."""
    from cladnet.mesh import DeviceState, PeerConfig, PeerState, PeerUpdate, relay_drift

    relay = "203.0.113.50:40002"
    roamed = PeerConfig("k1", ("10.0.0.2/32",), relay, 25, f"relayed via {relay}")
    on_relay = PeerConfig("k2", ("10.0.0.3/32",), "203.0.113.50:40004", 25, "relayed via r")
    direct = PeerConfig("k3", ("10.0.0.4/32",), "198.51.100.7:51820", 25, "direct")
    device = DeviceState(
        listen_port=51820,
        peers={
            "k1": PeerState("k1", ("10.0.0.2/32",), "198.51.100.9:51820", 25),
            "k2": PeerState("k2", ("10.0.0.3/32",), "203.0.113.50:40004", 25),
            "k3": PeerState("k3", ("10.0.0.4/32",), "198.51.100.8:41000", 25),
        },
    )
    out = relay_drift([roamed, on_relay, direct], device)
    assert out.peers_to_update == {"k1": PeerUpdate("k1", endpoint=relay)}
    assert not relay_drift([on_relay, direct], device)


def test_only_peers_without_a_session_that_change_path_are_added_anew() -> None:
    """A peer moving from direct to relayed that never answered is re-added (WireGuard
    would hold its next initiation 5 s); one with a session keeps it."""
    from cladnet.mesh import DeviceState, PeerConfig, PeerState, path_changed, sessionless

    def config(key: str, path: str) -> PeerConfig:
        return PeerConfig(key, ("10.0.0.2/32",), "203.0.113.50:40002", 25, path)

    before = {
        "h-1": config("k1", "direct"),
        "h-2": config("k2", "direct"),
        "h-3": config("k3", "direct"),
    }
    after = {
        "h-1": config("k1", "relayed via r"),
        "h-2": config("k2", "relayed via r"),
        "h-3": config("k3", "direct"),
        "h-4": config("k4", "relayed via r"),
    }
    assert path_changed(before, after) == {"k1", "k2"}
    device = DeviceState(
        listen_port=51820,
        peers={
            "k1": PeerState("k1", ("10.0.0.2/32",), "198.51.100.9:51820", 25),
            "k2": PeerState("k2", ("10.0.0.3/32",), "198.51.100.8:51820", 25, 1.0e9, 148),
        },
    )
    assert sessionless(device, {"k1", "k2", "k9"}) == {"k1": False}
