"""This host's underlay addresses, read over netlink (pyroute2)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

from cladnet.tasks import cancel_and_wait

log = logging.getLogger("cladnet.agent")


def _read(exclude: frozenset[str]) -> list[str]:
    from pyroute2 import IPRoute  # imported lazily: only the agent needs netlink

    found = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            label = msg.get_attr("IFA_LABEL") or ""
            if label in exclude or msg["scope"] != 0:  # scope 0 = global; skips loopback
                continue
            address = ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            if address.ip.is_link_local or address.ip.is_loopback:
                continue
            found.append(str(address))
    return sorted(found)


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
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR

        try:
            async with AsyncIPRoute() as ipr:
                await ipr.bind(groups=RTMGRP_IPV4_IFADDR)
                while True:
                    async for _ in ipr.get():
                        self._changed.set()
        except (OSError, RuntimeError) as exc:
            log.warning("netlink address events unavailable, polling", extra={"error": repr(exc)})

    async def wait(self, seconds: float) -> None:
        """Return after an address event or ``seconds``, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
        self._changed.clear()

    async def close(self) -> None:
        await cancel_and_wait([self._task])
