"""``cladnet-relay``: forward already-encrypted WireGuard UDP between hosts that cannot
reach each other directly. It holds no overlay key and sees no plaintext.

Per relayed pair (A, B) two UDP ports: A sends its packets for B to port ``pa``, B its
packets for A to ``pb``. Each port "latches" the first WireGuard-shaped packet's source
(only from the host's public address as the controller saw it, when known) and
forwards to the other side's latched address from the other port, so each side sees
its peer at one stable relay address. Latched sources are the hosts' reflexive
addresses as seen from their WireGuard sockets: published as endpoint candidates.

The relay registers in etcd on a lease, reads the peers of every network, serves the
pairs :func:`cladnet.paths.relay_assignments` gives it, and writes the ports and the
observations into the peer records only when they change.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cladnet.roles import missing_extra

# An install without this role's extra: one line, not a traceback.
try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    from agent import relay_kernel
    from cladnet import logs, mesh, paths
    from controller import relays as store
    from controller.etcd import Etcd, parse_endpoints
    from controller.etcd_tls import EtcdTls
except ModuleNotFoundError as missing:
    missing_extra("cladnet-relay", "relay", missing)

log = logging.getLogger("cladnet.relay")

REGISTRY = CollectorRegistry()
PACKETS = Counter(
    "cladnet_relay_packets_total",
    "Datagrams received by pair ports, by outcome (forwarded, junk: not WireGuard-shaped, "
    "stranger: not the latched source, unlatched: the other side not yet known).",
    ["result"],
    registry=REGISTRY,
)
BYTES = Counter("cladnet_relay_forwarded_bytes_total", "Bytes forwarded.", registry=REGISTRY)
PAIRS = Gauge("cladnet_relay_pairs", "Pairs this relay serves.", registry=REGISTRY)
KERNEL_PACKETS = Counter(
    "cladnet_relay_kernel_packets_total",
    "Datagrams of latched pairs forwarded by the kernel (nftables), not by Python.",
    registry=REGISTRY,
)
KERNEL_PAIRS = Gauge(
    "cladnet_relay_kernel_pairs", "Pairs forwarded in the kernel.", registry=REGISTRY
)

# A latched source silent this long may be replaced (its NAT mapping was rebound).
RELATCH_AFTER = 10.0
# A freed port is given to another pair only after this long, if the range allows: the
# old pair's hosts send there until their agents hear of the change.
REUSE_AFTER = 60.0
# Between passes the set of live relays is read this often: a dead relay's pairs are
# taken over as soon as its lease is gone, not at the next pass.
RELAYS_POLL = 0.25


@dataclass
class Side:
    """One host of a pair: the port it sends to, where it was latched, what it may be."""

    host_id: str
    expected_ip: str | None  # the host's public address; None: latch from anywhere
    latched: tuple[str, int] | None = None
    last_seen: float = 0.0
    transport: asyncio.DatagramTransport | None = None


class _Port(asyncio.DatagramProtocol):
    def __init__(self, pair: PairForwarder, index: int) -> None:
        self.pair, self.index = pair, index

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.pair.received(self.index, data, (str(addr[0]), int(addr[1])))


@dataclass
class PairForwarder:
    """The two ports of one pair; ``on_latch(side, addr)`` reports a new source."""

    sides: tuple[Side, Side]
    on_latch: Any
    # Counted here per packet (cheap) and added to the Prometheus counters by ``flush``:
    # a labelled counter's lock per packet costs a relay forwarding in Python dearly.
    counts: dict[str, int] = field(default_factory=dict)
    forwarded_bytes: int = 0
    _flushed: dict[str, int] = field(default_factory=dict)
    _flushed_bytes: int = 0

    def _count(self, result: str) -> None:
        self.counts[result] = self.counts.get(result, 0) + 1

    def flush(self) -> None:
        """Add what was counted since the last flush to the Prometheus counters; one log
        line per flush for dropped junk or strangers (never one per packet)."""
        dropped = {}
        for result, n in self.counts.items():
            if n != self._flushed.get(result, 0):
                PACKETS.labels(result).inc(n - self._flushed.get(result, 0))
                if result in ("junk", "stranger"):
                    dropped[result] = n - self._flushed.get(result, 0)
                self._flushed[result] = n
        if dropped:
            hosts = [side.host_id for side in self.sides]
            log.warning("dropped packets", extra={"hosts": hosts, "dropped": dropped})
        BYTES.inc(self.forwarded_bytes - self._flushed_bytes)
        self._flushed_bytes = self.forwarded_bytes

    def received(self, index: int, data: bytes, addr: tuple[str, int]) -> None:
        """One datagram from ``addr`` on side ``index``'s port: latch, filter, forward."""
        if not paths.is_wireguard_packet(data):
            self._count("junk")
            return
        side, other = self.sides[index], self.sides[1 - index]
        now = time.monotonic()
        if side.latched != addr:
            if side.expected_ip is not None and addr[0] != side.expected_ip:
                self._count("stranger")
                return
            # A latched source still at the host's public address keeps the port until
            # silent; one at an address the host no longer has (its NAT's address moved)
            # gives way at once to the new one.
            held = side.latched
            moved = held is not None and side.expected_ip not in (None, held[0])
            if held is not None and now - side.last_seen < RELATCH_AFTER and not moved:
                self._count("stranger")
                return
            side.latched = addr
            self.on_latch(side, addr)
        side.last_seen = now
        if other.latched is None or other.transport is None:
            self._count("unlatched")
            return
        other.transport.sendto(data, other.latched)
        self._count("forwarded")
        self.forwarded_bytes += len(data)

    async def open(self, bind: str, ports: tuple[int, int]) -> None:
        """Bind both ports (``ports[i]`` is where side ``i`` sends)."""
        loop = asyncio.get_running_loop()
        for index, port in enumerate(ports):
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Port, self, index), local_addr=(bind, port)
            )
            self.sides[index].transport = transport

    def close(self) -> None:
        self.flush()
        for side in self.sides:
            if side.transport is not None:
                side.transport.close()


class RelayService:
    """Registration, pair assignment and observations, in one loop over etcd."""

    def __init__(
        self,
        etcd: Etcd,
        relay: paths.Relay,
        bind: str,
        interval: float,
        ttl: int,
        kernel: relay_kernel.KernelFlows | None = None,
    ) -> None:
        self.etcd, self.relay, self.bind = etcd, relay, bind
        self.interval, self.ttl, self.kernel = interval, ttl, kernel
        self.live_ids: set[str] = set()
        # (host id, peer id) → forwarder, its key: the two ports
        self.pairs: dict[tuple[int, int], PairForwarder] = {}
        self.seen: dict[str, dict[str, str]] = {}  # host id → observer → endpoint
        self.public: dict[str, Any] = {}  # host id → its public address when last read
        self.freed: dict[int, float] = {}  # port → when its pair was closed (monotonic)

    def _latched(self, side: Side, addr: tuple[str, int]) -> None:
        port = side.transport.get_extra_info("sockname")[1] if side.transport else 0
        endpoint = mesh.format_endpoint(*addr)
        log.info("latched", extra={"host": side.host_id, "port": port, "source": endpoint})
        self.seen.setdefault(side.host_id, {})[f"{self.relay.id}:{port}"] = endpoint

    def _mine(self, endpoint: str, live: list[paths.Relay]) -> tuple[bool, bool]:
        """(served by this relay, served by no live relay) for a relay endpoint."""
        ip, _, port = endpoint.rpartition(":")
        if not port.isdigit():
            return False, True
        owners = [r for r in live if r.address == ip and r.port_min <= int(port) <= r.port_max]
        return any(r.id == self.relay.id for r in owners), not owners

    async def step(self) -> None:
        """One pass: read relays and peers, open/close pairs, write what changed."""
        live = await store.live_relays(self.etcd)
        if not any(r.id == self.relay.id for r in live):
            live.append(self.relay)  # our lease just expired: keep serving, re-register
            await store.register(self.etcd, self.relay, self.ttl)
        hosts = await store.all_peers(self.etcd)
        by_id = {str(h["id"]): h for h in hosts}
        self._forget_moved(by_id)
        now = time.monotonic()
        self.freed = {p: t for p, t in self.freed.items() if now - t < REUSE_AFTER}
        wanted = paths.relay_assignments(hosts, self.relay, live, mesh.same_site, avoid=self.freed)
        await self._open_pairs(wanted, by_id)
        for pair in self.pairs.values():
            pair.flush()
        live_ids = self.live_ids = {r.id for r in live}
        for host_id, host in by_id.items():
            await self._write(host, wanted.get(host_id, {}), live, live_ids)

    def _forget_moved(self, by_id: dict[str, dict[str, Any]]) -> None:
        """Drop what was seen of a host at another address than its new public one: its
        NAT moved (the controller cleared its sightings; they must not be written back)."""
        for host_id, host in by_id.items():
            public = host.get("public_address")
            if self.public.get(host_id, public) != public and host_id in self.seen:
                self.seen[host_id] = {
                    observer: endpoint
                    for observer, endpoint in self.seen[host_id].items()
                    if mesh.split_endpoint(endpoint)[0] == public
                }
            self.public[host_id] = public

    async def _open_pairs(
        self, wanted: dict[str, dict[str, str]], by_id: dict[str, dict[str, Any]]
    ) -> None:
        keep: set[tuple[int, int]] = set()
        for a_id, peers in wanted.items():
            for b_id, ep_a in peers.items():
                if a_id > b_id:
                    continue
                ports = (int(ep_a.rpartition(":")[2]), int(wanted[b_id][a_id].rpartition(":")[2]))
                keep.add(ports)
                if ports in self.pairs:
                    # Follow a host whose public address moved (its NAT got another).
                    for side in self.pairs[ports].sides:
                        side.expected_ip = by_id[side.host_id].get("public_address")
                    continue
                sides = (
                    Side(a_id, by_id[a_id].get("public_address")),
                    Side(b_id, by_id[b_id].get("public_address")),
                )
                pair = PairForwarder(sides, self._latched)
                try:
                    await pair.open(self.bind, ports)
                except OSError as exc:
                    pair.close()
                    log.error(
                        "cannot open a pair's ports", extra={"ports": ports, "error": str(exc)}
                    )
                    continue
                self.pairs[ports] = pair
                log.info("pair opened", extra={"hosts": [a_id, b_id], "ports": ports})
        for ports in set(self.pairs) - keep:
            self.pairs.pop(ports).close()
            self.freed.update(dict.fromkeys(ports, time.monotonic()))
            log.info("pair closed", extra={"ports": ports})
        PAIRS.set(len(self.pairs))

    async def _write(
        self,
        host: dict[str, Any],
        assigned: dict[str, str],
        live: list[paths.Relay],
        live_ids: set[str],
    ) -> None:
        """Set this relay's entries and observations in one peer record, if they changed."""

        def change(record: dict[str, Any]) -> dict[str, Any]:
            # From the record as read in the compare-and-swap, never from an older
            # snapshot: another relay may have written its own entries meanwhile.
            relays = {
                peer: ep
                for peer, ep in (record.get("relays") or {}).items()
                if isinstance(ep, str) and peer not in assigned and not any(self._mine(ep, live))
            }
            relays.update(assigned)
            fields: dict[str, Any] = {"relays": relays}
            current = dict(record)
            for observer, endpoint in self.seen.get(str(record["id"]), {}).items():
                seen = paths.observe(current, observer, endpoint, time.time(), live_ids)
                if seen is not None:
                    current["reflexive"], current["mapping_varies"] = seen
                    fields["reflexive"], fields["mapping_varies"] = seen
            return fields

        if all(host.get(k) == v for k, v in change(host).items()):
            return
        await store.update_peer(self.etcd, str(host["network_id"]), str(host["id"]), change)

    async def sync_kernel(self) -> None:
        """Move latched pairs into the kernel and closed ones out; on an nft failure the
        table is removed and Python forwards everything from then on."""
        if self.kernel is None:
            return
        try:
            packets, nbytes = await self.kernel.sync(self.pairs)
        except (relay_kernel.NftError, OSError, ValueError) as exc:
            log.error("kernel forwarding failed; forwarding in Python", extra={"error": str(exc)})
            await self.kernel.stop()
            self.kernel = None
            KERNEL_PAIRS.set(0)
            return
        KERNEL_PACKETS.inc(packets)
        BYTES.inc(nbytes)
        KERNEL_PAIRS.set(len(self.kernel.flows))

    async def _keep_alive(self, lease: Any, stop: asyncio.Event) -> None:
        """Refresh the lease every third of its TTL, apart from the passes (a slow pass
        must not let it lapse: the other relays would take our pairs)."""
        while not stop.is_set():
            try:
                await lease.refresh()
            except Exception as exc:  # etcd away: step() re-registers once it answers
                log.warning("relay lease refresh failed", extra={"error": repr(exc)})
            try:
                await asyncio.wait_for(stop.wait(), self.ttl / 3)
            except TimeoutError:
                pass

    async def _wait(self, stop: asyncio.Event) -> None:
        """Until the next pass: ``interval``, or sooner when a relay came or went."""
        deadline = time.monotonic() + self.interval
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(stop.wait(), min(left, RELAYS_POLL))
                return
            except TimeoutError:
                pass
            try:
                if {r.id for r in await store.live_relays(self.etcd)} != self.live_ids:
                    return
            except Exception:  # etcd away: the pass will say so
                continue

    async def run(self, stop: asyncio.Event) -> None:
        """Register, then one pass per ``interval`` until ``stop``; the lease is kept alive."""
        if self.kernel is not None:
            try:
                await self.kernel.start()
            except (relay_kernel.NftError, OSError) as exc:
                log.error("no kernel forwarding", extra={"error": str(exc)})
                self.kernel = None
        await self.etcd.connect()
        lease = await store.register(self.etcd, self.relay, self.ttl)
        log.info("relay registered", extra={"id": self.relay.id, "address": self.relay.address})
        keeper = asyncio.create_task(self._keep_alive(lease, stop))
        try:
            while not stop.is_set():
                try:
                    await self.step()
                except Exception as exc:  # etcd away: keep forwarding what is open
                    log.warning("relay pass failed", extra={"error": repr(exc)})
                await self.sync_kernel()
                await self._wait(stop)
        finally:
            keeper.cancel()
            if self.kernel is not None:
                await self.kernel.stop()
            for pair in self.pairs.values():
                pair.close()
            try:  # our pairs move at once instead of after the lease's TTL
                await lease.revoke()
            except Exception as exc:
                log.warning("could not revoke the relay's lease", extra={"error": repr(exc)})
            await self.etcd.close()


def _ports(spec: str) -> tuple[int, int]:
    lo, _, hi = spec.partition("-")
    low, high = int(lo), int(hi or lo)
    if not 0 < low <= high < 65536:
        raise argparse.ArgumentTypeError(f"bad port range {spec!r}")
    return low, high


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cladnet-relay", description=__doc__.split("\n")[0])
    p.add_argument("--id", required=True, help="this relay's unique name")
    p.add_argument("--address", required=True, help="the address hosts send to (public)")
    p.add_argument("--bind", default="0.0.0.0", help="local address of the pair ports")
    p.add_argument("--ports", type=_ports, default=(40000, 40999), help="pair ports lo-hi")
    p.add_argument("--etcd", default="http://127.0.0.1:2379", help="etcd endpoints")
    p.add_argument("--etcd-user", default=None, help="password in CLADNET_ETCD_PASSWORD")
    p.add_argument("--etcd-ca", type=Path, default=None)
    p.add_argument("--etcd-cert", type=Path, default=None)
    p.add_argument("--etcd-key", type=Path, default=None)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between passes")
    p.add_argument(
        "--ttl",
        type=int,
        default=3,
        help="registration lease (seconds): a dead relay's pairs move after it",
    )
    p.add_argument(
        "--kernel",
        choices=("auto", "off"),
        default="auto",
        help="forward latched pairs in the kernel (nftables) when root, nft "
        "and net.ipv4.ip_forward=1 allow (auto), or always in Python",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cladnet-relay``."""
    args = parse_args(argv)
    logs.setup(args.log_level)
    tls = None
    if args.etcd_ca or "https://" in args.etcd:
        tls = EtcdTls(args.etcd_ca, args.etcd_cert, args.etcd_key)
    etcd = Etcd(
        parse_endpoints(args.etcd),
        user=args.etcd_user,
        password=os.environ.get("CLADNET_ETCD_PASSWORD"),
        tls=tls,
    )
    relay = paths.Relay(args.id, args.address, *args.ports)
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, registry=REGISTRY)
    kernel = None
    if args.kernel == "auto":
        why = relay_kernel.unavailable()
        if why is None:
            snat = None if args.bind == "0.0.0.0" else args.bind
            kernel = relay_kernel.KernelFlows(args.id, args.ports, snat)
        else:
            log.warning("forwarding in Python only", extra={"reason": why})
    service = RelayService(etcd, relay, args.bind, args.interval, args.ttl, kernel)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
