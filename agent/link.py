"""Interface address, MTU, state and routes of the agent's WireGuard device (pyroute2)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import Any


class LinkError(Exception):
    """An interface could not be found or configured."""


def _ipr(netns: str | None) -> Any:
    from pyroute2 import IPRoute  # imported lazily: pyroute2 costs ~11 MB

    return IPRoute(netns=netns) if netns else IPRoute()


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _configure(
    ifname: str, address: str, mtu: int, netns: str | None, routes: Sequence[str]
) -> None:
    wanted = ipaddress.ip_interface(address)
    family = 2 if wanted.version == 4 else 10  # AF_INET, AF_INET6
    with _ipr(netns) as ipr:
        index = _index(ipr, ifname)
        if index is None:
            raise LinkError(f"no interface {ifname!r}")
        ipr.link("set", index=index, mtu=mtu)
        present = [
            ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            for msg in ipr.get_addr(index=index, family=family)
        ]
        if wanted not in present:
            ipr.addr("add", index=index, address=str(wanted.ip), prefixlen=wanted.network.prefixlen)
        # Stale overlay addresses (the host got a new IP) would still answer and route;
        # they go after the new one is in place, or the kernel would flush the routes.
        for have in present:
            if have != wanted and not have.ip.is_link_local:
                ipr.addr("del", index=index, address=str(have.ip), prefixlen=have.network.prefixlen)
        ipr.link("set", index=index, state="up")
        existing = {
            (msg.get_attr("RTA_DST"), msg["dst_len"])
            for msg in ipr.get_routes(family=family, oif=index, table=254)
        }
        for cidr in (str(wanted.network), *routes):
            net = ipaddress.ip_network(cidr, strict=False)
            if (str(net.network_address), net.prefixlen) not in existing:
                ipr.route("add", dst=str(net), oif=index, scope=253)  # 253: link scope


async def configure(
    ifname: str,
    address: str,
    mtu: int,
    *,
    netns: str | None = None,
    routes: Sequence[str] = (),
) -> None:
    """Give ``ifname`` exactly the address ``address`` (ip/prefix), set its MTU, bring it up.

    The overlay network (the address's prefix) and every CIDR in ``routes`` get a route
    via the device. Idempotent; other addresses of the same family are removed.
    ``netns`` names a network namespace to work in instead of the current one.
    """
    await asyncio.to_thread(_configure, ifname, address, mtu, netns, tuple(routes))


def _delete(ifname: str, netns: str | None) -> None:
    with _ipr(netns) as ipr:
        index = _index(ipr, ifname)
        if index is not None:
            ipr.link("del", index=index)


async def delete(ifname: str, *, netns: str | None = None) -> None:
    """Delete the interface ``ifname`` if it exists."""
    await asyncio.to_thread(_delete, ifname, netns)


def _exists(ifname: str, netns: str | None) -> bool:
    with _ipr(netns) as ipr:
        return _index(ipr, ifname) is not None


async def exists(ifname: str, *, netns: str | None = None) -> bool:
    """Whether an interface ``ifname`` exists (in ``netns``, or the current namespace)."""
    return await asyncio.to_thread(_exists, ifname, netns)
