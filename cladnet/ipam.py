"""Overlay IP allocation logic (pure). The controller makes the choice unique in etcd."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection


def host_range(cidr: ipaddress.IPv4Network) -> tuple[int, int]:
    """First and last assignable address of ``cidr`` as integers (network/broadcast excluded)."""
    first, last = int(cidr.network_address), int(cidr.broadcast_address)
    if cidr.prefixlen >= 31:
        return first, last
    return first + 1, last - 1


def capacity(cidr: ipaddress.IPv4Network) -> int:
    """How many hosts ``cidr`` can hold."""
    first, last = host_range(cidr)
    return max(0, last - first + 1)


def pick_address(
    cidr: ipaddress.IPv4Network,
    used: Collection[int],
    rng: random.Random | None = None,
) -> ipaddress.IPv4Address | None:
    """Pick a free address of ``cidr`` not in ``used`` (integers), or None when full.

    Start at a random offset and probe upwards: concurrent joiners on several
    controllers then rarely race for the same address, and each etcd transaction
    usually succeeds on the first try.
    """
    first, last = host_range(cidr)
    size = last - first + 1
    if size <= 0 or len(used) >= size:
        return None
    start = (rng or random).randrange(size)
    for step in range(size):
        candidate = first + (start + step) % size
        if candidate not in used:
            return ipaddress.IPv4Address(candidate)
    return None
