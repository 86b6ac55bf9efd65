"""agent.stalls: a peer that answered and then stays silent while this host sends it data
(its NAT moved, or the peer's did) is reported once; keepalives alone are not data."""

from __future__ import annotations

from agent import stalls
from cladnet.mesh import DeviceState, PeerState


def device(rx: int, tx: int, handshake: float | None = 1.0) -> DeviceState:
    peer = PeerState("k", ("10.0.0.2/32",), "198.51.100.2:51820", 2, handshake, rx, tx)
    return DeviceState(listen_port=51820, peers={"k": peer})


def test_data_sent_without_an_answer_is_reported_once() -> None:
    tracks, stalled = stalls.update({}, device(1000, 1000), now=0.0, after=2.5)
    assert stalled == []
    # Pings go out (tx grows by ping-sized packets), nothing comes back.
    tracks, stalled = stalls.update(tracks, device(1000, 1400), now=2.0, after=2.5)
    assert stalled == []  # not silent long enough yet
    tracks, stalled = stalls.update(tracks, device(1000, 1800), now=3.0, after=2.5)
    assert stalled == ["k"]
    tracks, stalled = stalls.update(tracks, device(1000, 2200), now=5.0, after=2.5)
    assert stalled == []  # once per stall
    # It answers again: a later stall is reported again.
    tracks, _ = stalls.update(tracks, device(1200, 2300), now=6.0, after=2.5)
    tracks, stalled = stalls.update(tracks, device(1200, 2700), now=9.0, after=2.5)
    assert stalled == ["k"]


def test_keepalives_and_quiet_or_new_peers_are_not_stalls() -> None:
    tracks, _ = stalls.update({}, device(1000, 1000), now=0.0, after=2.5)
    # Two keepalives (32 bytes each) out, none in yet: timers out of phase, not a stall.
    tracks, stalled = stalls.update(tracks, device(1000, 1064), now=10.0, after=2.5)
    assert stalled == []
    # No handshake ever: nothing answered before, nothing to stop.
    tracks, _ = stalls.update({}, device(0, 0, handshake=None), now=0.0, after=2.5)
    _, stalled = stalls.update(tracks, device(0, 5000, handshake=None), now=9.0, after=2.5)
    assert stalled == []
