"""Notice peers that stop answering while this host sends them data.

When this host's NAT gets another public address (a cloud re-assigns it; conntrack
gone), its packets leave from the new address, but the peers behind other NATs, and
the relays, still send to or expect the old one: they stop answering. The controller
learns the new address from this host's next heartbeat (every 10 s), so the pairs
would wait for it. A peer that answered before and now stays silent while this host
keeps sending it data is the hint: the agent sends its heartbeat at once (see
``NetworkAgent._check_direct_paths``), at most once per stall.

Keepalives alone (32 bytes each, their timers on both sides out of phase) do not count
as sending data: a quiet pair does not look stalled. :func:`update` is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cladnet.mesh import DeviceState

# More than a keepalive or two since the peer last answered: data that wants an answer.
MIN_SENT = 100


@dataclass(frozen=True)
class Track:
    """One peer's counters when it last answered."""

    rx: int  # received bytes then
    tx: int  # sent bytes then
    since: float  # monotonic time rx last grew
    stalled: bool = False  # reported already (once per stall)


def update(
    tracks: Mapping[str, Track], device: DeviceState, now: float, after: float
) -> tuple[dict[str, Track], list[str]]:
    """The new tracks and the keys of the peers that just stalled: a handshake done, no
    byte received for ``after`` seconds, and more than :data:`MIN_SENT` bytes sent
    since the last one."""
    out: dict[str, Track] = {}
    stalled: list[str] = []
    for key, peer in device.peers.items():
        was = tracks.get(key)
        if was is None or peer.rx_bytes != was.rx or peer.tx_bytes < was.tx:
            out[key] = Track(peer.rx_bytes, peer.tx_bytes, now)
            continue
        quiet = now - was.since >= after and peer.tx_bytes - was.tx > MIN_SENT
        if quiet and not was.stalled and peer.last_handshake is not None:
            stalled.append(key)
            was = Track(was.rx, was.tx, was.since, stalled=True)
        out[key] = was
    return out, stalled
