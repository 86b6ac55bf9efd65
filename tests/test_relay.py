"""The relay's pair forwarder on loopback: latching, WireGuard-only forwarding, strangers
and junk dropped. Real UDP sockets, no root."""

from __future__ import annotations

import asyncio
import socket

from agent.relay import PairForwarder, Side
from lab.components import free_port

INIT = b"\x01\0\0\0" + bytes(144)
DATA = b"\x04\0\0\0" + b"ciphertext-bytes" * 4


def udp(ip: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    s.settimeout(2)
    return s


def receive(s: socket.socket) -> tuple[bytes, tuple[str, int]] | None:
    try:
        return s.recvfrom(2048)
    except TimeoutError:
        return None


async def exchange(checks) -> None:  # type: ignore[no-untyped-def]
    latched: list[tuple[str, tuple[str, int]]] = []
    pair = PairForwarder(
        (Side("h-a", "127.0.0.1"), Side("h-b", "127.0.0.1")),
        lambda side, addr: latched.append((side.host_id, addr)),
    )
    ports = (free_port(), free_port())
    await pair.open("127.0.0.1", ports)
    try:
        await checks(pair, ports, latched)
    finally:
        pair.close()


def test_pair_latches_both_sides_and_forwards_only_wireguard() -> None:
    async def checks(pair, ports, latched) -> None:  # type: ignore[no-untyped-def]
        a, b = udp(), udp()
        loop = asyncio.get_running_loop()
        # A first: B is unknown yet, nothing to forward to.
        a.sendto(INIT, ("127.0.0.1", ports[0]))
        await asyncio.sleep(0.2)
        assert pair.counts == {"unlatched": 1}
        b.sendto(INIT, ("127.0.0.1", ports[1]))
        got = await loop.run_in_executor(None, receive, a)
        # B's packet reaches A unchanged, from A's own relay port (where A sends).
        assert got == (INIT, ("127.0.0.1", ports[0]))
        a.sendto(DATA, ("127.0.0.1", ports[0]))
        got = await loop.run_in_executor(None, receive, b)
        assert got == (DATA, ("127.0.0.1", ports[1]))
        assert [h for h, _ in latched] == ["h-a", "h-b"]
        assert latched[0][1] == a.getsockname() and latched[1][1] == b.getsockname()
        # Junk from a latched side is not forwarded: the relay is no open reflector.
        for junk in (b"hello", b"\x04\0\0\0short", b"\x09\0\0\0" + bytes(60), bytes(200)):
            a.sendto(junk, ("127.0.0.1", ports[0]))
        assert await loop.run_in_executor(None, receive, b) is None
        assert pair.counts["junk"] == 4 and pair.counts["forwarded"] == 2
        a.close()
        b.close()

    asyncio.run(exchange(checks))


def test_strangers_cannot_take_a_latched_port_or_latch_from_elsewhere() -> None:
    async def checks(pair, ports, latched) -> None:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        a, b, other = udp(), udp(), udp()
        a.sendto(INIT, ("127.0.0.1", ports[0]))
        b.sendto(INIT, ("127.0.0.1", ports[1]))
        await loop.run_in_executor(None, receive, a)
        # Another socket of the same address sends to A's port while A is active.
        other.sendto(DATA, ("127.0.0.1", ports[0]))
        assert await loop.run_in_executor(None, receive, b) is None
        assert pair.counts["stranger"] == 1
        # A source outside the host's public address never latches an open side.
        pair.sides[1].latched = None
        far = udp("127.0.0.2")
        far.sendto(INIT, ("127.0.0.1", ports[1]))
        await asyncio.sleep(0.2)
        assert pair.sides[1].latched is None and pair.counts["stranger"] == 2
        for s in (a, b, other, far):
            s.close()

    asyncio.run(exchange(checks))


def test_a_host_whose_nat_moved_is_latched_again_at_once() -> None:
    """The pair's host got a new public address (the relay reads it from its record): its
    packets from there take the port at once, without waiting for the old source to be
    silent for RELATCH_AFTER; before that they were strangers."""

    async def checks(pair, ports, latched) -> None:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        a, b, moved = udp(), udp(), udp("127.0.0.2")
        a.sendto(INIT, ("127.0.0.1", ports[0]))
        b.sendto(INIT, ("127.0.0.1", ports[1]))
        await loop.run_in_executor(None, receive, a)
        moved.sendto(DATA, ("127.0.0.1", ports[0]))  # not yet its public address
        assert await loop.run_in_executor(None, receive, b) is None
        pair.sides[0].expected_ip = "127.0.0.2"  # what the relay's pass does on a move
        moved.sendto(DATA, ("127.0.0.1", ports[0]))
        assert await loop.run_in_executor(None, receive, b) == (DATA, ("127.0.0.1", ports[1]))
        assert latched[-1] == ("h-a", moved.getsockname())
        # And B's packets now go to A's new source.
        b.sendto(DATA, ("127.0.0.1", ports[1]))
        assert await loop.run_in_executor(None, receive, moved) == (DATA, ("127.0.0.1", ports[0]))
        for s in (a, b, moved):
            s.close()

    asyncio.run(exchange(checks))
