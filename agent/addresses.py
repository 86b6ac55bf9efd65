"""This host's underlay addresses, read over netlink."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from agent.netlink import RTMGRP_IPV4_IFADDR, Netlink
from cladnet.tasks import cancel_and_wait

log = logging.getLogger("cladnet.agent")


def _read(exclude: frozenset[str]) -> list[str]:
    with Netlink() as nl:
        found = nl.addresses(socket.AF_INET)
    return sorted(
        str(a.interface)
        for a in found
        # scope 0 = global: skips loopback and link-local
        if a.label not in exclude
        and a.scope == 0
        and not (a.interface.ip.is_link_local or a.interface.ip.is_loopback)
    )


async def underlay_addresses(exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Global IPv4 interface addresses with their prefix, e.g. ``["10.0.1.5/24"]``.

    ``exclude`` names interfaces to ignore (the agent's own WireGuard devices).
    """
    return await asyncio.to_thread(_read, frozenset(exclude))


class AddressEvents:
    """Wakes waiters when an IPv4 address is added or removed (netlink multicast).

    Polling stays as the fallback (``wait`` has a timeout), so a missed or
    unavailable event costs latency, never correctness.
    """

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="netlink-addresses")

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        try:
            nl = Netlink(groups=RTMGRP_IPV4_IFADDR)
        except OSError as exc:
            log.warning("netlink address events unavailable, polling", extra={"error": repr(exc)})
            return
        nl.sock.setblocking(False)
        loop.add_reader(nl.sock.fileno(), readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                # Drain until EAGAIN: what changed is read again in full. An overflow
                # (ENOBUFS) means events were lost, which is a change too.
                with contextlib.suppress(OSError):
                    while True:
                        nl.sock.recv(1 << 16)
                self._changed.set()
        finally:
            loop.remove_reader(nl.sock.fileno())
            nl.close()

    def poke(self) -> None:
        """Wake the waiter as an address event would (the agent's early heartbeat)."""
        self._changed.set()

    async def wait(self, seconds: float) -> None:
        """Return after an address event or ``seconds``, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
        self._changed.clear()

    async def close(self) -> None:
        await cancel_and_wait([self._task])
