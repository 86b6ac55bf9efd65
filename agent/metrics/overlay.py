"""Overlay figures: per-peer handshake age and byte counters from the WireGuard
device, and round-trip time measured through the tunnel with a tiny UDP echo."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from typing import Any

from cladnet.mesh import DeviceState
from cladnet.metrics import Batch

log = logging.getLogger("cladnet.agent")

PROBE_PORT = 51900
_PING, _PONG = b"clping", b"clpong"
_ID = struct.Struct("!Q")


def peer_samples(
    batch: Batch, device: DeviceState, peers: dict[str, dict[str, Any]], now: float
) -> None:
    """Handshake age and counters per peer, labelled with the peer's host name."""
    by_key = {p.get("public_key"): p for p in peers.values()}
    for state in device.peers.values():
        peer = by_key.get(state.public_key)
        if peer is None:
            continue
        name = str(peer.get("name", peer.get("id", "?")))
        if state.last_handshake:
            batch.add(
                "wireguard_peer_handshake_age_seconds",
                max(0.0, now - state.last_handshake),
                peer=name,
            )
        batch.add("wireguard_peer_receive_bytes_total", state.rx_bytes, peer=name)
        batch.add("wireguard_peer_transmit_bytes_total", state.tx_bytes, peer=name)


class _EchoProtocol(asyncio.DatagramProtocol):
    def __init__(self, prober: LatencyProber) -> None:
        self.prober = prober
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) != len(_PING) + _ID.size or self.transport is None:
            self.prober.bad_packets += 1
            return
        head, body = data[: len(_PING)], data[len(_PING) :]
        if head == _PING:
            self.transport.sendto(_PONG + body, addr)
        elif head == _PONG:
            future = self.prober.pending.pop(_ID.unpack(body)[0], None)
            if future is not None and not future.done():
                future.set_result(time.monotonic())
        else:
            self.prober.bad_packets += 1


class LatencyProber:
    """Answers echo probes on this host's overlay IP and measures RTT to peers.

    Bound to the overlay address only, so it is reachable through the tunnel and
    nowhere else.
    """

    def __init__(self, overlay_ip: str, port: int = PROBE_PORT) -> None:
        self.overlay_ip, self.port = overlay_ip, port
        self.pending: dict[int, asyncio.Future[float]] = {}
        self.bad_packets = 0
        self._proto: _EchoProtocol | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(
            lambda: _EchoProtocol(self), local_addr=(self.overlay_ip, self.port)
        )
        self._proto = proto

    @property
    def started(self) -> bool:
        return self._proto is not None

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

    async def rtt_ms(self, address: str, wait: float = 1.0) -> float | None:
        """Round-trip time to ``address`` in milliseconds, or None if no answer in time."""
        if self._proto is None or self._proto.transport is None:
            return None
        probe_id = int.from_bytes(os.urandom(8), "big")
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.pending[probe_id] = future
        started = time.monotonic()
        self._proto.transport.sendto(_PING + _ID.pack(probe_id), (address, self.port))
        try:
            answered = await asyncio.wait_for(future, wait)
        except TimeoutError:
            return None
        finally:
            self.pending.pop(probe_id, None)
        return (answered - started) * 1000.0

    async def probe(self, peers: dict[str, str], wait: float = 1.0) -> dict[str, float | None]:
        """RTT to every peer at once: ``{name: overlay_ip}`` → ``{name: ms or None}``."""
        names = list(peers)
        results = await asyncio.gather(*(self.rtt_ms(peers[n], wait) for n in names))
        return dict(zip(names, results, strict=True))
