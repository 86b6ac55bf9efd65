"""Hosts without a public address join the mesh: two clouds whose NATs map per
destination (``masquerade fully-random``, as the big clouds' NAT gateways) and one host
on the internet running ``cladnet-relay``. Real agents, real wireguard-go, namespaces,
nftables. Pairs across the symmetric NATs are relayed; the relay sees their WireGuard
sockets' reflexive addresses and records ``mapping_varies``."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.agents import Agent
from lab.api import make_network, make_token
from lab.components import Controller, Etcd, free_port, wait_until
from lab.multicloud import MultiCloud
from lab.natlab import udp_probe
from lab.relays import RELAY_PORTS, Relay
from tests.support import need_root

NAT = "masquerade fully-random"
CLOUDS = {"a": ("192.168.1", 11), "b": ("10.77.0", 12)}
# Plain masquerade keeps the source port when it can: endpoint-independent mapping.
EASY = {"c": ("10.88.0", 13), "d": ("10.99.0", 14)}
PUBLIC_HOST = 20


def eventually(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``predicate`` came true within ``timeout`` (so a failure can say more)."""
    try:
        return bool(wait_until(predicate, timeout))
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def world(
    tmp_path_factory,
) -> Iterator[tuple[MultiCloud, Controller, dict[str, Agent], Relay, Relay]]:
    need_root()
    tmp = tmp_path_factory.mktemp("reach")
    net = MultiCloud()
    # etcd on our internet address: the relay, on another namespace, reads it there.
    etcd = Etcd.serving(tmp / "etcd", host=net.gateway)
    ctl = Controller(
        etcd_url=etcd.url, state_dir=tmp / "controller", port=free_port(), host=net.gateway
    )
    agents: dict[str, Agent] = {}
    relays: list[Relay] = []
    try:
        etcd.start()
        ctl.start()
        with ctl.client() as admin:
            make_network(admin, "reach", cidr="10.216.0.0/24", keepalive=2)
            token = make_token(admin, "reach")
        for name, (subnet, public) in CLOUDS.items():
            net.add_cloud(name, subnet, public, nat=NAT)
        for name, (subnet, public) in EASY.items():
            net.add_cloud(name, subnet, public)
            net.drop_unsolicited(name)  # as NAT gateways do (see its docstring)
        public_ns = net.add_public_host("p", PUBLIC_HOST)
        relays.append(Relay(net, public_ns, "r1", PUBLIC_HOST, etcd.url, tmp / "r1.log"))
        # A second relay on an internet host of its own (no agent there).
        second = net.add_public_host("q", PUBLIC_HOST + 1)
        relays.append(Relay(net, second, "r2", PUBLIC_HOST + 1, etcd.url, tmp / "r2.log"))
        hosts = (
            [("p", public_ns)]
            + [(f"{c}{i}", net.add_host(c, i)) for c in CLOUDS for i in (1, 2)]
            + [(f"{c}1", net.add_host(c, 1)) for c in EASY]
        )
        for n, (name, ns) in enumerate(hosts, start=1):
            agent = Agent(net, n, ns, tmp / f"agent-{name}", f"cl-{net.tag}{name}")
            site = ["--label", f"site={name[0]}"] if name != "p" else []
            agent.start(
                "join",
                "--controller",
                ctl.url,
                "--hostname",
                name,
                "--interface",
                agent.interface,
                "--listen-port",
                "51820",
                *site,
                token=token,
            )
            agents[name] = agent
        yield net, ctl, agents, relays[0], relays[1]
    finally:
        for a in agents.values():
            a.stop(signal.SIGKILL)
        for relay in relays:
            relay.stop()
        ctl.stop()
        etcd.stop()
        net.cleanup()
        for a in agents.values():
            Path(f"/var/run/wireguard/{a.interface}.sock").unlink(missing_ok=True)


def test_the_lab_nats_really_map_as_assumed(world) -> None:
    """Two-observer probe: one socket behind each NAT, two destinations → two ports
    behind fully-random, one port behind plain masquerade."""
    net, _, agents, _, _ = world
    for cloud in [*CLOUDS, *EASY]:
        seen = udp_probe(
            net, agents[f"{cloud}1"].ns, agents["p"].ns, f"{net.inet}.{PUBLIC_HOST}", 47000, 45000
        )
        first, second = (s.rsplit(":", 1)[1] for s in seen)
        if cloud in CLOUDS:
            assert first != second, f"NAT {cloud} kept one port for two destinations: {seen}"
        else:
            assert first == second == "45000", f"NAT {cloud} changed ports: {seen}"


def test_full_mesh_pings_and_symmetric_pairs_are_relayed(world) -> None:
    net, ctl, agents, relay, relay2 = world
    ips = {name: a.overlay_ip(30) for name, a in agents.items()}
    for src, a in agents.items():
        for dst in agents:
            if src != dst:
                ok = eventually(lambda a=a, dst=dst: net.ping(a.ns, ips[dst]), 60)
                assert ok, (
                    a.wg_peers(),
                    agents[dst].wg_peers(),
                    relay.log.read_text()[-5000:],
                    relay2.log.read_text()[-5000:],
                )
    keys = {(a.membership() or {})["me"]["public_key"]: name for name, a in agents.items()}
    relay_ip = f"{net.inet}.{PUBLIC_HOST}"
    relay_ips = {relay.address, relay2.address}
    for name in ("a1", "a2", "b1", "b2"):
        for key, peer in agents[name].wg_peers().items():
            other = keys[key]
            host, port = peer["endpoint"].rsplit(":", 1)
            if other == "p":
                assert peer["endpoint"] == f"{relay_ip}:51820", (name, other, peer)  # direct
            elif other[0] == name[0]:
                assert host.startswith(CLOUDS[name[0]][0] + "."), (name, other, peer)
            else:  # across two symmetric NATs: through the relay
                assert host in relay_ips and RELAY_PORTS[0] <= int(port) <= RELAY_PORTS[1], (
                    name,
                    other,
                    peer,
                )

    def hosts_now() -> dict[str, dict]:
        with ctl.client() as admin:
            return {h["name"]: h for h in admin.get("/v1/networks/reach/hosts").json()}

    for name in EASY:  # pairs with the symmetric hosts: relayed too
        assert all(
            RELAY_PORTS[0] <= int(p["endpoint"].rsplit(":", 1)[1]) <= RELAY_PORTS[1]
            for k, p in agents[f"{name}1"].wg_peers().items()
            if keys[k][0] in CLOUDS
        )
    # Observations are written on the relay's next pass after the latch (1 s).
    wait_until(
        lambda: all(hosts_now()[n]["mapping_varies"] for n in ("a1", "a2", "b1", "b2")),
        10,
        what="mapping_varies",
    )
    hosts = hosts_now()
    for name in ("a1", "a2", "b1", "b2"):
        h = hosts[name]
        # Two relayed pairs each: two relay ports saw two different NAT ports.
        assert h["mapping_varies"] is True, h
        assert {c["observer"].split(":")[0] for c in h["reflexive"]} <= {"r1", "r2"}
        nat_ip = net.clouds[name[0]].public
        assert all(c["endpoint"].startswith(nat_ip + ":") for c in h["reflexive"]), h
        assert len(h["relays"]) == 4, h  # the other cloud's two, c1 and d1
        assert {v.rsplit(":", 1)[0] for v in h["relays"].values()} <= relay_ips, h
    assert hosts["p"]["relays"] == {} and not hosts["p"]["mapping_varies"]
    # The agent says so itself: `cladnet-agent status` and its log.
    shown = net.run(
        agents["a1"].ns,
        sys.executable,
        "-m",
        "agent.main",
        "status",
        "--state-dir",
        str(agents["a1"].state_dir),
    ).stdout
    planned = json.loads(shown)[0]["paths"]
    assert planned["a2"] == "private" and planned["p"] == "direct", planned
    assert planned["b1"].startswith("relayed via "), planned
    assert "relayed via" in "".join(p.read_text() for p in agents["a1"].logs)  # "peer path"


def test_path_data_is_written_on_change_only(world) -> None:
    """Relayed pairs keep flowing (keepalives every 2 s), yet no peer record is rewritten:
    the relays write observations and ports only when they change, never on a timer."""
    net, ctl, agents, *_ = world

    def stamps() -> dict[str, float]:
        with ctl.client() as admin:
            return {
                h["name"]: h["updated_at"] for h in admin.get("/v1/networks/reach/hosts").json()
            }

    # Two windows: a writer on a timer writes in both; a one-off move (a relay whose 3-s
    # lease lapsed on a loaded machine hands its pairs over) leaves the second quiet.
    windows = []
    for _ in range(2):
        before = stamps()
        time.sleep(5)
        assert net.ping(agents["a1"].ns, agents["b2"].overlay_ip())
        after = stamps()
        windows.append({n: (before[n], after[n]) for n in after if after[n] != before.get(n)})
        if not windows[-1]:
            break
    assert not windows[-1], windows


def test_relay_forwards_only_wireguard_packets(world) -> None:
    net, ctl, agents, *relays = world
    with ctl.client() as admin:
        a1 = next(h for h in admin.get("/v1/networks/reach/hosts").json() if h["name"] == "a1")
    address, _, port_text = next(iter(a1["relays"].values())).rpartition(":")
    relay, port = next(r for r in relays if r.address == address), int(port_text)
    before = relay.counts()
    junk = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for payload in (b"hello", b"\\x04\\0\\0\\0x", b"\\x01\\0\\0\\0" + bytes(10), bytes(300)):
            s.sendto(payload, ("{relay.address}", {port}))
    """)
    net.run(agents["a1"].ns, sys.executable, "-c", junk)
    assert wait_until(
        lambda: relay.counts().get("junk", 0) >= before.get("junk", 0) + 4, 10, what="junk counted"
    )
    # And the relayed pairs still work: it forwarded WireGuard, nothing else, in the
    # kernel (latched pairs; its counters are read on each pass).
    for peer in ("b1", "b2"):
        assert net.ping(agents["a1"].ns, agents[peer].overlay_ip(), count=2)
    assert wait_until(
        lambda: relay.counts().get("kernel", 0) > before.get("kernel", 0),
        10,
        what="packets forwarded in the kernel",
    )


def test_endpoint_independent_nats_go_direct(world) -> None:
    """c1 and d1 sit behind plain masquerade: the relays see one NAT port from many relay
    ports (a stable reflexive address), so the pair leaves its relay for the NATs'
    addresses, both sending at once, and still pings."""
    net, ctl, agents, *_ = world
    nat = {name: net.clouds[name].public for name in EASY}

    def direct() -> bool:
        ends = {k: p["endpoint"] for k, p in agents["c1"].wg_peers().items()}
        return ends.get(agents["d1"].membership()["me"]["public_key"], "").startswith(
            nat["d"] + ":"
        )

    ok = wait_until(direct, 30, what="c1 -> d1 direct")
    with ctl.client() as admin:
        hosts = {h["name"]: h for h in admin.get("/v1/networks/reach/hosts").json()}
    assert ok, (hosts["c1"]["reflexive"], hosts["d1"]["reflexive"], agents["c1"].log_text())
    for name in ("c1", "d1"):
        assert not hosts[name]["mapping_varies"], hosts[name]
    assert hosts["d1"]["id"] in hosts["c1"]["relays"]  # the relay stands by
    for src, dst in (("c1", "d1"), ("d1", "c1")):
        ok = wait_until(
            lambda src=src, dst=dst: net.ping(agents[src].ns, agents[dst].overlay_ip()),
            30,
            what=f"{src} -> {dst}",
        )
        assert ok, agents[src].log_text()


def test_a_direct_path_that_stops_falls_back_to_the_relay(world) -> None:
    """Block c1 <-> d1 between the NATs: within seconds the pair is relayed and pings."""
    net, _, agents, *_ = world
    router, nat_d = net.clouds["c"].router, net.clouds["d"].public
    net.run(router, "nft", "add chain ip cl-fw block { type filter hook forward priority 0 ; }")
    net.run(router, "nft", f"add rule ip cl-fw block ip saddr {nat_d} drop")
    net.run(router, "nft", f"add rule ip cl-fw block ip daddr {nat_d} drop")
    started = time.monotonic()
    try:
        d1_key = agents["d1"].membership()["me"]["public_key"]

        def relayed() -> bool:
            ep = agents["c1"].wg_peers().get(d1_key, {}).get("endpoint", "")
            return int(ep.rsplit(":", 1)[1]) in range(RELAY_PORTS[0], RELAY_PORTS[1] + 1)

        assert eventually(relayed, 60), agents["c1"].log_text()
        ok = eventually(lambda: net.ping(agents["c1"].ns, agents["d1"].overlay_ip()), 30)
        assert ok, agents["c1"].log_text()
        print(f"c1 -> d1 relayed and pinging {time.monotonic() - started:.1f}s after the block")
    finally:
        net.run(router, "nft", "delete chain ip cl-fw block", check=False)


def test_killed_relay_pairs_move_to_the_other_relay(world) -> None:
    net, ctl, agents, *relays = world

    def relays_of(name: str) -> dict[str, str]:
        with ctl.client() as admin:
            hosts = admin.get("/v1/networks/reach/hosts").json()
        return next(h for h in hosts if h["name"] == name)["relays"]

    victim = next(
        r for r in relays if any(v.startswith(r.address + ":") for v in relays_of("a1").values())
    )
    survivor = next(r for r in relays if r is not victim)
    started = time.monotonic()
    victim.kill()
    for src, dst in (("a1", "b1"), ("a1", "b2"), ("b2", "a2"), ("b1", "a2")):
        ok = eventually(
            lambda src=src, dst=dst: net.ping(agents[src].ns, agents[dst].overlay_ip(), wait=0.3),
            60,
        )
        assert ok, (src, dst, agents[src].log_text()[-3000:], survivor.log.read_text()[-3000:])
        print(f"{src} -> {dst} pings {time.monotonic() - started:.1f}s after a relay was killed")
    for name in ("a1", "a2", "b1", "b2"):
        moved = eventually(
            lambda name=name: all(
                v.startswith(survivor.address + ":") for v in relays_of(name).values()
            ),
            10,
        )
        assert moved, relays_of(name)
