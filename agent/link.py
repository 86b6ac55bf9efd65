"""Interface address, MTU, state and routes of the agent's WireGuard device (netlink)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

from agent.netlink import Netlink


class LinkError(Exception):
    """An interface could not be found or configured."""


def _index(nl: Netlink, ifname: str) -> int:
    index = nl.index(ifname)
    if index is None:
        raise LinkError(f"no interface {ifname!r}")
    return index


def _configure(
    ifname: str, address: str, mtu: int, netns: str | None, routes: Sequence[str]
) -> None:
    wanted = ipaddress.ip_interface(address)
    family = socket.AF_INET if wanted.version == 4 else socket.AF_INET6
    with Netlink(netns) as nl:
        index = _index(nl, ifname)
        nl.set_link(index, mtu=mtu)
        present = [a.interface for a in nl.addresses(family) if a.index == index]
        if wanted not in present:
            nl.change_address(True, index, wanted)
        # Stale overlay addresses (the host got a new IP) would still answer and route;
        # they go after the new one is in place, or the kernel would flush the routes.
        for have in present:
            if have != wanted and not have.ip.is_link_local:
                nl.change_address(False, index, have)
        nl.set_link(index, up=True)
        existing = nl.routes(index, family)
        for cidr in (str(wanted.network), *routes):
            net = ipaddress.ip_network(cidr, strict=False)
            if (str(net.network_address), net.prefixlen) not in existing:
                nl.add_route(index, net)


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
    with Netlink(netns) as nl:
        index = nl.index(ifname)
        if index is not None:
            nl.delete_link(index)


async def delete(ifname: str, *, netns: str | None = None) -> None:
    """Delete the interface ``ifname`` if it exists."""
    await asyncio.to_thread(_delete, ifname, netns)


def _exists(ifname: str, netns: str | None) -> bool:
    with Netlink(netns) as nl:
        return nl.index(ifname) is not None


async def exists(ifname: str, *, netns: str | None = None) -> bool:
    """Whether an interface ``ifname`` exists (in ``netns``, or the current namespace)."""
    return await asyncio.to_thread(_exists, ifname, netns)
