"""The address-space planner: concrete cases, properties, and a slow reference to agree with."""

from __future__ import annotations

import random
import time
from ipaddress import IPv4Network, IPv6Network, collapse_addresses, ip_network
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cladnet import addrspace
from cladnet.addrspace import (
    RFC1918_BLOCKS,
    AddressSpacePlan,
    find_overlap,
    is_private_cidr,
    merge_intervals,
    plan_address_spaces,
    prefix_for_hosts,
    usable_addresses,
)

N = IPv4Network
TEN, ONE72, ONE92 = N("10.0.0.0/8"), N("172.16.0.0/12"), N("192.168.0.0/16")


def nets(*cidrs: str) -> list[IPv4Network]:
    return [N(c) for c in cidrs]


def free_of(plan: AddressSpacePlan, block: IPv4Network) -> list[IPv4Network]:
    (space,) = [b for b in plan.blocks if b.block == block]
    return space.free


# --- constants and small helpers ------------------------------------------------------------


def test_blocks_are_rfc1918_in_order() -> None:
    assert RFC1918_BLOCKS == (TEN, ONE72, ONE92)


@pytest.mark.parametrize(
    ("cidr", "private"),
    [
        ("10.0.0.0/8", True),
        ("10.1.2.0/24", True),
        ("10.255.255.255/32", True),
        ("172.16.0.0/12", True),
        ("172.31.255.0/24", True),
        ("192.168.0.0/16", True),
        ("192.168.1.0/24", True),
        ("9.255.255.255/32", False),
        ("11.0.0.0/8", False),
        ("10.0.0.0/7", False),  # contains 10/8 but also 11/8
        ("172.15.0.0/16", False),
        ("172.32.0.0/16", False),
        ("172.0.0.0/8", False),  # straddles 172.16/12
        ("192.168.0.0/15", False),
        ("192.169.0.0/16", False),
        ("100.64.0.0/10", False),
        ("0.0.0.0/0", False),
    ],
)
def test_is_private_cidr(cidr: str, private: bool) -> None:
    assert is_private_cidr(N(cidr)) is private


def test_is_private_cidr_rejects_ipv6() -> None:
    assert is_private_cidr(IPv6Network("fd00::/8")) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cidr", "usable"),
    [
        ("10.0.0.0/8", 2**24 - 2),
        ("10.0.0.0/24", 254),
        ("10.0.0.0/30", 2),
        ("10.0.0.0/31", 0),
        ("10.0.0.1/32", 0),
    ],
)
def test_usable_addresses(cidr: str, usable: int) -> None:
    assert usable_addresses(N(cidr)) == usable


@pytest.mark.parametrize(
    ("hosts", "prefix"),
    [
        (1, 24),
        (126, 24),
        (127, 24),  # 2 * 127 = 254 = usable addresses of a /24: exactly fits
        (128, 23),  # 256 > 254
        (254, 23),
        (255, 23),  # 510 = usable addresses of a /23
        (256, 22),
        (100_000, 14),  # /15 has 131,070 usable < 200,000; /14 has 262,142
        (4_194_303, 9),
        (4_194_304, 8),
        (10**7, 8),  # more than a /8 holds: clamped to /8
        (10**12, 8),
    ],
)
def test_prefix_for_hosts(hosts: int, prefix: int) -> None:
    assert prefix_for_hosts(hosts) == prefix


@pytest.mark.parametrize("hosts", [0, -1, -(10**9)])
def test_prefix_for_hosts_rejects_non_positive(hosts: int) -> None:
    with pytest.raises(ValueError):
        prefix_for_hosts(hosts)
    with pytest.raises(ValueError):
        plan_address_spaces([], hosts)


@pytest.mark.parametrize("hosts", [1e5, 1.0, "10", True])
def test_prefix_for_hosts_rejects_non_integers(hosts: object) -> None:
    with pytest.raises(TypeError):
        prefix_for_hosts(hosts)  # type: ignore[arg-type]


def reference_prefix(hosts: int) -> int:
    fits = [p for p in range(8, 25) if 2 ** (32 - p) - 2 >= 2 * hosts]
    return max(fits) if fits else 8


@given(st.integers(min_value=1, max_value=2**26))
def test_prefix_for_hosts_matches_brute_force(hosts: int) -> None:
    prefix = prefix_for_hosts(hosts)
    assert prefix == reference_prefix(hosts)
    assert 8 <= prefix <= 24
    if prefix < 24:
        # Longest: one bit longer would not leave 2x headroom (unless clamped at /8).
        assert 2 ** (32 - (prefix + 1)) - 2 < 2 * hosts


def test_merge_intervals() -> None:
    got = merge_intervals(
        [
            "10.0.1.0/24",
            N("10.0.0.0/24"),  # adjacent to the first: merged
            "10.0.0.7/30",  # nested, host bits set
            "fd00::/8",  # IPv6: skipped
            IPv6Network("2001:db8::/32"),  # type: ignore[list-item]  # skipped too
            "192.168.1.0/24",
            "192.168.1.0/24",
            "192.168.3.0/24",  # one /24 gap to the previous: not merged
        ]
    )
    ten = int(N("10.0.0.0/8").network_address)
    c = int(N("192.168.0.0/16").network_address)
    assert got == [
        (ten, ten + 511),
        (c + 256, c + 511),
        (c + 768, c + 1023),
    ]
    assert merge_intervals([]) == []
    assert merge_intervals(["0.0.0.0/0", "10.0.0.0/8"]) == [(0, 2**32 - 1)]


def test_merge_intervals_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        merge_intervals(["10.0.0.0/33"])
    with pytest.raises(ValueError):
        merge_intervals(["not a cidr"])
    with pytest.raises(TypeError):
        merge_intervals([167772160])  # type: ignore[list-item]


def test_find_overlap() -> None:
    # IPv6 entries are skipped even though the signature does not invite them.
    used: list[Any] = [IPv6Network("fd00::/8"), *nets("192.168.1.0/24", "10.0.0.0/16")]
    used.append(N("10.0.5.0/24"))
    assert find_overlap(N("10.0.5.128/25"), used) == N("10.0.0.0/16")  # the first one
    assert find_overlap(N("10.0.0.0/8"), used) == N("10.0.0.0/16")
    assert find_overlap(N("192.168.0.0/24"), used) is None  # adjacent is not overlapping
    assert find_overlap(N("192.168.2.0/24"), used) is None
    assert find_overlap(N("0.0.0.0/0"), used) == N("192.168.1.0/24")
    assert find_overlap(N("10.0.0.0/8"), []) is None
    # Sharing a single address is overlapping, at either end.
    assert find_overlap(N("10.0.0.0/24"), nets("10.0.1.0/24", "10.0.0.255/32")) == N(
        "10.0.0.255/32"
    )
    assert find_overlap(N("10.0.0.0/32"), nets("10.0.0.0/24")) == N("10.0.0.0/24")
    assert find_overlap(N("10.0.0.7/32"), nets("10.0.0.7/32")) == N("10.0.0.7/32")


# --- plan_address_spaces: concrete cases ----------------------------------------------------


def test_empty_input_leaves_whole_blocks_and_recommends_end_of_10() -> None:
    plan = plan_address_spaces([], 1)
    assert plan.hosts == 1
    assert plan.prefix_len == 24
    assert [b.block for b in plan.blocks] == [TEN, ONE72, ONE92]
    assert [b.free for b in plan.blocks] == [[TEN], [ONE72], [ONE92]]
    assert [b.free_addresses for b in plan.blocks] == [2**24, 2**20, 2**16]
    assert plan.recommended == N("10.255.255.0/24")


def test_one_used_24_splits_192_168_into_maximal_cidrs() -> None:
    plan = plan_address_spaces([N("192.168.1.0/24")], 50)
    assert free_of(plan, ONE92) == nets(
        "192.168.0.0/24",
        "192.168.2.0/23",
        "192.168.4.0/22",
        "192.168.8.0/21",
        "192.168.16.0/20",
        "192.168.32.0/19",
        "192.168.64.0/18",
        "192.168.128.0/17",
    )
    assert plan.blocks[2].free_addresses == 2**16 - 256
    assert free_of(plan, TEN) == [TEN]
    assert free_of(plan, ONE72) == [ONE72]
    assert plan.recommended == N("10.255.255.0/24")


def test_used_in_the_middle_of_a_block() -> None:
    plan = plan_address_spaces(["172.20.0.0/16"], 1)
    assert free_of(plan, ONE72) == nets(
        "172.16.0.0/14", "172.21.0.0/16", "172.22.0.0/15", "172.24.0.0/13"
    )
    assert plan.blocks[1].free_addresses == 2**20 - 2**16


def test_used_cidr_covering_a_whole_block() -> None:
    plan = plan_address_spaces(["10.0.0.0/8"], 1)
    assert plan.blocks[0].free == []
    assert plan.blocks[0].free_addresses == 0
    # Next largest free CIDR is 172.16/12.
    assert plan.recommended == N("172.31.255.0/24")


def test_supernet_of_a_block_clips_to_it() -> None:
    plan = plan_address_spaces(["8.0.0.0/6"], 1)  # 8.0.0.0 - 11.255.255.255
    assert plan.blocks[0].free == []
    assert free_of(plan, ONE72) == [ONE72]
    assert free_of(plan, ONE92) == [ONE92]


def test_public_cidrs_are_ignored() -> None:
    public = [
        "8.8.8.0/24",
        "11.0.0.0/8",
        "9.255.255.255/32",
        "100.64.0.0/10",
        "172.15.255.0/24",
        "172.32.0.0/16",
        "192.167.0.0/16",
        "192.169.0.0/16",
        "203.0.113.0/24",
        "fd00::/8",
    ]
    assert plan_address_spaces(public, 1) == plan_address_spaces([], 1)


@pytest.mark.parametrize(
    ("straddling", "block_index"),
    [("172.0.0.0/8", 1), ("172.16.0.0/11", 1), ("192.0.0.0/8", 2), ("192.168.0.0/15", 2)],
)
def test_straddling_cidrs_are_clipped_to_the_block(straddling: str, block_index: int) -> None:
    plan = plan_address_spaces([straddling], 1)
    for index, space in enumerate(plan.blocks):
        if index == block_index:
            assert space.free == []
            assert space.free_addresses == 0
        else:
            assert space.free == [space.block]


def test_duplicates_and_nested_cidrs() -> None:
    used: list[IPv4Network | str] = ["10.0.0.0/16", "10.0.0.0/16", N("10.0.5.0/24")]
    used += ["10.0.0.0/24", "10.0.255.252/30"]
    plan = plan_address_spaces(used, 1)
    assert free_of(plan, TEN) == nets(
        "10.1.0.0/16",
        "10.2.0.0/15",
        "10.4.0.0/14",
        "10.8.0.0/13",
        "10.16.0.0/12",
        "10.32.0.0/11",
        "10.64.0.0/10",
        "10.128.0.0/9",
    )
    assert plan.blocks[0].free_addresses == 2**24 - 2**16
    assert plan.recommended == N("10.255.255.0/24")


def test_host_bits_set_are_accepted() -> None:
    assert plan_address_spaces(["10.1.2.3/16"], 1) == plan_address_spaces(["10.1.0.0/16"], 1)
    plan = plan_address_spaces(["192.168.1.77/24"], 1)
    assert N("192.168.1.0/24") not in free_of(plan, ONE92)
    assert plan.blocks[2].free_addresses == 2**16 - 256


def test_hosts_sizes_shape_the_recommendation() -> None:
    used = ["10.0.0.0/9"]
    assert plan_address_spaces(used, 1).recommended == N("10.255.255.0/24")
    assert plan_address_spaces(used, 126).recommended == N("10.255.255.0/24")
    assert plan_address_spaces(used, 127).recommended == N("10.255.255.0/24")
    assert plan_address_spaces(used, 128).recommended == N("10.255.254.0/23")
    plan = plan_address_spaces(used, 100_000)
    assert plan.prefix_len == 14
    assert plan.recommended == N("10.252.0.0/14")


def test_recommendation_ties_prefer_earlier_block() -> None:
    # Largest free CIDR in 10/8 is 10.240.0.0/12, as large as 172.16/12: 10/8 wins.
    used = ["10.0.0.0/9", "10.128.0.0/10", "10.192.0.0/11", "10.224.0.0/12"]
    assert plan_address_spaces(used, 1).recommended == N("10.255.255.0/24")
    # One bit smaller in 10/8 and 172.16/12 holds the largest one.
    plan = plan_address_spaces([*used, "10.240.0.0/13"], 1)
    assert plan.recommended == N("172.31.255.0/24")


def test_recommendation_ties_prefer_lower_address() -> None:
    # Free in 10/8: 10.0.0.0/10 and 10.192.0.0/10 - equal size, the lower one wins.
    plan = plan_address_spaces(["10.64.0.0/10", "10.128.0.0/10"], 1)
    assert free_of(plan, TEN) == nets("10.0.0.0/10", "10.192.0.0/10")
    assert plan.recommended == N("10.63.255.0/24")


def test_recommendation_prefers_largest_free_cidr_over_block_order() -> None:
    used = ["10.0.0.0/8", "172.16.0.0/13", "172.24.0.0/14", "172.28.0.0/15", "172.30.0.0/16"]
    # 172.16/12 has only a /16 left, as large as 192.168/16: the earlier block wins.
    plan = plan_address_spaces(used, 1000)
    assert plan.prefix_len == 21
    assert plan.recommended == N("172.31.248.0/21")
    # With a /17 left in 172.16/12, the whole of 192.168/16 is the larger one.
    plan = plan_address_spaces([*used, "172.31.0.0/17"], 1000)
    assert free_of(plan, ONE72) == [N("172.31.128.0/17")]
    assert plan.recommended == N("192.168.248.0/21")


def test_everything_used_recommends_none() -> None:
    plan = plan_address_spaces(["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"], 1)
    assert plan.recommended is None
    assert all(b.free == [] and b.free_addresses == 0 for b in plan.blocks)
    assert plan_address_spaces(["0.0.0.0/0"], 5).recommended is None


def test_only_fragments_smaller_than_the_prefix_recommends_none() -> None:
    # All private space used except 10.0.0.0/25: too small for a /24.
    used = [*TEN.address_exclude(N("10.0.0.0/25")), ONE72, ONE92]
    plan = plan_address_spaces(used, 1)
    assert free_of(plan, TEN) == [N("10.0.0.0/25")]
    assert plan.blocks[0].free_addresses == 128
    assert plan.recommended is None


def test_free_cidr_of_exactly_the_prefix_is_recommended() -> None:
    used = [*TEN.address_exclude(N("10.7.3.0/24")), ONE72, ONE92]
    assert plan_address_spaces(used, 100).recommended == N("10.7.3.0/24")
    assert plan_address_spaces(used, 200).recommended is None  # needs a /23


def test_large_input_is_fast() -> None:
    """30,000 CIDRs: interval arithmetic, not enumeration (a generous bound, see bench/)."""
    rng = random.Random(7)
    used = []
    for _ in range(30_000):
        block = rng.choice(RFC1918_BLOCKS)
        plen = rng.randint(max(16, block.prefixlen), 28)
        offset = rng.randrange(block.num_addresses)
        used.append(N((int(block.network_address) + offset, plen), strict=False))
    plan_address_spaces(used, 500)  # warm-up
    start = time.perf_counter()
    plan = plan_address_spaces(used, 500)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"planning 30,000 CIDRs took {elapsed * 1000:.0f} ms"
    # And the answer is still right.
    assert find_overlap(plan.recommended, used) is None  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------------

# Anchors near and inside the private blocks, so that inputs clip, nest and straddle.
ANCHORS = [
    int(N(a).network_address)
    for a in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "172.0.0.0/8", "192.0.0.0/8")
] + [0, 2**31]


@st.composite
def ipv4_networks(draw: st.DrawFn) -> IPv4Network:
    anchor = draw(st.sampled_from(ANCHORS))
    # Mostly small offsets: the interesting structure is near the start of each block.
    offset = draw(st.integers(0, 2**16 - 1) | st.integers(0, 2**24 - 1))
    plen = draw(st.integers(8, 30) | st.integers(0, 32))
    address = min(anchor + offset, 2**32 - 1)
    return N((address, plen), strict=False)


@st.composite
def used_items(draw: st.DrawFn) -> IPv4Network | str:
    net = draw(ipv4_networks())
    form = draw(st.sampled_from(["net", "str", "host-bits"]))
    if form == "net":
        return net
    if form == "str":
        return str(net)
    host = draw(st.integers(0, net.num_addresses - 1))
    return f"{net.network_address + host}/{net.prefixlen}"


used_lists = st.lists(used_items(), max_size=8)
hosts_values = st.integers(1, 300) | st.integers(1, 10**7)


def parsed(used: list[IPv4Network | str]) -> list[IPv4Network]:
    out = [u if isinstance(u, IPv4Network) else ip_network(u, strict=False) for u in used]
    return [u for u in out if isinstance(u, IPv4Network)]


def clipped(used: list[IPv4Network], block: IPv4Network) -> list[IPv4Network]:
    """The used space inside ``block`` (two CIDRs are either nested or disjoint)."""
    return [block if block.subnet_of(u) else u for u in used if u.overlaps(block)]


def reference_free(used: list[IPv4Network], block: IPv4Network) -> list[IPv4Network]:
    """Slow reference: address_exclude every used net from the block, then collapse."""
    free = [block]
    for u in clipped(used, block):
        remaining: list[IPv4Network] = []
        for f in free:
            if f.subnet_of(u):
                continue
            if u.subnet_of(f):
                remaining.extend(f.address_exclude(u))
            else:
                remaining.append(f)
        free = remaining
    return list(collapse_addresses(free))


def reference_recommended(
    free_per_block: list[list[IPv4Network]], prefix_len: int
) -> IPv4Network | None:
    candidates = [
        (f.prefixlen, index, int(f.network_address), f)
        for index, free in enumerate(free_per_block)
        for f in free
        if f.prefixlen <= prefix_len
    ]
    if not candidates:
        return None
    best = min(candidates)[3]
    # The last prefix_len subnet is the one holding the broadcast address.
    return N((best.broadcast_address, prefix_len), strict=False)


@settings(max_examples=300, deadline=None)
@given(used_lists, hosts_values)
def test_plan_matches_slow_reference(used: list[IPv4Network | str], hosts: int) -> None:
    plan = plan_address_spaces(used, hosts)
    nets_used = parsed(used)
    expected = [reference_free(nets_used, block) for block in RFC1918_BLOCKS]
    assert [b.free for b in plan.blocks] == expected
    assert plan.prefix_len == reference_prefix(hosts)
    assert plan.recommended == reference_recommended(expected, plan.prefix_len)
    assert plan.hosts == hosts


@settings(max_examples=300, deadline=None)
@given(used_lists, hosts_values)
def test_plan_properties(used: list[IPv4Network | str], hosts: int) -> None:
    plan = plan_address_spaces(used, hosts)
    nets_used = parsed(used)
    assert [b.block for b in plan.blocks] == list(RFC1918_BLOCKS)
    for space in plan.blocks:
        # Free space is inside its block and clear of every used CIDR.
        for f in space.free:
            assert f.subnet_of(space.block)
            assert find_overlap(f, nets_used) is None
            assert not any(f.overlaps(u) for u in nets_used)
        # Maximal, sorted and disjoint: exactly what collapse_addresses makes of it.
        assert list(collapse_addresses(space.free)) == space.free
        # free + used (clipped) partitions the block: count the addresses.
        free_count = sum(f.num_addresses for f in space.free)
        used_count = sum(
            u.num_addresses for u in collapse_addresses(clipped(nets_used, space.block))
        )
        assert space.free_addresses == free_count
        assert free_count + used_count == space.block.num_addresses

    assert plan.prefix_len == prefix_for_hosts(hosts)
    rec = plan.recommended
    fitting = [f for b in plan.blocks for f in b.free if f.prefixlen <= plan.prefix_len]
    if rec is None:
        assert fitting == []
    else:
        assert rec.prefixlen == plan.prefix_len
        assert is_private_cidr(rec)
        assert find_overlap(rec, nets_used) is None
        (home,) = [f for b in plan.blocks for f in b.free if rec.subnet_of(f)]
        # Taken from a largest fitting free CIDR, at its very end.
        assert home.prefixlen == min(f.prefixlen for f in fitting)
        assert rec.broadcast_address == home.broadcast_address


@settings(max_examples=200, deadline=None)
@given(st.lists(used_items(), max_size=20))
def test_merge_intervals_properties(used: list[IPv4Network | str]) -> None:
    intervals = merge_intervals(used)
    for (_, end), (start, _) in pairwise(intervals):
        assert start > end + 1  # sorted, disjoint, and not even touching
    assert all(first <= last for first, last in intervals)
    collapsed = list(collapse_addresses(parsed(used)))
    # Same union: same size, and every input lies in one interval.
    assert sum(last - first + 1 for first, last in intervals) == sum(
        c.num_addresses for c in collapsed
    )
    for c in collapsed:
        first, last = int(c.network_address), int(c.broadcast_address)
        assert any(a <= first and last <= b for a, b in intervals)


def test_range_to_cidrs_edges() -> None:
    # Whole IPv4 space and single addresses, including both ends of it.
    assert addrspace._range_to_cidrs(0, 2**32 - 1) == [(0, 0)]
    assert addrspace._range_to_cidrs(0, 0) == [(0, 32)]
    assert addrspace._range_to_cidrs(2**32 - 1, 2**32 - 1) == [(2**32 - 1, 32)]
    assert addrspace._range_to_cidrs(1, 6) == [(1, 32), (2, 31), (4, 31), (6, 32)]
