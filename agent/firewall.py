"""The packet filter on a WireGuard interface: one nftables table, replaced atomically.

The ruleset text comes from :func:`cladnet.policy.nft_ruleset`; it deletes and
re-creates the table in one ``nft -f -`` transaction, so there is never a moment
with no filter or with half of one.
"""

from __future__ import annotations

import asyncio
import logging

from cladnet.policy import table_name

log = logging.getLogger("cladnet.agent.firewall")

NFT = "nft"


class FirewallError(Exception):
    """nft refused a ruleset or could not be run."""


async def _nft(*args: str, stdin: str | None = None) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            NFT,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise FirewallError(f"cannot run {NFT}: {exc}") from exc
    _, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    return proc.returncode or 0, err.decode(errors="replace").strip()


async def apply(ruleset: str) -> None:
    """Load ``ruleset`` (one transaction: all of it or none of it)."""
    code, err = await _nft("-f", "-", stdin=ruleset)
    if code != 0:
        raise FirewallError(f"nft -f failed: {err[:500]}")


async def remove(iface: str) -> None:
    """Remove the interface's table; absent already is fine."""
    code, err = await _nft("delete", "table", "inet", table_name(iface))
    if code != 0 and "No such file" not in err:
        raise FirewallError(f"nft delete table failed: {err[:500]}")
