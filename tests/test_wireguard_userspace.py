"""The wireguard-go backend on real devices, in two network namespaces joined by a veth pair.

Only our own namespaces carry traffic: the underlay is 192.168.250.0/30 on the veth
pair, the overlay 10.250.0.0/24; the fake third peer points into namespace B.
"""

from __future__ import annotations

import asyncio
import errno
import subprocess
from typing import Any

import pytest

from agent.wireguard.backend import WireGuardError
from agent.wireguard.userspace import UserspaceBackend
from cladnet import mesh
from cladnet.keys import generate_keypair
from lab.wgpair import NETWORK, Node

pytestmark = pytest.mark.root


def fake_peer(address: str) -> dict[str, Any]:
    """A third host that never answers; its endpoint lies in namespace B."""
    return {
        "id": "h-fake",
        "name": "fake",
        "network_id": NETWORK["id"],
        "public_key": generate_keypair()[1],
        "overlay_ip": "10.250.0.3",
        "listen_port": 51999,
        "addresses": [address],
        "public_address": None,
        "endpoints": [],
        "labels": {"site": "lab"},
    }


async def test_create_is_idempotent_and_reports_own_key(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    pid = a.backend.processes[a.iface].pid
    await a.backend.create(a.iface)
    assert a.backend.processes[a.iface].pid == pid
    state = await a.backend.get(a.iface)
    assert state.peers == {}
    # The device holds the host's key (wireguard-go's UAPI reports only the private one).
    wg = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        a.ns,
        "wg",
        "show",
        a.iface,
        "public-key",
        stdout=subprocess.PIPE,
    )
    shown, _ = await wg.communicate()
    assert shown.decode().strip() == a.host["public_key"]


async def test_mesh_converges_and_changes_only_the_difference(pair: tuple[Node, Node]) -> None:
    a, b = pair
    hosts = [a.host, b.host]
    first_a = await a.converge(hosts)
    first_b = await b.converge(hosts)
    assert [p.public_key for p in first_a.peers_to_add] == [b.host["public_key"]]
    assert [p.public_key for p in first_b.peers_to_add] == [a.host["public_key"]]
    assert first_a.listen_port == 51820  # wireguard-go starts on a random port

    assert await a.ping("10.250.0.2"), "no ping across the tunnel"
    state_a, state_b = await a.backend.get(a.iface), await b.backend.get(b.iface)
    peer_b = state_a.peers[b.host["public_key"]]
    assert peer_b.endpoint == "192.168.250.2:51820"
    assert peer_b.allowed_ips == ("10.250.0.2/32",)
    assert peer_b.last_handshake is not None
    assert state_b.peers[a.host["public_key"]].endpoint == "192.168.250.1:51820"
    # What the device reports compares equal to the plan: nothing left to do.
    assert not mesh.diff(a.applied[-1], state_a)
    assert not mesh.diff(b.applied[-1], state_b)

    # A third peer: only an add, and the session with B survives it.
    fake = fake_peer("192.168.250.2/30")
    added = await a.converge([*hosts, fake])
    assert added == mesh.DeviceChanges(peers_to_add=(a.applied[-1].peers[fake["public_key"]],))
    assert await a.ping("10.250.0.2")
    after_add = (await a.backend.get(a.iface)).peers
    assert set(after_add) == {b.host["public_key"], fake["public_key"]}
    assert after_add[fake["public_key"]].endpoint == "192.168.250.2:51999"
    assert after_add[b.host["public_key"]].last_handshake == peer_b.last_handshake
    assert after_add[b.host["public_key"]].rx_bytes > peer_b.rx_bytes

    # The fake peer moves: an endpoint-only update of that one peer.
    fake["addresses"] = ["192.168.250.1/30"]  # still inside our namespaces
    moved = await a.converge([*hosts, fake])
    assert moved == mesh.DeviceChanges(
        peers_to_update={
            fake["public_key"]: mesh.PeerUpdate(
                public_key=fake["public_key"], endpoint="192.168.250.1:51999"
            )
        }
    )
    assert await a.ping("10.250.0.2")
    after_move = (await a.backend.get(a.iface)).peers
    assert after_move[fake["public_key"]].endpoint == "192.168.250.1:51999"
    assert after_move[b.host["public_key"]].last_handshake == peer_b.last_handshake
    assert after_move[b.host["public_key"]].rx_bytes > after_add[b.host["public_key"]].rx_bytes

    # And goes away.
    removed = await a.converge(hosts)
    assert removed == mesh.DeviceChanges(peers_to_remove=(fake["public_key"],))
    assert await a.ping("10.250.0.2")
    after_remove = (await a.backend.get(a.iface)).peers
    assert set(after_remove) == {b.host["public_key"]}
    assert after_remove[b.host["public_key"]].last_handshake == peer_b.last_handshake
    assert not await a.converge(hosts)  # converged: a second pass changes nothing


async def test_listen_port_change_keeps_the_tunnel(pair: tuple[Node, Node]) -> None:
    a, b = pair
    await a.converge([a.host, b.host])
    await b.converge([a.host, b.host])
    assert await a.ping("10.250.0.2")

    a.host["listen_port"] = 51821
    assert await a.converge([a.host, b.host]) == mesh.DeviceChanges(listen_port=51821)
    changed_b = await b.converge([a.host, b.host])
    assert changed_b.peers_to_update[a.host["public_key"]].fields() == ["endpoint"]
    assert (await a.backend.get(a.iface)).listen_port == 51821
    assert await b.ping("10.250.0.1")


async def test_bad_request_is_reported_and_destroy_removes_device(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    bogus = mesh.DeviceChanges(
        peers_to_add=(
            mesh.PeerConfig(
                public_key=generate_keypair()[1],
                allowed_ips=("10.250.0.9/32",),
                endpoint="not-an-ip:1",
                keepalive=0,
            ),
        )
    )
    with pytest.raises(WireGuardError, match="refused") as excinfo:
        await a.backend.apply(a.iface, bogus)
    assert excinfo.value.errno == errno.EINVAL

    await a.backend.destroy(a.iface)
    assert not await a.backend.exists(a.iface)
    assert not a.backend.socket_path(a.iface).exists()
    assert a.backend.processes == {}
    await a.backend.destroy(a.iface)  # idempotent


async def test_names_are_machine_wide_and_a_new_backend_takes_over(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    # A's socket answers in every namespace; B must not mistake it for its own device.
    with pytest.raises(WireGuardError, match="another network namespace"):
        await b.backend.create(a.iface)
    assert not await b.backend.exists(a.iface)
    await b.backend.destroy(a.iface)  # not B's: left alone
    assert await a.backend.exists(a.iface)

    # A restarted agent finds the running device, starts nothing, and can remove it.
    successor = UserspaceBackend(netns=a.ns)
    await successor.create(a.iface)
    assert successor.processes == {}
    process = a.backend.processes[a.iface]
    await successor.destroy(a.iface)
    assert process.wait(timeout=10) is not None
    assert not await a.backend.exists(a.iface)
