"""The agent's DNS server: its network's names on its overlay IP, UDP and TCP port 53.

Answers come from the zone the daemon builds out of the peers it already has
(``update`` after every applied change), so a query never reaches the controller.
Work per query is bounded: one packet of at most ``cladnet.dns.MAX_QUERY`` bytes,
one question; TCP connections are capped in number, idle time and queries each.

Only sources inside the network's CIDR are answered (the host itself and its peers,
whose addresses WireGuard authenticates): a packet sent to the overlay IP from the
underlay with a forged source gets nothing back, so the server is no reflector. Each
source is rate-limited, so one peer cannot keep the agent's event loop busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
import time
from collections.abc import Callable
from typing import cast

from cladnet import dns
from cladnet.ratelimit import RateLimiter

log = logging.getLogger("cladnet.agent.dns")

PORT = 53
TCP_IDLE = 10.0
TCP_MAX_CONNECTIONS = 64
TCP_MAX_QUERIES = 100
JUNK_LOG_EVERY = 10.0  # seconds: junk is counted always, logged at most this often
# Per source: the host's own resolver caches, so this is far above honest use.
RATE, BURST = 500.0, 1000.0


class DnsServer:
    """Serves one :class:`cladnet.dns.Zone`; counters for the agent's metrics."""

    def __init__(self, zone: dns.Zone, clock: Callable[[], float] = time.monotonic) -> None:
        self.zone = zone
        self._network = ipaddress.ip_network(zone.cidr)
        self.clock = clock
        self.queries = 0
        self.junk = 0
        self.limited = 0
        self.limiter = RateLimiter(RATE, BURST, max_keys=4096)
        self.address: str | None = None
        self._junk_logged = 0.0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections = 0

    def update(self, zone: dns.Zone) -> None:
        """Answer from ``zone`` from now on."""
        self.zone = zone
        self._network = ipaddress.ip_network(zone.cidr)

    def handle(self, packet: bytes, source: str) -> bytes | None:
        """The reply to one packet from ``source`` (an IP), or None: dropped and counted
        (junk, a source outside the network, or over its rate), logged now and then."""
        now = self.clock()
        try:
            if not self._inside(source):
                raise dns.Junk("source outside the network")
            if self.limiter.hit(source, now):
                self.limited += 1
                return None
            reply, _ = dns.answer(packet, self.zone)
        except dns.Junk as exc:
            self._junk(source, str(exc))
            return None
        self.queries += 1
        return reply

    def _junk(self, source: str, reason: str) -> None:
        """Count a dropped packet; log at most one line per ``JUNK_LOG_EVERY``."""
        self.junk += 1
        now = self.clock()
        if now - self._junk_logged >= JUNK_LOG_EVERY:
            self._junk_logged = now
            log.warning(
                "dropping junk DNS packets",
                extra={"from": source, "reason": reason, "junk_total": self.junk},
            )

    def _inside(self, source: str) -> bool:
        try:
            return ipaddress.ip_address(source) in self._network
        except ValueError:
            return False

    async def start(self, address: str, port: int = PORT) -> None:
        """Listen on ``address`` (the overlay IP) only, UDP and TCP."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(address, port)
        )
        self._udp = transport
        try:
            self._tcp = await asyncio.start_server(self._serve_tcp, address, port)
        except OSError:
            transport.close()
            self._udp = None
            raise
        self.address = address
        log.info("DNS server listening", extra={"address": address, "port": port})

    async def close(self) -> None:
        """Stop listening (open TCP connections end at their next read)."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2)
            self._tcp = None
        self.address = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername")[0])
        if self._connections >= TCP_MAX_CONNECTIONS:
            writer.close()
            return
        self._connections += 1
        try:
            for _ in range(TCP_MAX_QUERIES):
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                (length,) = struct.unpack("!H", head)
                if length > dns.MAX_QUERY:
                    self._junk(peer, f"{length} bytes over TCP")
                    return
                packet = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE)
                reply = self.handle(packet, peer)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), TCP_IDLE)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections -= 1
            writer.close()

    def gauges(self) -> dict[str, float]:
        """Metric samples for the agent's batch."""
        return {
            "agent_dns_queries_total": float(self.queries),
            "agent_dns_junk_total": float(self.junk),
            "agent_dns_rate_limited_total": float(self.limited),
        }


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.handle(data, str(addr[0]))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP unreachable for a reply
        log.debug("DNS socket error", extra={"error": repr(exc)})
