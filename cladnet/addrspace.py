"""Address-space planner (pure): free RFC 1918 space and one recommended prefix.

Every host's underlay CIDRs and every existing network's CIDR are subtracted from the
three private blocks. All of it is interval arithmetic on 32-bit integers (sort + sweep),
never enumeration of subnets or addresses, so 30,000 used CIDRs plan in milliseconds.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network

RFC1918_BLOCKS: tuple[IPv4Network, ...] = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)

# The smallest network we recommend (/24) and the largest one there is (/8).
MAX_PREFIX_LEN = 24
MIN_PREFIX_LEN = 8

_ALL_BITS = 0xFFFFFFFF
_BLOCK_RANGES: tuple[tuple[int, int], ...] = tuple(
    (int(b.network_address), int(b.broadcast_address)) for b in RFC1918_BLOCKS
)


@dataclass(frozen=True)
class BlockSpace:
    """What is left of one RFC 1918 block: maximal free CIDRs in address order."""

    block: IPv4Network
    free: list[IPv4Network]
    free_addresses: int


@dataclass(frozen=True)
class AddressSpacePlan:
    """Free space per block (in ``RFC1918_BLOCKS`` order) and the recommended network."""

    hosts: int
    prefix_len: int
    blocks: list[BlockSpace]
    recommended: IPv4Network | None


def is_private_cidr(net: IPv4Network) -> bool:
    """True when ``net`` lies entirely inside one RFC 1918 block."""
    if not isinstance(net, IPv4Network):
        return False
    return any(net.subnet_of(block) for block in RFC1918_BLOCKS)


def prefix_for_hosts(hosts: int) -> int:
    """Prefix length for a network of ``hosts`` hosts with at least 2x headroom.

    The longest prefix whose usable addresses (``2**(32-p) - 2``) are ``>= 2 * hosts``,
    but never longer than /24 (the smallest network we recommend) and never shorter
    than /8 (larger than any RFC 1918 block can hold). Raises ValueError for
    ``hosts < 1`` and TypeError for non-integers.
    """
    if isinstance(hosts, bool):
        raise TypeError("hosts must be an int, not bool")
    hosts = operator.index(hosts)
    if hosts < 1:
        raise ValueError(f"hosts must be >= 1, got {hosts}")
    # Need 2*hosts usable + network + broadcast addresses: the smallest power of two
    # >= need has (need - 1).bit_length() host bits.
    need = 2 * hosts + 2
    prefix = 32 - (need - 1).bit_length()
    return max(MIN_PREFIX_LEN, min(MAX_PREFIX_LEN, prefix))


def usable_addresses(net: IPv4Network) -> int:
    """Addresses of ``net`` minus network and broadcast (never negative)."""
    return max(0, net.num_addresses - 2)


def _interval(net: IPv4Network) -> tuple[int, int]:
    # Cheaper than net.broadcast_address, which builds an address object per call.
    start = int(net.network_address)
    return start, start | (_ALL_BITS >> net.prefixlen)


def _interval_keys(cidrs: Iterable[IPv4Network | str]) -> set[int]:
    """Each IPv4 CIDR as one integer ``first << 32 | last``, deduplicated.

    One int per interval sorts several times faster than a (first, last) tuple, and
    hosts share many underlay CIDRs, so the set also shrinks what there is to sort.
    """
    keys: set[int] = set()
    add = keys.add
    for item in cidrs:
        if isinstance(item, IPv4Network):
            net = item
        elif isinstance(item, IPv6Network):
            continue
        elif isinstance(item, str):
            parsed = ip_network(item, strict=False)
            if not isinstance(parsed, IPv4Network):
                continue
            net = parsed
        else:
            raise TypeError(f"expected IPv4Network or str, got {type(item).__name__}")
        start = int(net.network_address)
        add(start << 32 | start | (_ALL_BITS >> net.prefixlen))
    return keys


def _merge(keys: set[int]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    cur_start = cur_end = -2
    for key in sorted(keys):
        start, end = key >> 32, key & _ALL_BITS
        # Touching intervals merge too: a free gap between them would be empty.
        if start <= cur_end + 1:
            if end > cur_end:
                cur_end = end
        else:
            if cur_start >= 0:
                merged.append((cur_start, cur_end))
            cur_start, cur_end = start, end
    if cur_start >= 0:
        merged.append((cur_start, cur_end))
    return merged


def merge_intervals(cidrs: Iterable[IPv4Network | str]) -> list[tuple[int, int]]:
    """Sorted, disjoint, inclusive ``(first, last)`` integer intervals covering ``cidrs``.

    Overlapping and adjacent intervals are merged. Strings are parsed with
    ``strict=False`` (host bits allowed); IPv6 entries are skipped; an invalid string
    raises ValueError and any other type raises TypeError.
    """
    return _merge(_interval_keys(cidrs))


def find_overlap(candidate: IPv4Network, used: Iterable[IPv4Network]) -> IPv4Network | None:
    """The first net of ``used`` that overlaps ``candidate``, or None (IPv6 is skipped)."""
    c_start, c_end = _interval(candidate)
    for net in used:
        if not isinstance(net, IPv4Network):
            continue
        start, end = _interval(net)
        if start <= c_end and c_start <= end:
            return net
    return None


def _range_to_cidrs(start: int, end: int) -> list[tuple[int, int]]:
    """Maximal aligned ``(address, prefixlen)`` CIDRs covering ``start..end`` inclusive."""
    out: list[tuple[int, int]] = []
    while start <= end:
        # Largest power of two that start is aligned to (start == 0 is aligned to all)...
        align = start & -start if start else 1 << 32
        # ...and that still fits before end.
        fit = 1 << ((end - start + 1).bit_length() - 1)
        size = align if align < fit else fit
        out.append((start, 33 - size.bit_length()))
        start += size
    return out


def _free_gaps(lo: int, hi: int, merged: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Gaps of ``lo..hi`` not covered by the sorted, disjoint ``merged`` intervals."""
    gaps: list[tuple[int, int]] = []
    # Skip straight to the first interval that can reach the block.
    i = bisect.bisect_left(merged, (lo, -1))
    if i > 0 and merged[i - 1][1] >= lo:
        i -= 1
    cursor = lo
    for start, end in merged[i:]:
        if start > hi:
            break
        if start > cursor:
            gaps.append((cursor, start - 1))
        # Disjoint and sorted: each interval ends past the previous one.
        cursor = end + 1
    if cursor <= hi:
        gaps.append((cursor, hi))
    return gaps


def plan_address_spaces(used: Iterable[IPv4Network | str], hosts: int) -> AddressSpacePlan:
    """Free RFC 1918 space per block and one recommended ``prefix_for_hosts(hosts)`` network.

    Each used CIDR is clipped to the blocks (anything outside them is ignored), the
    rest is merged and subtracted, and each free gap is split into maximal aligned
    CIDRs. The recommendation is taken from the largest free CIDR that can hold the
    prefix (ties: earlier block, then lower address), as its LAST aligned subnet: clouds
    hand out low ranges such as 10.0.0.0/24 by default, so the end of the biggest free
    gap is the least likely to clash with a subnet that appears later. It is None when
    no free CIDR is large enough.

    Cost: a sort of the distinct used CIDRs plus one ``IPv4Network`` per free CIDR; the
    latter dominates when many small scattered networks leave tens of thousands of gaps.
    """
    prefix_len = prefix_for_hosts(hosts)
    merged = merge_intervals(used)

    blocks: list[BlockSpace] = []
    # Best candidate so far as (prefixlen, block index, address).
    best: tuple[int, int, int] | None = None
    for index, (block, (lo, hi)) in enumerate(zip(RFC1918_BLOCKS, _BLOCK_RANGES, strict=True)):
        free: list[IPv4Network] = []
        free_addresses = 0
        for gap_start, gap_end in _free_gaps(lo, hi, merged):
            free_addresses += gap_end - gap_start + 1
            for address, plen in _range_to_cidrs(gap_start, gap_end):
                free.append(IPv4Network((address, plen)))
                # Strict "<" keeps the earliest block and then the lowest address on ties.
                if plen <= prefix_len and (best is None or plen < best[0]):
                    best = (plen, index, address)
        blocks.append(BlockSpace(block=block, free=free, free_addresses=free_addresses))

    recommended: IPv4Network | None = None
    if best is not None:
        plen, _, address = best
        last_subnet = address + (1 << (32 - plen)) - (1 << (32 - prefix_len))
        recommended = IPv4Network((last_subnet, prefix_len))
    return AddressSpacePlan(
        hosts=hosts, prefix_len=prefix_len, blocks=blocks, recommended=recommended
    )
