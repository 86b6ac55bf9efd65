"""How a controller picks a new host's overlay address: from a hint of the addresses in
use, in a block of its own, never handing out an address one of its joins is still
writing (the etcd transaction's compare is what guarantees uniqueness; these are pure
checks of the hint, without etcd)."""

from __future__ import annotations

import ipaddress
import random
from types import SimpleNamespace
from typing import Any

from controller import keyspace as ks
from controller.store.joins import BLOCK, AddressHints, pick_in_block

NET = ipaddress.IPv4Network("10.40.0.0/22")  # 1,022 addresses: 16 blocks
FIRST = int(NET.network_address) + 1


def test_picks_stay_in_one_block_until_it_is_nearly_full() -> None:
    rng = random.Random(7)
    used: set[int] = set()
    block = None
    blocks = []
    for _ in range(BLOCK // 2):
        address, block = pick_in_block(NET, used, block, rng)
        assert address is not None and int(address) not in used
        used.add(int(address))
        blocks.append(block)
    assert len(set(blocks)) == 1
    assert all((a - FIRST) // BLOCK == blocks[0] for a in used)


def test_a_full_block_is_left_and_a_full_network_gives_none() -> None:
    rng = random.Random(3)
    used = set(range(FIRST, FIRST + BLOCK))  # block 0 taken
    address, block = pick_in_block(NET, used, 0, rng)
    assert address is not None and int(address) not in used and block != 0
    everything = set(range(FIRST, FIRST + 1022))
    free = FIRST + 500
    assert pick_in_block(NET, everything - {free}, 0, rng)[0] == ipaddress.IPv4Address(free)
    assert pick_in_block(NET, everything, 0, rng) == (None, None)


def test_a_tiny_network_gives_each_address_once() -> None:
    tiny = ipaddress.IPv4Network("10.41.0.0/29")  # 6 addresses, less than a block
    used: set[int] = set()
    block = None
    for _ in range(6):
        address, block = pick_in_block(tiny, used, block)
        assert address is not None and address in tiny and int(address) not in used
        used.add(int(address))
    assert pick_in_block(tiny, used, block)[0] is None


class ListedIps:
    """Stands in for etcd: the network's address keys it lists (none were written)."""

    def __init__(self) -> None:
        self.reads = 0

    async def get_prefix(self, prefix: bytes, keys_only: bool = False) -> list[Any]:
        self.reads += 1
        return [SimpleNamespace(key=ks.ip("n-1", "10.41.0.1"))]


async def test_a_read_of_the_addresses_keeps_the_picks_still_being_written() -> None:
    tiny = ipaddress.IPv4Network("10.41.0.0/29")
    etcd = ListedIps()
    hints = AddressHints(etcd)  # type: ignore[arg-type]
    picks = [await hints.pick("n-1", tiny) for _ in range(5)]
    assert etcd.reads == 1 and None not in picks
    assert ipaddress.IPv4Address("10.41.0.1") not in picks  # listed as taken
    # Read again while all five joins are still writing: none is handed out twice.
    assert await hints.pick("n-1", tiny, fresh=True) is None
    assert etcd.reads == 2
    # One join lost its race for a reason other than its address; another's address
    # was taken by another controller: only the first is free again.
    assert picks[0] is not None and picks[1] is not None
    hints.give_back("n-1", picks[0])
    hints.keep("n-1", picks[1], conflict=True)
    assert await hints.pick("n-1", tiny) == picks[0]
