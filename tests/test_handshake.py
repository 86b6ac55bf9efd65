"""Handshakes started by the agent when it adds a peer (agent/handshake.py): the pure
decisions, and two real wireguard-go devices that learn of each other in either order."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agent.handshake import HandshakeStarter, anew, plan, send, silent, target
from cladnet import mesh
from cladnet.mesh import DeviceState, PeerConfig, PeerState
from lab.wgpair import Node


def peer(key: str, ip: str = "10.1.0.2/32", endpoint: str | None = "192.0.2.1:51820") -> PeerConfig:
    return PeerConfig(public_key=key, allowed_ips=(ip,), endpoint=endpoint, keepalive=0)


def state(key: str, handshake: float | None) -> PeerState:
    return PeerState(key, ("10.1.0.2/32",), None, 0, last_handshake=handshake)


def test_the_lower_key_starts_and_every_new_peer_is_checked() -> None:
    added = [peer("B", "10.1.0.2/32"), peer("D", "10.1.0.4/32"), peer("F", "fd00::6/128")]
    chosen = plan(added, own_key="C")
    assert chosen.now == {"D": "10.1.0.4", "F": "fd00::6"}  # keys above ours: we start
    assert chosen.check == {"B": "10.1.0.2", "D": "10.1.0.4", "F": "fd00::6"}
    assert plan(added, own_key=None).now == chosen.check  # own key unknown: start all


def test_no_trigger_without_an_endpoint_or_a_host_route() -> None:
    assert target(peer("B", endpoint=None)) is None  # WireGuard could not initiate
    assert target(peer("B", ip="10.1.0.0/24")) is None  # no single address to send to
    assert plan([peer("B", endpoint=None)], own_key="A") == plan([], own_key="A")


def test_only_peers_still_without_a_handshake_are_triggered_again() -> None:
    check = {"B": "10.1.0.2", "D": "10.1.0.4", "gone": "10.1.0.9"}
    device = DeviceState(listen_port=1, peers={"B": state("B", 1.5), "D": state("D", None)})
    assert silent(check, device) == {"D": "10.1.0.4"}  # the removed peer is left alone


# --- real wireguard-go ------------------------------------------------------------------

TABLE = "cl-handshakes"
WG_PORT = 51820


def _nft(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True, check=True
    ).stdout


def count_handshake_packets(ns: str) -> None:
    """nftables counters in ``ns`` of WireGuard handshake messages received: type 1
    (initiation) and 2 (response), the first byte after the UDP header."""
    rules = f"""
    table inet {TABLE} {{
      counter initiations {{}}
      counter responses {{}}
      chain input {{
        type filter hook input priority filter; policy accept;
        udp dport {WG_PORT} @th,64,8 1 counter name initiations
        udp dport {WG_PORT} @th,64,8 2 counter name responses
      }}
    }}"""
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True
    )


def received(ns: str, what: str) -> int:
    """Packets the ``what`` counter (initiations, responses) of ``ns`` counted."""
    listing = json.loads(_nft(ns, "-j", "list", "counter", "inet", TABLE, what))
    return int(next(x["counter"]["packets"] for x in listing["nftables"] if "counter" in x))


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, limit: float = 30) -> None:
    """Poll ``check`` until true; ``limit`` only bounds a broken run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def starters(
    pair: tuple[Node, Node],
) -> AsyncIterator[tuple[tuple[Node, HandshakeStarter], tuple[Node, HandshakeStarter]]]:
    """The pair ordered by public key (lower first), each with its starter, counters on."""
    low, high = sorted(pair, key=lambda n: n.host["public_key"])
    made = []
    for node in (low, high):
        count_handshake_packets(node.ns)
        # Up and listening, but not knowing the other: an initiation to it is dropped.
        await node.backend.apply(node.iface, mesh.DeviceChanges(listen_port=WG_PORT))
        device = functools.partial(node.backend.get, node.iface)
        apply = functools.partial(node.backend.apply, node.iface)
        made.append(HandshakeStarter(node.iface, device, 0.5, netns=node.ns, apply=apply))
    try:
        yield (low, made[0]), (high, made[1])
    finally:
        for starter in made:
            await starter.close()


async def add(node: Node, other: Node, starter: HandshakeStarter) -> None:
    """``node`` adds ``other`` as the agent's apply step does, starter included."""
    changes = await node.converge([node.host, other.host])
    assert [p.public_key for p in changes.peers_to_add] == [other.host["public_key"]]
    assert changes.peers_to_add[0].keepalive == 0  # same site: nothing else would initiate
    starter.peers_added(changes.peers_to_add, node.host["public_key"])


async def handshake(node: Node, other: Node) -> bool:
    device = await node.backend.get(node.iface)
    state = device.peers.get(other.host["public_key"])
    return state is not None and state.last_handshake is not None


@pytest.mark.root
@pytest.mark.parametrize("first", ["lower key", "higher key"])
async def test_the_host_that_learns_last_completes_the_handshake(
    starters: tuple[tuple[Node, HandshakeStarter], tuple[Node, HandshakeStarter]], first: str
) -> None:
    """One host adds the other, whose key it does not know yet: its initiation (at once
    from the lower key, after the retry delay from the higher) is dropped there, and
    WireGuard would retry only 5 s later. When the second host adds the first, its
    starter initiates, and the first answers: the second receives a handshake response,
    which only an initiation of its own can bring."""
    early, late = starters if first == "lower key" else starters[::-1]
    (a, a_starter), (b, b_starter) = early, late
    await add(a, b, a_starter)
    # a's initiation reached b, which did not know a: dropped, no response.
    await until(lambda: received(b.ns, "initiations") >= 1, "a's initiation")
    assert received(a.ns, "responses") == 0
    assert not await handshake(b, a)

    await add(b, a, b_starter)
    await until(lambda: handshake(b, a), "the handshake")
    assert await handshake(a, b)
    assert received(b.ns, "responses") >= 1  # b initiated and a answered
    assert a_starter.sent + b_starter.sent >= 2


def test_a_peer_added_anew_keeps_what_the_device_had() -> None:
    held = PeerState("B", ("10.1.0.2/32",), "192.0.2.1:51820", 25, rx_bytes=240)
    device = DeviceState(listen_port=1, peers={"B": held})
    changes = anew(["B", "gone"], device)
    assert changes.peers_to_remove == ("B",)
    assert changes.peers_to_add == (PeerConfig("B", ("10.1.0.2/32",), "192.0.2.1:51820", 25),)


def block_wireguard(ns: str, on: bool) -> None:
    """Drop (or stop dropping) every WireGuard packet ``ns`` sends."""
    if not on:
        _nft(ns, "delete", "table", "inet", f"{TABLE}-drop")
        return
    rules = f"""
    table inet {TABLE}-drop {{
      chain output {{
        type filter hook output priority filter; policy accept;
        udp dport {WG_PORT} drop
      }}
    }}"""
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True
    )


@pytest.mark.root
async def test_initiations_held_back_at_both_ends_are_restarted_by_the_higher_key(
    starters: tuple[tuple[Node, HandshakeStarter], tuple[Node, HandshakeStarter]],
) -> None:
    """Both hosts know each other and both initiate at once: the lower key's trigger
    and the higher key's own traffic. Here both initiations are lost; crossed ones end
    the same way: each end only waits, and WireGuard holds both back for 5 s
    (REKEY_TIMEOUT) before it initiates again. At its retry the higher key's side adds
    the peer anew and triggers it, so the pair completes long before that."""
    (low, low_starter), (high, high_starter) = starters
    for node in (low, high):
        block_wireguard(node.ns, True)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await add(low, high, low_starter)
    await add(high, low, high_starter)
    assert send(high.iface, [low.host["overlay_ip"]], high.ns) == 1  # high's traffic
    await asyncio.sleep(0.2)  # both initiations sent, and lost
    for node in (low, high):
        block_wireguard(node.ns, False)
    assert received(low.ns, "initiations") == received(high.ns, "initiations") == 0

    # WireGuard alone would answer after 5 s; the starters' retry comes after 0.5 s.
    await until(lambda: handshake(high, low), "the handshake", limit=4.0 - (loop.time() - began))
    assert await handshake(low, high)
    assert (low_starter.readded, high_starter.readded) == (0, 1)  # low's check: too late
    assert received(low.ns, "initiations") >= 1  # the re-added peer's initiation


@pytest.mark.root
async def test_a_lost_first_initiation_of_the_lower_key_is_started_again(
    starters: tuple[tuple[Node, HandshakeStarter], tuple[Node, HandshakeStarter]],
) -> None:
    """The higher key's host has held the other for a while (nothing new to start
    there); the lower key's host adds it anew, as after a resume, and its trigger is
    lost. WireGuard would initiate again only after 5 s; the lower key's own check,
    2 x the retry delay after the add, adds the peer anew and starts it."""
    (low, low_starter), (high, _) = starters
    await high.converge([high.host, low.host])  # held before, no starter involved
    block_wireguard(low.ns, True)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await add(low, high, low_starter)  # its trigger: lost
    await asyncio.sleep(0.2)
    block_wireguard(low.ns, False)
    assert received(high.ns, "initiations") == 0

    await until(lambda: handshake(low, high), "the handshake", limit=4.0 - (loop.time() - began))
    assert low_starter.readded == 1
    assert received(low.ns, "responses") >= 1  # low initiated, high answered
