"""The NAT kinds tests/test_reach.py does not build: a 1:1 NAT, two stacked NATs with
100.64.0.0/10 between them (carrier-grade NAT), and two hosts behind ONE NAT on two
subnets with no route between them and no hairpinning; with a host behind plain
masquerade, one behind ``masquerade fully-random`` and a public host running an agent and
the relay (lab/natlab.py). Real agents, real wireguard-go, namespaces, nftables.

Each NAT's behaviour is probed before anything is asserted about paths; then the full
mesh pings, each pair takes the path its NATs allow, and a NAT whose public address
changes in place (conntrack flushed) is reached again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import combinations

import pytest

from lab.components import wait_until
from lab.natlab import HOSTS, NatLab, reaches, udp_probe
from lab.relays import RELAY_PORTS
from tests.support import need_root

NAMES = ["p", "o1", "e1", "s1", "g1", "n1", "n2"]
# A generous bound: the figure itself is the benchmark's (bench/reach.py), not a test's.
RECONNECT_LIMIT = 30.0


def expected_path(a: str, b: str) -> str:
    """The path the pair's NATs allow: direct to a public host or between two stable
    (endpoint-independent) mappings, relayed with a symmetric NAT on either side or
    between two hosts behind one NAT that does not hairpin."""
    kinds = {HOSTS[a].kind, HOSTS[b].kind}
    if "public" in kinds:
        return "direct"
    if "symmetric" in kinds or {a, b} == {"n1", "n2"}:
        return "relayed"
    return "direct"


PROBED: dict[str, tuple[str, str]] = {}  # host → what the two observers saw


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[NatLab]:
    need_root()
    world = NatLab(tmp_path_factory.mktemp("nats"), keepalive=2)
    try:
        world.start()
        for name in NAMES:
            world.add(name)
        # The NATs are probed before any agent sends (seen here on a busy machine: a
        # probe's datagrams lost for seconds while the agents started).
        for n, name in enumerate(NAMES[1:]):
            # A source port of its own: n1 and n2 share a NAT, one port twice would clash.
            ns, p_ns, p_ip = world.namespaces[name], world.namespaces["p"], world.public_ip("p")
            PROBED[name] = udp_probe(world.net, ns, p_ns, p_ip, 47000, 45000 + n)
        for name in NAMES:
            world.join(name)
        yield world
    finally:
        world.close()


def test_each_nat_maps_as_assumed(lab) -> None:
    """Two observers (p's ports 47000, 47001) per NATed host: one port for both behind
    the 1:1, plain, stacked and shared NATs (kept from the socket), two behind
    fully-random; always the outermost NAT's address (never 100.64/10)."""
    for n, name in enumerate(NAMES[1:]):
        source = 45000 + n
        first, second = PROBED[name]
        ip = lab.public_ip(name)
        assert first.split(":")[0] == second.split(":")[0] == ip, (name, first, second)
        if HOSTS[name].kind == "symmetric":
            assert first != second, f"{name}'s NAT kept one port for two destinations"
        else:
            assert first == second == f"{ip}:{source}", f"{name}'s NAT changed ports"


def test_the_shared_nat_does_not_hairpin_and_the_1to1_nat_lets_anyone_in(lab) -> None:
    net, ns = lab.net, lab.namespaces
    p_ip, shared = lab.public_ip("p"), lab.public_ip("n2")
    # n2 opens its NAT towards p (port 47100 kept); p gets in, n1 through the NAT's
    # public address does not: no hairpin. (They have no route to each other either.)
    assert reaches(net, ns["n2"], (p_ip, 47100), 47100, ns["p"], (shared, 47100), 47100) == (
        f"{p_ip}:47100"
    )
    assert reaches(net, ns["n2"], (p_ip, 47100), 47100, ns["n1"], (shared, 47100), 47101) == (
        "nothing"
    )
    # Behind plain masquerade, only the destination it sent to gets in; behind 1:1, anyone.
    q = ns["n1"]  # any other outside sender
    assert reaches(net, ns["e1"], (p_ip, 47102), 47102, q, (lab.public_ip("e1"), 47102), 47103) == (
        "nothing"
    )
    got = reaches(net, ns["o1"], (p_ip, 47104), 47104, q, (lab.public_ip("o1"), 47104), 47105)
    assert got == f"{shared}:47105", got


def _relay_port(endpoint: str) -> bool:
    return RELAY_PORTS[0] <= int(endpoint.rsplit(":", 1)[1]) <= RELAY_PORTS[1]


def test_full_mesh_pings_and_each_pair_takes_the_path_its_nats_allow(lab) -> None:
    started = time.monotonic()
    for name in NAMES:
        others = [o for o in NAMES if o != name]
        took = lab.ping_all(name, others, time.monotonic(), 60)
        assert all(t is not None for t in took.values()), (name, took, lab.agents[name].log_text())
    print(f"full mesh of {len(NAMES)} pinging {time.monotonic() - started:.1f}s after the joins")

    def wrong() -> list[tuple[str, str, str]]:
        out = []
        for a in NAMES:
            seen = lab.paths(a)
            for b in NAMES:
                if a != b and not seen.get(b, "").startswith(expected_path(a, b)):
                    out.append((a, b, seen.get(b, "")))
        return out

    # Pairs between endpoint-independent NATs start relayed (mapping unknown) and go
    # direct once two relay ports saw one NAT port each.
    try:
        wait_until(lambda: not wrong(), 45, interval=1, what="the paths the NATs allow")
    except TimeoutError:
        pytest.fail(f"pairs on another path than expected: {wrong()}; {lab.hosts()}")
    hosts = lab.hosts()
    keys = {h["public_key"]: n for n, h in hosts.items()}
    for a in NAMES:
        for key, peer in lab.agents[a].wg_peers().items():
            b = keys[key]
            if expected_path(a, b) == "relayed":
                assert _relay_port(peer["endpoint"]), (a, b, peer)
            elif HOSTS[b].kind != "public" and HOSTS[a].kind != "public":
                # Direct to the outermost NAT's address: g1 at the carrier's public
                # address, never its 100.64 one.
                assert peer["endpoint"].rsplit(":", 1)[0] == lab.public_ip(b), (a, b, peer)
    for name in ("o1", "e1", "g1", "n1", "n2"):
        assert not hosts[name]["mapping_varies"], hosts[name]
    assert hosts["s1"]["mapping_varies"], hosts["s1"]
    # And after the upgrades every pair still pings.
    for a, b in combinations(NAMES, 2):
        ok = wait_until(
            lambda a=a, b=b: lab.net.ping(lab.agents[a].ns, lab.agents[b].overlay_ip()),
            20,
            what=f"{a} -> {b}",
        )
        assert ok


@pytest.mark.parametrize("name", ["o1", "g1", "e1"])
def test_a_nats_public_address_changes_in_place(lab, name) -> None:
    """The NAT's address is replaced (conntrack entries go with it, as when a cloud
    re-assigns an address); the host behind it pings everyone again."""
    cloud = HOSTS[name].cloud
    new_host_no = {"o": 41, "g": 44, "e": 42}[cloud]
    others = [o for o in NAMES if o != name]
    assert all(t is not None for t in lab.ping_all(name, others, time.monotonic(), 30).values())
    started = time.monotonic()
    new = lab.net.move_public_address(cloud, new_host_no, flush=True)
    took = lab.ping_all(name, others, started, RECONNECT_LIMIT)
    print(f"{name}: NAT moved to {new}; pings again after {took}")
    assert all(t is not None for t in took.values()), (took, lab.agents[name].log_text())
    wait_until(lambda: lab.hosts()[name]["public_address"] == new, 15, what="the new address known")
