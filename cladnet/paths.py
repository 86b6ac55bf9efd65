"""How two hosts reach each other: private, direct (public or reflexive) or relayed.

Pure functions on the controller's host JSON (plain dicts), shared by the agent's
plan and the relays, so both sides agree on which pairs need a relay:

- :func:`is_wireguard_packet`: the relay's filter (shape only, it holds no keys);
- :func:`observe`: a relay's sighting of a host's WireGuard socket → its reflexive
  candidates and ``mapping_varies``;
- :func:`direct_endpoint`, :func:`direct_possible`: whether a pair can go direct;
- :func:`choose_relay`, :func:`relay_assignments`: which relay serves a pair, on which ports.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Host = Mapping[str, Any]

# WireGuard message sizes (whitepaper §5.4): initiation, response, cookie reply; transport
# data is a 16-byte header + ciphertext + a 16-byte tag (padded to 16 bytes, but never
# past the MTU, so a full 1420-byte packet is 1452: no multiple-of-16 check).
_FIXED_SIZES = {1: 148, 2: 92, 3: 64}
_MAX_DATA = 65535

# A host's reflexive address counts as endpoint-independent once this many observers
# (relay ports, i.e. distinct destinations) saw the same ip:port.
MIN_AGREEING_OBSERVERS = 2


def is_wireguard_packet(data: bytes) -> bool:
    """Whether ``data`` has the shape of a WireGuard message (type 1 to 4, 3 zero bytes, size).

    Shape only: a relay forwards ciphertext it cannot read; this keeps it from being an
    open UDP reflector for arbitrary payloads.
    """
    if len(data) < 32 or data[1:4] != b"\0\0\0":
        return False
    kind = data[0]
    if kind in _FIXED_SIZES:
        return len(data) == _FIXED_SIZES[kind]
    return kind == 4 and len(data) <= _MAX_DATA


# --- reflexive candidates ------------------------------------------------------------------


def _candidates(host: Host) -> list[dict[str, Any]]:
    """The host's well-formed reflexive candidates (hostile or broken entries dropped)."""
    out: list[dict[str, Any]] = []
    given = host.get("reflexive")
    for c in given if isinstance(given, list) else ():
        if (
            isinstance(c, Mapping)
            and isinstance(c.get("endpoint"), str)
            and isinstance(c.get("observer"), str)
            and isinstance(c.get("observed_at"), int | float)
        ):
            try:
                ip, port = c["endpoint"].rsplit(":", 1)
                ipaddress.ip_address(ip.strip("[]"))
                if not 0 < int(port) < 65536:
                    continue
            except ValueError:
                continue
            out.append(dict(c))
    return out


def observe(
    host: Host, observer: str, endpoint: str, now: float, live: Iterable[str] | None = None
) -> tuple[list[dict[str, Any]], bool] | None:
    """The host's new ``(reflexive, mapping_varies)`` after ``observer`` saw ``endpoint``.

    ``observer`` is ``<relay id>:<relay port>``: each relay port is a distinct
    destination for the host's NAT. ``None`` when nothing changes: the record is desired
    state, written only when a mapping changes, never to refresh an age. With ``live``
    (the relay ids alive), other dead relays' candidates are dropped. ``mapping_varies``
    is set when two observers see different addresses: the host's NAT maps per
    destination ("symmetric") and nobody can reach it directly.
    """
    alive = set(live) if live is not None else None
    old = _candidates(host)
    kept = [
        c
        for c in old
        if c["observer"] != observer
        and (alive is None or c["observer"].rpartition(":")[0] in alive)
    ]
    # Seen at the host's current public address while older sightings are at another:
    # its NAT's address moved, and those describe a mapping that no longer exists (kept,
    # they would make the host look symmetric).
    public = host.get("public_address")
    if public and _ip(endpoint) == public:
        kept = [c for c in kept if _ip(c["endpoint"]) == public]
    before = {c["observer"]: c["endpoint"] for c in old}
    after = {**{c["observer"]: c["endpoint"] for c in kept}, observer: endpoint}
    varies = len(set(after.values())) > 1
    if before == after and bool(host.get("mapping_varies")) == varies:
        return None
    fresh = {"endpoint": endpoint, "observer": observer, "observed_at": now}
    return sorted([*kept, fresh], key=lambda c: c["observer"]), varies


def _ip(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[0].strip("[]")


def stable_reflexive(host: Host) -> str | None:
    """The host's reflexive ``ip:port`` when enough observers agree on it, else ``None``."""
    if host.get("mapping_varies"):
        return None
    cands = _candidates(host)
    endpoints = {c["endpoint"] for c in cands}
    if len(endpoints) == 1 and len({c["observer"] for c in cands}) >= MIN_AGREEING_OBSERVERS:
        return endpoints.pop()
    return None


# --- direct or relayed ----------------------------------------------------------------------


def is_public(host: Host) -> bool:
    """Whether the host holds the public address the controller sees (no NAT in between)."""
    public = host.get("public_address")
    if not public:
        return False
    for address in host.get("addresses") or ():
        try:
            if str(ipaddress.ip_interface(address).ip) == public:
                return True
        except ValueError:
            continue
    return False


def direct_endpoint(host: Host) -> str | None:
    """Where anyone can send to ``host`` directly: its public address, else a stable
    reflexive one; ``None`` when nobody can (behind NAT, mapping unknown or varying)."""
    if is_public(host):
        port = int(host.get("listen_port") or 51820)
        ip = ipaddress.ip_address(host["public_address"])
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return stable_reflexive(host)


def direct_possible(a: Host, b: Host) -> bool:
    """Whether ``a`` and ``b`` can talk without a relay (other sites; symmetric in a, b).

    One side public: the other opens its NAT by sending first. Both with a stable
    reflexive address (endpoint-independent mapping): both send at once, which opens
    both NATs' filters. Anything else (a varying or unknown mapping) needs a relay.
    Conservative: an unknown mapping is not tried direct, since nothing here probes yet.
    Two hosts behind one NAT (the same public address) that are not on one site would
    meet at their own NAT's public address, which needs hairpinning; most NATs do not
    (cloud NAT gateways, Linux masquerade without a hairpin rule), so they take a relay.
    """
    if is_public(a) or is_public(b):
        return True
    if behind_one_nat(a, b):
        return False
    return stable_reflexive(a) is not None and stable_reflexive(b) is not None


def behind_one_nat(a: Host, b: Host) -> bool:
    """Whether the controller saw ``a`` and ``b`` come from one public address."""
    public = a.get("public_address")
    return bool(public) and public == b.get("public_address")


# --- relays ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relay:
    """A live relay as registered: its id, the address hosts send to, its port range."""

    id: str
    address: str
    port_min: int
    port_max: int


def pair_key(a_id: str, b_id: str) -> tuple[str, str]:
    """The pair's canonical order (lower host id first)."""
    return (a_id, b_id) if a_id < b_id else (b_id, a_id)


def choose_relay(a_id: str, b_id: str, relays: Sequence[Relay]) -> Relay | None:
    """The relay for a pair: highest rendezvous hash, so pairs spread over relays and
    only the pairs of a relay that dies move (to the next in their own order)."""
    key = "|".join(pair_key(a_id, b_id))

    def score(r: Relay) -> bytes:
        return hashlib.sha256(f"{key}|{r.id}".encode()).digest()

    return max(relays, key=score, default=None)


def relay_assignments(
    hosts: Sequence[Host],
    relay: Relay,
    relays: Sequence[Relay],
    same_site: Callable[[Host, Host], bool],
    avoid: Iterable[int] = (),
) -> dict[str, dict[str, str]]:
    """Per host id, the peers this relay serves for it and the ``ip:port`` to send to.

    A pair is served when it is on different sites, neither side is public (pairs that
    go direct over reflexive addresses keep the relay as their fallback), and ``relay``
    is its rendezvous choice. Ports already assigned by this relay (found in the hosts'
    ``relays`` fields) are kept; new pairs take the lowest free two ports, those in
    ``avoid`` (freed a moment ago: the old pair's hosts may still send there) last.
    Pairs beyond the port range are left out (they keep whatever path they had).
    """
    mine = f"{relay.address}:"
    used: set[int] = set()
    current: dict[tuple[str, str], int] = {}
    for h in hosts:
        for peer_id, ep in _relays_of(h).items():
            port = ep.rsplit(":", 1)[1] if isinstance(ep, str) and ep.startswith(mine) else ""
            if port.isdigit():
                current[(str(h["id"]), str(peer_id))] = int(port)
    wanted: list[tuple[Host, Host]] = []
    ordered = sorted(hosts, key=lambda h: str(h["id"]))
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if a.get("network_id") != b.get("network_id") or same_site(a, b):
                continue
            if is_public(a) or is_public(b):
                continue  # direct, and nothing to fall back to: the public side waits
            # Pairs that go direct over reflexive addresses keep a relay on standby: the
            # agents fall back to it when no handshake comes over the direct path.
            chosen = choose_relay(str(a["id"]), str(b["id"]), relays)
            if chosen is not None and chosen.id == relay.id:
                wanted.append((a, b))
    out: dict[str, dict[str, str]] = {str(h["id"]): {} for h in hosts}
    pending = []
    for a, b in wanted:
        pa, pb = current.get((a["id"], b["id"])), current.get((b["id"], a["id"]))
        if pa is not None and pb is not None and relay.port_min <= min(pa, pb):
            if max(pa, pb) <= relay.port_max and pa not in used and pb not in used:
                used |= {pa, pb}
                out[a["id"]][b["id"]], out[b["id"]][a["id"]] = f"{mine}{pa}", f"{mine}{pb}"
                continue
        pending.append((a, b))
    later = set(avoid)
    ports = range(relay.port_min, relay.port_max + 1)
    free = iter(
        [p for p in ports if p not in used and p not in later]
        + [p for p in ports if p not in used and p in later]
    )
    for a, b in pending:
        pa, pb = next(free, None), next(free, None)
        if pa is None or pb is None:
            break
        out[a["id"]][b["id"]], out[b["id"]][a["id"]] = f"{mine}{pa}", f"{mine}{pb}"
    return out


def _relays_of(host: Host) -> Mapping[str, Any]:
    given = host.get("relays")
    return given if isinstance(given, Mapping) else {}


def served_by_relays(host: Host) -> bool:
    """Whether relays serve any pair of ``host`` (so relays serve its network)."""
    return any(relayed_endpoint(host, {"id": peer}) for peer in _relays_of(host))


def relayed_endpoint(me: Host, peer: Host) -> str | None:
    """The relay port this host sends the peer's packets to, if a relay serves the pair."""
    ep = _relays_of(me).get(str(peer.get("id")))
    if not isinstance(ep, str):
        return None
    try:
        ip, port = ep.rsplit(":", 1)
        ipaddress.ip_address(ip.strip("[]"))
        if not 0 < int(port) < 65536:
            return None
    except ValueError:
        return None
    return ep
