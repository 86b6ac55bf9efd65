"""Agents across three "clouds" behind NAT — two of them with the SAME private subnet —
following a real controller: full mesh, private endpoints inside a cloud, public
(NAT) endpoints across clouds, recovery from a public and private address change,
agent restarts and a controller outage. Real wireguard-go, namespaces, nftables."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.agents import Agent
from lab.api import make_network, make_token
from lab.components import Controller, free_port, wait_until
from lab.multicloud import MultiCloud
from tests.support import need_root

# cloud → (private subnet, public host number on the internet bridge, hosts)
CLOUDS = {"a": ("192.168.1", 11, 2), "b": ("192.168.1", 12, 2), "c": ("10.77.0", 13, 1)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[tuple[MultiCloud, Controller, list[Agent], Path]]:
    """One topology for the whole module (building it is the slow part); the tests
    run in file order and each leaves the mesh whole."""
    need_root()
    from lab.components import Etcd

    tmp = tmp_path_factory.mktemp("clouds")
    net = MultiCloud()
    etcd = Etcd.serving(tmp / "etcd")
    ctl = Controller(etcd_url="", state_dir=tmp / "controller", port=free_port(), host=net.gateway)
    agents: list[Agent] = []
    try:
        etcd.start()
        ctl.etcd_url = etcd.url
        ctl.start()
        with ctl.client() as admin:
            make_network(admin, "clouds", cidr="10.215.0.0/24", keepalive=2)
            token = make_token(admin, "clouds")
        port_no = 51820
        for name, (subnet, public, count) in CLOUDS.items():
            net.add_cloud(name, subnet, public)
            for i in range(1, count + 1):
                ns = net.add_host(name, i)
                net.forward(name, port_no, net.host_address(name, i))
                agent = Agent(
                    net, len(agents) + 1, ns, tmp / f"agent-{name}{i}", f"cl-{net.tag}{name}{i}"
                )
                # Distinct ports, each forwarded by the cloud's NAT to its host: the
                # host is reached at <cloud public address>:<its port>.
                agent.start(
                    "join",
                    "--controller",
                    ctl.url,
                    "--hostname",
                    f"{name}{i}",
                    "--interface",
                    agent.interface,
                    "--listen-port",
                    str(port_no),
                    "--label",
                    f"cloud={name}",
                    "--label",
                    "region=r1",
                    "--label",
                    f"vpc={name}-vpc",
                    token=token,
                )
                port_no += 1
                agents.append(agent)
        yield net, ctl, agents, tmp
    finally:
        for a in agents:
            a.stop(signal.SIGKILL)
        ctl.stop()
        etcd.stop()
        net.cleanup()
        for a in agents:
            Path(f"/var/run/wireguard/{a.interface}.sock").unlink(missing_ok=True)


def _full_mesh(net: MultiCloud, agents: list[Agent], timeout: float = 60) -> float:
    started = time.monotonic()
    ips = {a.index: a.overlay_ip(30) for a in agents}
    for a in agents:
        for b in agents:
            if a is not b:
                assert wait_until(
                    lambda a=a, b=b: net.ping(a.ns, ips[b.index]),
                    timeout,
                    what=f"{a.ns} -> {b.ns} over the overlay",
                ), a.log_text()
    return time.monotonic() - started


def _cloud(agent: Agent) -> str:
    return agent.ns.rsplit("-", 1)[1][0]


def test_full_mesh_with_private_endpoints_inside_and_public_across(world) -> None:
    net, _, agents, _ = world
    _full_mesh(net, agents)
    by_key = {}
    for a in agents:
        by_key[(a.membership() or {})["me"]["public_key"]] = a
    for a in agents:
        for key, peer in a.wg_peers().items():
            other = by_key[key]
            host = peer["endpoint"].rsplit(":", 1)[0]
            if _cloud(other) == _cloud(a):
                # Same cloud: straight over the private subnet, no NAT.
                assert host.startswith(net.clouds[_cloud(a)].subnet + "."), (a.ns, peer)
            else:
                # Across clouds: the peer's cloud NAT address — even between a and b,
                # whose private subnets are the same 192.168.1.0/24.
                assert host == net.clouds[_cloud(other)].public, (a.ns, other.ns, peer)


def test_public_and_private_address_change_recovers(world) -> None:
    net, ctl, agents, _ = world
    mover = next(a for a in agents if a.ns.endswith("-c1"))
    ip_mover = mover.overlay_ip(30)
    # Cloud c's NAT gets a new public address, and the VM a new private one.
    started = time.monotonic()
    new_public = net.move_public_address("c", 23)
    net.move_host("c", 1, generation=1)
    others = [a for a in agents if a is not mover]
    for a in others:
        assert wait_until(lambda a=a: net.ping(a.ns, ip_mover), 60, what=f"{a.ns} -> moved c1"), (
            mover.log_text()
        )
    print(f"mesh back {time.monotonic() - started:.1f}s after the NAT and VM address change")
    with ctl.client() as admin:
        host = next(h for h in admin.get("/v1/networks/clouds/hosts").json() if h["name"] == "c1")
    assert host["public_address"] == new_public and host["public_address_changed_at"]
    for a in others:
        assert any(p["endpoint"].startswith(new_public + ":") for p in a.wg_peers().values())


def test_killed_agent_comes_back_with_the_same_address_and_key(world) -> None:
    net, _, agents, _ = world
    victim = agents[0]
    before = victim.membership()
    victim.stop(signal.SIGKILL)
    net.run(victim.ns, "ip", "link", "del", victim.interface, check=False)  # as after a reboot
    victim.start("run")
    _full_mesh(net, agents)
    after = victim.membership()
    assert after["me"]["overlay_ip"] == before["me"]["overlay_ip"]
    assert after["me"]["public_key"] == before["me"]["public_key"]
    shown = net.run(victim.ns, "wg", "show", victim.interface, "public-key").stdout.strip()
    assert shown == before["me"]["public_key"]


def test_controller_outage_keeps_tunnels_and_agents_resync(world) -> None:
    net, ctl, agents, tmp = world
    ctl.stop()
    a, b = agents[0], agents[-1]
    assert net.ping(a.ns, b.overlay_ip(30), count=3), "tunnels must not depend on the controller"
    time.sleep(3)
    assert net.ping(b.ns, a.overlay_ip(30), count=2)
    ctl.start()
    # A host joining now reaches everyone: the others resynced with the controller.
    with ctl.client() as admin:
        token = make_token(admin, "clouds")
    ns = net.add_host("a", 3)
    net.forward("a", 51899, net.host_address("a", 3))
    late = Agent(net, len(agents) + 1, ns, tmp / "agent-a3", f"cl-{net.tag}a3")
    agents.append(late)
    late.start(
        "join",
        "--controller",
        ctl.url,
        "--hostname",
        "a3",
        "--interface",
        late.interface,
        "--listen-port",
        "51899",
        "--label",
        "cloud=a",
        "--label",
        "region=r1",
        "--label",
        "vpc=a-vpc",
        token=token,
    )
    _full_mesh(net, agents)
