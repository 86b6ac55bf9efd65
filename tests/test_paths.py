"""Path choice (private, direct, relayed), reflexive observations, the relay's packet
filter and pair assignment: pure functions, no root, no I/O."""

from __future__ import annotations

from typing import Any

from cladnet import mesh, paths
from cladnet.cli.status import summary
from cladnet.paths import Relay
from lab.peers import NETWORK, host, key

R1 = Relay("r1", "203.0.113.50", 40000, 40009)
R2 = Relay("r2", "203.0.113.51", 40000, 40009)


def natted(n: int, **fields: Any) -> dict[str, Any]:
    """A host in a private subnet behind a NAT whose public address is 198.51.100.<n>."""
    fields.setdefault("public_address", f"198.51.100.{n}")
    return host(n, addresses=[f"192.168.{n}.10/24"], **fields)


def seen(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"endpoint": ep, "observer": obs, "observed_at": 1.0} for obs, ep in pairs]


# --- the relay's filter -----------------------------------------------------------------


def test_wireguard_shaped_packets_pass() -> None:
    assert paths.is_wireguard_packet(b"\x01\0\0\0" + bytes(144))  # initiation, 148
    assert paths.is_wireguard_packet(b"\x02\0\0\0" + bytes(88))  # response, 92
    assert paths.is_wireguard_packet(b"\x03\0\0\0" + bytes(60))  # cookie reply, 64
    assert paths.is_wireguard_packet(b"\x04\0\0\0" + bytes(28))  # keepalive, 32
    # Full-MTU data: 16 + 1420 + 16, padding stops at the MTU (not a multiple of 16).
    assert paths.is_wireguard_packet(b"\x04\0\0\0" + bytes(1452 - 4))


def test_junk_is_refused() -> None:
    assert not paths.is_wireguard_packet(b"")
    assert not paths.is_wireguard_packet(b"GET / HTTP/1.1\r\n" * 4)
    assert not paths.is_wireguard_packet(b"\x05\0\0\0" + bytes(60))  # unknown type
    assert not paths.is_wireguard_packet(b"\x01\0\0\1" + bytes(144))  # reserved not zero
    assert not paths.is_wireguard_packet(b"\x01\0\0\0" + bytes(145))  # wrong size
    assert not paths.is_wireguard_packet(b"\x04\0\0\0" + bytes(12))  # too short


# --- observations -------------------------------------------------------------------------


def test_first_observation_is_recorded_and_a_repeat_writes_nothing() -> None:
    h = natted(1)
    out = paths.observe(h, "r1:40000", "198.51.100.1:1024", now=5.0)
    assert out is not None
    reflexive, varies = out
    assert not varies
    assert reflexive == [
        {"endpoint": "198.51.100.1:1024", "observer": "r1:40000", "observed_at": 5.0}
    ]
    h2 = natted(1, reflexive=out[0], mapping_varies=False)
    assert paths.observe(h2, "r1:40000", "198.51.100.1:1024", now=99.0) is None


def test_two_observers_seeing_different_ports_mean_mapping_varies() -> None:
    h = natted(1, reflexive=seen(("r1:40000", "198.51.100.1:1024")))
    reflexive, varies = paths.observe(h, "r1:40002", "198.51.100.1:2048", now=2.0) or ([], False)
    assert varies and len(reflexive) == 2
    assert paths.stable_reflexive(natted(1, reflexive=reflexive, mapping_varies=varies)) is None


def test_agreeing_observers_make_a_stable_reflexive_address() -> None:
    h = natted(1, reflexive=seen(("r1:40000", "198.51.100.1:1024")))
    reflexive, varies = paths.observe(h, "r2:40000", "198.51.100.1:1024", now=2.0) or ([], True)
    assert not varies
    assert paths.stable_reflexive(natted(1, reflexive=reflexive)) == "198.51.100.1:1024"
    # One observer alone proves nothing about the mapping towards others.
    assert paths.stable_reflexive(natted(1, reflexive=reflexive[:1])) is None


def test_a_dead_relays_observations_are_dropped() -> None:
    h = natted(1, reflexive=seen(("r9:40000", "198.51.100.1:9")), mapping_varies=True)
    reflexive, varies = paths.observe(h, "r1:40000", "198.51.100.1:1", 3.0, live={"r1"}) or (
        [],
        True,
    )
    assert [c["observer"] for c in reflexive] == ["r1:40000"] and not varies


def test_sightings_from_before_a_nat_moved_are_dropped() -> None:
    """The NAT got a new public address (the controller saw it): a sighting there
    replaces those at the old address instead of making the host look symmetric."""
    old = seen(("r1:40000", "198.51.100.1:51820"), ("r1:40002", "198.51.100.1:51820"))
    h = natted(1, reflexive=old, public_address="198.51.100.77")
    reflexive, varies = paths.observe(h, "r1:40004", "198.51.100.77:51820", 5.0) or ([], True)
    assert not varies and [c["observer"] for c in reflexive] == ["r1:40004"]
    # A second relay port agreeing makes it stable again.
    h = natted(1, reflexive=reflexive, public_address="198.51.100.77")
    reflexive, varies = paths.observe(h, "r1:40006", "198.51.100.77:51820", 6.0) or ([], True)
    moved = natted(1, reflexive=reflexive, public_address="198.51.100.77")
    assert paths.stable_reflexive(moved) == "198.51.100.77:51820"
    # A NAT whose UDP leaves from another address than its TCP keeps its sightings.
    h = natted(1, reflexive=old[:1], public_address="198.51.100.77")
    reflexive, varies = paths.observe(h, "r1:40002", "198.51.100.1:51820", 7.0) or ([], True)
    assert len(reflexive) == 2 and not varies


def test_hostile_candidates_are_ignored() -> None:
    bad = [{"endpoint": "x:1", "observer": "a", "observed_at": 1}, {"endpoint": 5}, "junk"]
    assert paths.stable_reflexive(natted(1, reflexive=bad)) is None


# --- direct or relayed --------------------------------------------------------------------


def test_public_host_is_reached_direct_by_anyone() -> None:
    public = host(3, addresses=["203.0.113.3/24"], public_address="203.0.113.3")
    symmetric = natted(1, mapping_varies=True)
    assert paths.direct_possible(symmetric, public)
    assert mesh.choose_path(symmetric, public) == ("203.0.113.3:51820", "direct")
    # The public side waits for the NATed one to open its NAT: no guessed endpoint.
    assert mesh.choose_path(public, symmetric) == (None, "direct")


def test_two_symmetric_hosts_take_their_relay() -> None:
    a = natted(1, mapping_varies=True, relays={"h-2": "203.0.113.50:40000"})
    b = natted(2, mapping_varies=True, relays={"h-1": "203.0.113.50:40001"})
    assert not paths.direct_possible(a, b)
    assert mesh.choose_path(a, b) == ("203.0.113.50:40000", "relayed via 203.0.113.50:40000")
    assert mesh.choose_path(b, a) == ("203.0.113.50:40001", "relayed via 203.0.113.50:40001")


def test_unknown_mapping_starts_on_the_relay() -> None:
    a = natted(1, relays={"h-2": "203.0.113.50:40000"})
    b = natted(2)
    assert mesh.choose_path(a, b)[1] == "relayed via 203.0.113.50:40000"


def test_both_stable_go_direct_to_the_reflexive_address() -> None:
    obs = seen(("r1:40000", "198.51.100.2:3333"), ("r1:40002", "198.51.100.2:3333"))
    a = natted(1, reflexive=seen(("r1:1", "198.51.100.1:7"), ("r2:1", "198.51.100.1:7")))
    b = natted(2, reflexive=obs, relays={})
    a["relays"] = {"h-2": "203.0.113.50:40000"}  # a stale relay entry loses to direct
    assert mesh.choose_path(a, b) == ("198.51.100.2:3333", "direct")


def test_two_hosts_behind_one_nat_on_other_subnets_take_their_relay() -> None:
    """Stable reflexive addresses on both sides, but at one public address: direct would
    need the NAT to hairpin (tests/test_reach_nats.py: n1 and n2), so the relay."""
    one = "198.51.100.9"
    a = host(1, addresses=["10.35.1.11/24"], public_address=one, relays={"h-2": "203.0.113.50:1"})
    b = host(2, addresses=["10.35.2.12/24"], public_address=one, relays={"h-1": "203.0.113.50:2"})
    a["reflexive"] = seen(("r1:1", f"{one}:51820"), ("r1:3", f"{one}:51820"))
    b["reflexive"] = seen(("r1:2", f"{one}:51821"), ("r1:4", f"{one}:51821"))
    assert paths.behind_one_nat(a, b) and not paths.direct_possible(a, b)
    assert mesh.choose_path(a, b) == ("203.0.113.50:1", "relayed via 203.0.113.50:1")
    assert mesh.choose_path(b, a) == ("203.0.113.50:2", "relayed via 203.0.113.50:2")
    # On one subnet behind that NAT: one site, private addresses.
    b["addresses"] = ["10.35.1.12/24"]
    assert mesh.choose_path(a, b) == ("10.35.1.12:51820", "private")


def test_a_failed_direct_path_falls_back_to_the_standby_relay() -> None:
    stable = seen(("r1:1", "198.51.100.2:3333"), ("r2:1", "198.51.100.2:3333"))
    a = natted(1, reflexive=seen(("r1:2", "198.51.100.1:7"), ("r2:2", "198.51.100.1:7")))
    a["relays"] = {"h-2": "203.0.113.50:40000"}
    b = natted(2, reflexive=stable)
    assert mesh.choose_path(a, b)[1] == "direct"
    assert mesh.choose_path(a, b, direct_failed={"h-2"}) == (
        "203.0.113.50:40000",
        "relayed via 203.0.113.50:40000",
    )
    # Without a relay there is nothing better than trying direct.
    a["relays"] = {}
    assert mesh.choose_path(a, b, direct_failed={"h-2"})[1] == "direct"
    # And the relays keep such a pair on standby; a pair with a public side they do not.
    public = host(5, addresses=["203.0.113.5/24"], public_address="203.0.113.5")
    out = paths.relay_assignments([a, b, public], R1, [R1], mesh.same_site)
    assert set(out["h-1"]) == {"h-2"} and out["h-5"] == {}


def test_same_site_stays_private_even_with_a_relay_entry() -> None:
    a = natted(1, labels={"site": "x"}, relays={"h-2": "203.0.113.50:40000"})
    b = natted(2, labels={"site": "x"})
    assert mesh.choose_path(a, b) == ("192.168.2.10:51820", "private")


def test_without_relay_or_observation_the_old_guess_remains() -> None:
    # Hosts behind port-forwarding NATs (no relay anywhere): public address + listen port.
    assert mesh.choose_path(natted(1), natted(2)) == ("198.51.100.2:51820", "direct")


def test_a_pair_not_yet_relayed_in_a_network_with_relays_waits_instead_of_guessing() -> None:
    """A new host's pairs before the next relay pass: no guessed endpoint (an initiation
    lost at a NAT that maps per destination holds WireGuard back 5 s)."""
    served = natted(1, relays={"h-3": "203.0.113.50:40000"})
    assert mesh.choose_path(served, natted(2)) == (None, mesh.WAITING_FOR_RELAY)
    assert mesh.choose_path(natted(2), served) == (None, mesh.WAITING_FOR_RELAY)
    # Once the relay assigned the pair, its port.
    served["relays"]["h-2"] = "203.0.113.50:40002"
    assert mesh.choose_path(served, natted(2))[0] == "203.0.113.50:40002"


def test_hostile_relay_entry_is_ignored() -> None:
    for relays in ({"h-2": "not an endpoint"}, {"h-2": 5}, ["h-2"], "h-2"):
        a = natted(1, relays=relays, reflexive="junk")
        assert mesh.choose_path(a, natted(2, reflexive=7)) == ("198.51.100.2:51820", "direct")


def test_plan_carries_the_path_per_peer() -> None:
    me = natted(1, mapping_varies=True, relays={"h-2": "203.0.113.50:40000"})
    device = mesh.plan(NETWORK, me, [natted(2, mapping_varies=True)])
    assert device.peers[key(2)].path == "relayed via 203.0.113.50:40000"
    assert device.peers[key(2)].endpoint == "203.0.113.50:40000"
    assert device.peers[key(2)].keepalive == 25  # holds the NAT mapping and the latch


# --- relay choice and port pairs -----------------------------------------------------------


def test_relay_choice_is_stable_and_moves_only_a_dead_relays_pairs() -> None:
    pairs = [(f"h-{i}", f"h-{j}") for i in range(10) for j in range(i + 1, 10)]
    both = {p: paths.choose_relay(*p, [R1, R2]) for p in pairs}
    assert {r.id for r in both.values() if r} == {"r1", "r2"}  # spread over both
    assert all(paths.choose_relay(b, a, [R2, R1]) == both[(a, b)] for a, b in pairs)
    for p in pairs:
        assert paths.choose_relay(*p, [R1]) == R1
    assert paths.choose_relay("h-1", "h-2", []) is None


def test_assignments_cover_pairs_that_cannot_go_direct_and_keep_ports() -> None:
    public = host(5, addresses=["203.0.113.5/24"], public_address="203.0.113.5")
    hosts = [natted(1), natted(2), natted(3), public]
    out = paths.relay_assignments(hosts, R1, [R1], mesh.same_site)
    assert set(out["h-1"]) == {"h-2", "h-3"} and out["h-5"] == {}
    ports = [ep for peers in out.values() for ep in peers.values()]
    assert len(ports) == len(set(ports)) == 6
    # Written into the records, they are kept as they are on the next pass.
    kept = [{**h, "relays": out[h["id"]]} for h in hosts]
    assert paths.relay_assignments(kept, R1, [R1], mesh.same_site) == out
    # Another relay's pairs are not this one's.
    assert paths.relay_assignments(hosts, R1, [R1, R2], mesh.same_site) != out


def test_assignments_stop_at_the_end_of_the_port_range() -> None:
    small = Relay("r1", "203.0.113.50", 40000, 40002)  # room for one pair
    out = paths.relay_assignments([natted(1), natted(2), natted(3)], small, [small], mesh.same_site)
    assert sum(len(v) for v in out.values()) == 2


def test_status_shows_each_pairs_path() -> None:
    a = natted(1, mapping_varies=True, relays={"h-2": "203.0.113.50:40000"})
    b = natted(2, mapping_varies=True, relays={"h-1": "203.0.113.50:40001"})
    p = host(3, addresses=["203.0.113.3/24"], public_address="203.0.113.3")
    view = summary({"name": "n", "cidr": "10.77.0.0/24"}, [a, b, p], now=1.0)
    paths_of = {(r["from"], r["to"]): r["path"] for r in view["pairs"]}
    assert paths_of[("vm1", "vm2")] == "relayed via 203.0.113.50:40000"
    assert paths_of[("vm2", "vm1")] == "relayed via 203.0.113.50:40001"
    assert paths_of[("vm1", "vm3")] == paths_of[("vm3", "vm1")] == "direct"
    assert view["relayed_pairs"] == 2


def test_freed_ports_are_reused_last() -> None:
    out = paths.relay_assignments(
        [natted(1), natted(2)], R1, [R1], mesh.same_site, avoid={40000, 40001}
    )
    assert sorted(ep for peers in out.values() for ep in peers.values()) == [
        "203.0.113.50:40002",
        "203.0.113.50:40003",
    ]
    full = Relay("r1", "203.0.113.50", 40000, 40001)
    out = paths.relay_assignments(
        [natted(1), natted(2)], full, [full], mesh.same_site, avoid={40000, 40001}
    )
    assert out["h-1"] == {"h-2": "203.0.113.50:40000"}  # the range is full: reuse
