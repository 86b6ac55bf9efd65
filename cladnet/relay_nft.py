"""The nftables ruleset that forwards a relay's latched pairs in the kernel (pure).

Once both sides of a pair are latched, a packet from side A (``a_ip:a_port`` →
``relay:pa``) is DNATed to B's latched address and SNATed to the relay's ``pb``: exactly
what the Python forwarder does, but in the kernel. One conntrack entry carries both
directions (B's packets to ``pb`` are its reply tuple). Per flow:

- ``raw_in`` (before conntrack): a WireGuard-shaped packet (same type and size checks
  as :func:`cladnet.paths.is_wireguard_packet`) from a latched source gets the flow's
  conntrack zone and is counted; anything else to the pair ports is ``notrack`` and
  goes to the Python sockets as before (junk and strangers are counted there).
- ``pre``/``post``: the DNAT and SNAT of the flow's first packet.

Each flow gets a fresh zone when it is installed, so a conntrack entry left from an
earlier latch (another source, a closed pair) is never matched again: entries cannot be
deleted without the conntrack tool, but a zone nobody sets is dead. Reply tuples
contain the pair's own relay port, so two live pairs never collide in one zone anyway.
Python's own sends from pair ports are ``notrack`` too: no entry is left behind that a
kernel flow would have to replace.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# WireGuard message type (first 4 payload bytes, big-endian) and UDP length (8 + size).
_HANDSHAKE = ". udp length { 0x01000000 . 156, 0x02000000 . 100, 0x03000000 . 72 }"
_DATA = "0x04000000 udp length >= 40"


@dataclass(frozen=True)
class Flow:
    """One latched pair: ``ports[i]`` is where side ``i`` sends, ``sources[i]`` the
    side's latched ``(ip, port)``, ``zone`` its conntrack zone (1-65535)."""

    ports: tuple[int, int]
    sources: tuple[tuple[str, int], tuple[str, int]]
    zone: int


def table_name(relay_id: str) -> str:
    """``cl-relay-<id>``: one table per relay, found again after a crash by its id."""
    return "cl-relay-" + re.sub(r"[^A-Za-z0-9_]", "_", relay_id)[:40]


def ruleset(
    table: str, port_range: tuple[int, int], flows: Iterable[Flow], snat_ip: str | None
) -> str:
    """The whole table for ``nft -f -`` (create, delete, define: one transaction).

    ``snat_ip``: the source address of forwarded packets; None: the outgoing
    interface's own (``masquerade``), right for a relay bound to 0.0.0.0.
    """
    lo, hi = port_range
    raw: list[str] = []
    pre: list[str] = []
    post: list[str] = []
    for f in sorted(flows, key=lambda f: f.ports):
        for i in (0, 1):
            (ip, port), (oip, oport) = f.sources[i], f.sources[1 - i]
            src = f"ip saddr {ip} udp sport {port}"
            tag = f'ct zone set {f.zone} accept comment "{f.ports[0]}-{i}"'
            for shape in (_HANDSHAKE, _DATA):
                raw.append(f"{src} udp dport {f.ports[i]} @th,64,32 {shape} counter {tag}")
            pre.append(f"ct zone {f.zone} {src} udp dport {f.ports[i]} dnat to {oip}:{oport}")
            to = f"snat to {snat_ip}:" if snat_ip else "masquerade to :"
            post.append(f"ct zone {f.zone} {src} {to}{f.ports[1 - i]}")
    raw.append(f"udp dport {lo}-{hi} notrack")

    def chain(name: str, hook: str, priority: str, rules: list[str]) -> str:
        body = "".join(f"    {r}\n" for r in rules)
        return (
            f"  chain {name} {{\n    type {hook} priority {priority}; policy accept;\n{body}  }}\n"
        )

    return (
        f"table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n"
        + chain("raw_in", "filter hook prerouting", "raw", raw)
        + chain("raw_out", "filter hook output", "raw", [f"udp sport {lo}-{hi} notrack"])
        + chain("pre", "nat hook prerouting", "dstnat", pre)
        + chain("post", "nat hook postrouting", "srcnat", post)
        + "}\n"
    )


def counters(listing: Mapping[str, Any]) -> dict[tuple[int, int], tuple[int, int]]:
    """``nft -j list table`` → (first pair port, side) → (packets, bytes) the kernel
    took from that side (summed over the side's rules)."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for item in listing.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not rule or rule.get("chain") != "raw_in" or "comment" not in rule:
            continue
        port, _, side = str(rule["comment"]).partition("-")
        for expr in rule.get("expr", []):
            if "counter" in expr:
                key = (int(port), int(side))
                packets, nbytes = out.get(key, (0, 0))
                out[key] = (packets + expr["counter"]["packets"], nbytes + expr["counter"]["bytes"])
    return out
