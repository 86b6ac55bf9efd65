"""Start WireGuard handshakes with newly added peers instead of waiting for traffic.

WireGuard initiates a handshake only when it has a packet for a peer (or a keepalive
is turned on). When two hosts learn of each other a moment apart, the first one's
initiation reaches a host that does not know it yet and is dropped; WireGuard retries
only after REKEY_TIMEOUT (5 s), so a new pair waits that long for its first packet.

Here the agent sends one small UDP datagram to a new peer's overlay address (port 9,
discard) through the WireGuard interface, which makes WireGuard initiate at once:

- the host whose public key sorts lower sends it as soon as the peer is added; the
  other host waits ``retry`` seconds (as ``cladnet.mesh.diff`` defers keepalives), so
  two hosts that learn of each other at the same moment do not both initiate:
  crossed initiations leave both ends as responders until the 5-s retry;
- ``retry`` seconds after the add, the other host checks: a peer still without a
  handshake is added anew (:func:`anew`) and sent a datagram. The host that learned of
  the pair last completes it this way. Added anew, because its side may have initiated
  already (its own traffic, a keepalive) just as the lower key's trigger went out:
  initiations that cross leave both ends waiting, and WireGuard holds back any new
  initiation for 5 s after the last; a new peer in WireGuard has none to hold back,
  and a peer without a handshake has no session to lose;
- the lower key's host checks the same way after ``2 * retry``: its own first
  initiation may have been lost (the peer's address just changed, say on a resume)
  while the other side, which already held this host, has nothing new to start. A
  second later than the other side's check, so the two do not cross again.

The decisions (:func:`plan`, :func:`silent`, :func:`anew`) are pure;
:class:`HandshakeStarter` does the I/O: the datagrams, one device read per retry round
and the re-adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.netlink import in_netns
from agent.wireguard.backend import WireGuardError
from cladnet.mesh import DeviceChanges, DeviceState, PeerConfig
from cladnet.tasks import cancel_and_wait

log = logging.getLogger("cladnet.agent")

DISCARD_PORT = 9  # RFC 863: nothing answers; an ICMP error back at most
PAYLOAD = b"cladnet: start handshake"


@dataclass(frozen=True)
class Plan:
    """Whom to trigger now and whom to check after the retry delay (key → overlay IP)."""

    now: dict[str, str]
    check: dict[str, str]


def target(peer: PeerConfig) -> str | None:
    """The overlay address a trigger goes to: the peer's first host route (/32, /128),
    or None when there is none or no endpoint (WireGuard could not initiate)."""
    if peer.endpoint is None:
        return None
    for allowed in peer.allowed_ips:
        with contextlib.suppress(ValueError):
            network = ipaddress.ip_network(allowed, strict=False)
            if network.num_addresses == 1:
                return str(network.network_address)
    return None


def plan(added: Iterable[PeerConfig], own_key: str | None) -> Plan:
    """Of the peers just added: those this host triggers now (its key sorts lower, or
    it does not know its key) and all of them, to check after the retry delay."""
    now: dict[str, str] = {}
    check: dict[str, str] = {}
    for peer in added:
        address = target(peer)
        if address is None:
            continue
        check[peer.public_key] = address
        if own_key is None or own_key < peer.public_key:
            now[peer.public_key] = address
    return Plan(now=now, check=check)


def silent(check: Mapping[str, str], device: DeviceState) -> dict[str, str]:
    """The peers of ``check`` the device holds without a handshake yet (a removed
    peer is left alone)."""
    return {
        key: address
        for key, address in check.items()
        if key in device.peers and device.peers[key].last_handshake is None
    }


def anew(keys: Iterable[str], device: DeviceState) -> DeviceChanges:
    """Each of ``keys`` the device holds, removed and added again as it is (endpoint,
    allowed IPs, keepalive): WireGuard forgets its pending initiation."""
    held = [device.peers[k] for k in sorted(keys) if k in device.peers]
    return DeviceChanges(
        peers_to_remove=tuple(p.public_key for p in held),
        peers_to_add=tuple(
            PeerConfig(p.public_key, p.allowed_ips, p.endpoint, p.keepalive) for p in held
        ),
    )


def send(iface: str, addresses: Iterable[str], netns: str | None = None) -> int:
    """One datagram to each address through ``iface`` only (never along another route);
    how many were sent. Raises ``OSError`` when ``iface`` does not exist."""
    by_family: dict[socket.AddressFamily, list[str]] = {}
    for address in addresses:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        by_family.setdefault(family, []).append(address)
    sent = 0
    # Even with nothing to send: binding the socket checks that ``iface`` exists.
    for family, group in (by_family or {socket.AF_INET: []}).items():
        with _socket(family, iface, netns) as sock:
            for address in group:
                try:
                    sock.sendto(PAYLOAD, (address, DISCARD_PORT))
                    sent += 1
                except OSError as exc:  # one unroutable peer must not stop the others
                    log.debug("no handshake trigger", extra={"to": address, "error": str(exc)})
    return sent


def _socket(family: socket.AddressFamily, iface: str, netns: str | None) -> socket.socket:
    """A non-blocking UDP socket bound to ``iface`` (in ``netns`` when given)."""

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    return in_netns(netns, make) if netns else make()


class HandshakeStarter:
    """Triggers handshakes with the peers an apply added, and starts again, added anew,
    those still silent ``retry`` (or ``2 * retry``) seconds later (see the module
    docstring).

    ``device`` reads the device (one read per retry round, for all peers due);
    ``apply`` changes it (the re-adds; none without it), under ``lock``: the caller's
    own applies take it too, so a peer removed meanwhile is not added back.
    """

    def __init__(
        self,
        iface: str,
        device: Callable[[], Awaitable[DeviceState]],
        retry: float,
        netns: str | None = None,
        apply: Callable[[DeviceChanges], Awaitable[None]] | None = None,
        lock: asyncio.Lock | None = None,
    ) -> None:
        self.iface, self.device, self.retry, self.netns = iface, device, retry, netns
        self.apply, self.lock = apply, lock or asyncio.Lock()
        self._due: dict[str, tuple[float, str]] = {}  # key → (monotonic due time, address)
        self._task: asyncio.Task[None] | None = None
        self.sent = 0  # datagrams sent, for tests and logs
        self.readded = 0  # peers added anew at a retry

    def peers_added(self, added: Iterable[PeerConfig], own_key: str | None) -> None:
        """Trigger now whom this host starts; check the others after ``retry`` s and
        those after ``2 * retry``."""
        chosen = plan(added, own_key)
        if not chosen.check:
            return
        try:
            self.sent += send(self.iface, chosen.now.values(), self.netns)
        except OSError as exc:  # no such interface (yet): nothing to trigger through
            log.debug("no handshake triggers", extra={"iface": self.iface, "error": str(exc)})
            return
        now = time.monotonic()
        for key, address in chosen.check.items():
            self._due[key] = (now + self.retry * (2 if key in chosen.now else 1), address)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._retry_loop(), name=f"handshakes-{self.iface}")

    async def _retry_loop(self) -> None:
        while self._due:
            soonest = min(due for due, _ in self._due.values())
            await asyncio.sleep(max(0.0, soonest - time.monotonic()))
            now = time.monotonic()
            ready = {k: address for k, (due, address) in self._due.items() if due <= now}
            for key in ready:
                del self._due[key]
            try:
                async with self.lock:
                    device = await self.device()
                    quiet = silent(ready, device)
                    if quiet and self.apply is not None:
                        await self.apply(anew(quiet, device))
                        self.readded += len(quiet)
                    if quiet:
                        self.sent += send(self.iface, quiet.values(), self.netns)
                if quiet:
                    log.debug("handshakes started again", extra={"peers": len(quiet)})
            except (WireGuardError, OSError) as exc:  # the peers' own retries remain
                log.debug("handshake retry skipped", extra={"error": str(exc)})

    async def close(self) -> None:
        """Stop the pending retry round."""
        await cancel_and_wait([self._task])
