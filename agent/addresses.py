"""This host's underlay addresses, read over netlink (pyroute2)."""

from __future__ import annotations

import asyncio
import ipaddress


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
