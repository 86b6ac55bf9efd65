"""Mesh computation: from the controller's view of a network to one WireGuard device config.

Pure functions on plain data (peers are the controller's JSON objects as dicts), no I/O:

- :func:`plan` turns (network, this host, peers) into a :class:`DesiredDevice`;
- :func:`diff` compares it with what a device reports (:class:`DeviceState`) and returns
  only the difference (:class:`DeviceChanges`), so applying it never touches a peer that
  did not change and an endpoint change keeps the peer's session;
- the incremental path, for a host with thousands of peers: :class:`ConflictIndex` names
  the peers whose plan a change may alter, :func:`plan_peers` plans just those, and
  :func:`diff_plans` compares two plans of them — no work for the peers that did not change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cladnet import paths
from cladnet import policy as acl
from cladnet.keys import validate_public_key

DEFAULT_PORT = 51820
DEFAULT_MTU = 1420

Host = Mapping[str, Any]
"""A host (this one or a peer) as the controller serves it: plain JSON data."""


@dataclass(frozen=True)
class PeerConfig:
    """What a device should hold for one peer."""

    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None
    keepalive: int
    # How the peer is reached: "private", "direct" or "relayed via <relay ip:port>".
    # Data only: ``diff`` compares the endpoint, never this.
    path: str = "direct"


@dataclass(frozen=True)
class DesiredDevice:
    """The whole device as planned: interface address (overlay ip/prefix), MTU, port, peers."""

    address: str
    mtu: int
    listen_port: int
    peers: dict[str, PeerConfig]  # keyed by public key
    # Peers left out because their data is unusable or hostile: (peer id, reason).
    skipped: tuple[tuple[str, str], ...] = ()
    # Peer id → its public key, for every planned peer.
    ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerState:
    """One peer as a device reports it, with its live counters."""

    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None
    keepalive: int
    last_handshake: float | None = None  # unix time; None before the first handshake
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class DeviceState:
    """What a device reports."""

    listen_port: int | None
    peers: dict[str, PeerState]  # keyed by public key


@dataclass(frozen=True)
class PeerUpdate:
    """The changed fields of an existing peer; ``None`` means "leave as is"."""

    public_key: str
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] | None = None
    keepalive: int | None = None

    def fields(self) -> list[str]:
        """Names of the fields this update sets."""
        return [
            name
            for name, value in (
                ("endpoint", self.endpoint),
                ("allowed_ips", self.allowed_ips),
                ("keepalive", self.keepalive),
            )
            if value is not None
        ]


@dataclass(frozen=True)
class DeviceChanges:
    """The difference between a planned and a reported device. Falsy when there is none."""

    listen_port: int | None = None
    peers_to_remove: tuple[str, ...] = ()
    peers_to_add: tuple[PeerConfig, ...] = ()
    peers_to_update: dict[str, PeerUpdate] = field(default_factory=dict)
    # Peers added without their keepalive for now (see ``diff``): diff again shortly.
    keepalive_deferred: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.listen_port is not None
            or self.peers_to_remove
            or self.peers_to_add
            or self.peers_to_update
        )


def readd_first_endpoints(
    changes: DeviceChanges, had_endpoint: Mapping[str, bool], configs: Iterable[PeerConfig]
) -> DeviceChanges:
    """``changes`` with each peer that gets its first endpoint removed and added again.

    Traffic to a peer with no endpoint yet (a pair waiting for its relay port) makes
    WireGuard count a handshake initiation it could not send, and it then holds the
    next one back for 5 s (REKEY_TIMEOUT) even once the endpoint is set. A peer with no
    endpoint has no session to lose: added anew, it initiates at once. ``had_endpoint``:
    public key → whether the device's peer has something to lose (an endpoint or a
    session); False also for a peer without a session that moves to another path, whose
    initiations so far went nowhere (unknown: left as is).
    """
    by_key = {c.public_key: c for c in configs}
    readd = [
        key
        for key, update in changes.peers_to_update.items()
        if update.endpoint is not None and had_endpoint.get(key) is False and key in by_key
    ]
    if not readd:
        return changes
    return replace(
        changes,
        peers_to_remove=(*changes.peers_to_remove, *readd),
        peers_to_add=(*changes.peers_to_add, *(by_key[k] for k in readd)),
        peers_to_update={k: u for k, u in changes.peers_to_update.items() if k not in readd},
    )


def path_changed(before: dict[str, PeerConfig], after: dict[str, PeerConfig]) -> set[str]:
    """Public keys of the peers whose path changes (say direct → relayed)."""
    return {
        config.public_key
        for pid, config in after.items()
        if pid in before and before[pid].path != config.path
    }


def sessionless(device: DeviceState, keys: set[str]) -> dict[str, bool]:
    """Public key → False for each of ``keys`` the device holds with no handshake and
    nothing received: its initiations so far went where nothing answers, and WireGuard
    would hold the next one back for up to 5 s; added anew on its new path, it
    initiates at once (see :func:`readd_first_endpoints`). A peer with a session is kept."""
    return {
        key: False
        for key in keys
        if key in device.peers
        and device.peers[key].last_handshake is None
        and device.peers[key].rx_bytes == 0
    }


def relay_drift(configs: Iterable[PeerConfig], device: DeviceState) -> DeviceChanges:
    """The relayed peers whose device endpoint is not their relay port, set back to it.

    WireGuard moves a peer's endpoint to wherever its last authenticated packet came
    from (roaming). A relayed pair that once had a direct packet through keeps sending
    there, and once that address is gone (the peer's NAT moved) the pair is cut off
    while the plan still says "relay": nothing in the plan changed, so nothing would
    set the endpoint again."""
    updates = {
        c.public_key: PeerUpdate(c.public_key, endpoint=c.endpoint)
        for c in configs
        if c.path.startswith("relayed via")
        and c.endpoint is not None
        and c.public_key in device.peers
        and device.peers[c.public_key].endpoint not in (None, c.endpoint)
    }
    return DeviceChanges(peers_to_update=updates)


# --- addresses ---------------------------------------------------------------------------


def format_endpoint(host: str, port: int) -> str:
    """Canonical ``ip:port``: IPv6 compressed and in brackets (the form WireGuard prints)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"  # a host name: keep it as given
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"1.2.3.4:51820"`` or ``"[fd00::1]:51820"`` → ``(host, port)``.

    Raises ``ValueError`` when it is not ``host:port``.
    """
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def normalize_endpoint(endpoint: str) -> str:
    """Canonical form of ``endpoint`` so that equal endpoints compare equal."""
    return format_endpoint(*split_endpoint(endpoint))


def normalize_allowed_ips(allowed_ips: Iterable[str]) -> tuple[str, ...]:
    """Sorted canonical networks (``10.0.0.1`` → ``10.0.0.1/32``), for comparison."""
    nets = {ipaddress.ip_network(ip, strict=False) for ip in allowed_ips}
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, n)))


def _interfaces(host: Host) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    return [ipaddress.ip_interface(a) for a in host.get("addresses") or ()]


def _shared_subnet_address(me: Host, peer: Host) -> str | None:
    """The peer's underlay address that shares a subnet with one of mine, if any."""
    mine = _interfaces(me)
    for theirs in _interfaces(peer):
        for own in mine:
            if own.version == theirs.version and (
                theirs.ip in own.network or own.ip in theirs.network
            ):
                return str(theirs.ip)
    return None


# --- planning ----------------------------------------------------------------------------


def same_site(me: Host, peer: Host) -> bool:
    """Whether two hosts reach each other directly over their private (underlay) addresses.

    True when both carry the same non-empty ``site`` label; or the same non-empty
    ``cloud``, ``region`` and ``vpc`` labels; or the controller saw both come from the
    same public address (one NAT) and they share an underlay subnet. The subnet check
    alone is not enough: two clouds may both use 192.168.1.0/24.
    """
    a, b = me.get("labels") or {}, peer.get("labels") or {}
    if a.get("site") and a.get("site") == b.get("site"):
        return True
    keys = ("cloud", "region", "vpc")
    if all(a.get(k) for k in keys) and all(a.get(k) == b.get(k) for k in keys):
        return True
    public = me.get("public_address")
    return bool(
        public
        and public == peer.get("public_address")
        and _shared_subnet_address(me, peer) is not None
    )


def choose_endpoint(me: Host, peer: Host) -> str | None:
    """Where to send the peer's packets: ``ip:port``, or ``None`` when nothing is known
    (see :func:`choose_path`)."""
    return choose_path(me, peer)[0]


WAITING_FOR_RELAY = "waiting for a relay"


def choose_path(
    me: Host, peer: Host, direct_failed: Collection[str] = ()
) -> tuple[str | None, str]:
    """``(endpoint, path)`` for the peer, best path first.

    ``direct_failed``: peer ids whose direct path over reflexive addresses got no
    handshake lately (the agent's probe): they take their relay, when they have one.

    1. Same site: the peer's private address (the one in a subnet shared with me, else
       its first address) with its listen port — path ``private``.
    2. An explicit endpoint the peer announced — ``direct``.
    3. Direct when one side is public or both have a stable reflexive address
       (:func:`cladnet.paths.direct_possible`): the peer's public or reflexive address;
       ``None`` when only I am public (the peer opens its NAT by sending first).
    4. A relay port the controller assigned this pair — ``relayed via <ip:port>``.
    5. No endpoint (``waiting for a relay``) while relays serve either host (the
       network has relays) but not this pair yet.
    6. Else the public address the controller saw with the peer's listen port: right
       for 1:1 NAT and port-forwards, a guess for the rest.
    """
    port = int(peer.get("listen_port") or DEFAULT_PORT)
    addresses = peer.get("addresses") or []
    if same_site(me, peer) and addresses:
        private = _shared_subnet_address(me, peer)
        if private is None:
            private = str(ipaddress.ip_interface(addresses[0]).ip)
        return format_endpoint(private, port), "private"
    explicit = peer.get("endpoints") or []
    if explicit:
        return normalize_endpoint(explicit[0]), "direct"
    relayed = paths.relayed_endpoint(me, peer)
    gave_up = relayed is not None and peer.get("id") in direct_failed
    if paths.direct_possible(me, peer) and not gave_up:
        direct = paths.direct_endpoint(peer)
        return (normalize_endpoint(direct) if direct else None), "direct"
    if relayed is not None:
        return normalize_endpoint(relayed), f"relayed via {normalize_endpoint(relayed)}"
    if paths.served_by_relays(me) or paths.served_by_relays(peer):
        # Relays serve this network and this pair has none yet (the next relay pass
        # assigns one): no guess. A guessed initiation lost at a NAT that maps per
        # destination holds WireGuard back 5 s (REKEY_TIMEOUT) from initiating again
        # when the relay port arrives; with no endpoint it initiates at once then.
        return None, WAITING_FOR_RELAY
    public = peer.get("public_address")
    if public:
        return format_endpoint(public, port), "direct"
    return None, "direct"


@dataclass(frozen=True)
class PeerPlan:
    """Planned peers by peer id, and the ones left out: (peer id, reason)."""

    configs: dict[str, PeerConfig]
    skipped: tuple[tuple[str, str], ...] = ()


def plan_peers(
    network: Mapping[str, Any],
    me: Host,
    peers: Iterable[Host],
    keepalive_override: int | None = None,
    policy: acl.Policy | None = None,
    direct_failed: Collection[str] = (),
) -> PeerPlan:
    """The peer configs of :func:`plan`, by peer id, for ``peers`` only.

    Planning a subset gives the same configs as planning everyone as long as the subset
    is closed under "shares an overlay address or a public key" (see
    :class:`ConflictIndex`): only such peers can displace one another.
    """
    cidr = ipaddress.ip_network(network["cidr"], strict=False)
    keepalive = int(network.get("keepalive") or 0)
    configs: dict[str, PeerConfig] = {}
    keys: set[str] = set()
    skipped: list[tuple[str, str]] = []
    taken = {str(me.get("overlay_ip"))}
    # Selectors of the hosts with a flow to or from me (see cladnet.policy).
    others = (
        acl.counterparts(policy, acl.memberships(policy, me)) if policy is not None else frozenset()
    )
    # Sorted, so that when two peers claim one address the same one wins everywhere.
    for peer in sorted(peers, key=_peer_id):
        if isinstance(peer, Mapping) and (
            peer.get("id") == me.get("id") or peer.get("public_key") == me.get("public_key")
        ):
            continue
        reason = _unusable(peer, cidr, taken)
        if reason is None and peer["public_key"] in keys:
            reason = "public key claimed twice"
        if reason is not None:
            skipped.append((_peer_id(peer) or "?", reason))
            continue
        overlay = ipaddress.ip_address(peer["overlay_ip"])
        taken.add(str(overlay))
        keys.add(peer["public_key"])
        # After the claims above: a peer the policy hides still wins its address and
        # key, so which peer wins does not depend on the policy (nor on the subset).
        if policy is not None and others.isdisjoint(acl.memberships(policy, peer)):
            continue
        if keepalive_override is not None:
            peer_keepalive = keepalive_override
        else:
            peer_keepalive = 0 if same_site(me, peer) else keepalive
        endpoint, path = choose_path(me, peer, direct_failed)
        configs[_peer_id(peer)] = PeerConfig(
            public_key=peer["public_key"],
            allowed_ips=(f"{overlay}/{overlay.max_prefixlen}",),
            endpoint=endpoint,
            keepalive=peer_keepalive,
            path=path,
        )
    return PeerPlan(configs=configs, skipped=tuple(skipped))


def plan(
    network: Mapping[str, Any],
    me: Host,
    peers: Iterable[Host],
    keepalive_override: int | None = None,
    policy: acl.Policy | None = None,
    direct_failed: Collection[str] = (),
) -> DesiredDevice:
    """The device this host should have for ``network``.

    Address: my overlay IP with the network's prefix length. MTU from the network; the
    listen port is mine if I have one, else the network's. One peer per other host, each
    allowed only its own overlay IP (/32 or /128). Keepalive: a peer on another site may
    be behind NAT (or I may be), so it gets the network's keepalive to hold the NAT
    mapping open; same-site peers get 0 (off). ``keepalive_override``, when given, is
    used for every peer instead. With a ``policy``, a peer with no allowed flow in
    either direction is left out (not "skipped": nothing is wrong with it).
    ``direct_failed``: see :func:`choose_path`.
    """
    cidr = ipaddress.ip_network(network["cidr"], strict=False)
    planned = plan_peers(network, me, peers, keepalive_override, policy, direct_failed)
    return DesiredDevice(
        address=f"{me['overlay_ip']}/{cidr.prefixlen}",
        mtu=int(network.get("mtu") or DEFAULT_MTU),
        listen_port=int(me.get("listen_port") or network.get("listen_port") or DEFAULT_PORT),
        peers={c.public_key: c for c in planned.configs.values()},
        skipped=planned.skipped,
        ids={pid: c.public_key for pid, c in planned.configs.items()},
    )


def identity(peer: Mapping[str, Any]) -> tuple[Any, ...]:
    """What a peer's DNS names and packet-filter rules depend on: name, overlay IP, tags
    and labels. Not its endpoints: a peer that roams changes neither."""
    return (peer.get("name"), peer.get("overlay_ip"), peer.get("tags"), peer.get("labels"))


def _claims(peer: Any) -> tuple[str, ...]:
    """What a peer claims that another may claim too: its overlay address and its key."""
    if not isinstance(peer, Mapping):
        return ()
    raw = str(peer.get("overlay_ip"))
    try:
        overlay = str(ipaddress.ip_address(raw))
    except ValueError:
        overlay = raw
    return (f"ip {overlay}", f"key {peer.get('public_key')}")


class ConflictIndex:
    """Which peers claim the same overlay address or public key.

    Only such peers decide each other's plan (the first by id wins, see :func:`plan`),
    so after a change only the changed peers' groups — as they were and as they are —
    need planning again. In-memory bookkeeping, no I/O.
    """

    def __init__(self) -> None:
        self._holders: dict[str, set[str]] = {}
        self._claims: dict[str, tuple[str, ...]] = {}

    def rebuild(self, peers: Mapping[str, Host]) -> None:
        """Index every peer of ``peers`` (id → peer), forgetting what was there."""
        self._holders.clear()
        self._claims.clear()
        for pid, peer in peers.items():
            self._set(pid, peer)

    def _set(self, pid: str, peer: Any) -> None:
        for claim in self._claims.pop(pid, ()):
            holders = self._holders[claim]
            holders.discard(pid)
            if not holders:
                del self._holders[claim]
        if peer is not None:
            self._claims[pid] = claims = _claims(peer)
            for claim in claims:
                self._holders.setdefault(claim, set()).add(pid)

    def _group(self, ids: Iterable[str]) -> set[str]:
        seen = set(ids)
        todo = list(seen)
        while todo:
            for claim in self._claims.get(todo.pop(), ()):
                for other in self._holders[claim] - seen:
                    seen.add(other)
                    todo.append(other)
        return seen

    def update(self, peers: Mapping[str, Host], changed: Iterable[str]) -> set[str]:
        """Re-index the ``changed`` peers (absent from ``peers``: gone) and return every
        peer id whose planned config may differ now."""
        changed = set(changed)
        before = self._group(changed)
        for pid in changed:
            self._set(pid, peers.get(pid))
        return self._group(before)


def _str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return value


def _peer_id(peer: Any) -> str:
    return str(peer.get("id", "")) if isinstance(peer, Mapping) else ""


def _unusable(
    peer: Any, cidr: ipaddress.IPv4Network | ipaddress.IPv6Network, taken: set[str]
) -> str | None:
    """Why a peer from the controller cannot be configured, or None if it can."""
    if not isinstance(peer, Mapping):
        return "not an object"
    try:
        validate_public_key(str(peer.get("public_key")))
    except ValueError:
        return "invalid public key"
    try:
        overlay = ipaddress.ip_address(str(peer.get("overlay_ip")))
    except ValueError:
        return "invalid overlay address"
    if overlay not in cidr:
        return f"overlay address {overlay} outside {cidr}"
    if str(overlay) in taken:
        return f"overlay address {overlay} claimed twice"
    if cidr.num_addresses > 2 and overlay in (cidr.network_address, cidr.broadcast_address):
        return f"overlay address {overlay} is not a host address of {cidr}"
    port = peer.get("listen_port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        return "invalid listen port"
    return _bad_underlay(peer)


def _bad_underlay(peer: Mapping[str, Any]) -> str | None:
    """Why the peer's underlay facts (addresses, endpoints, labels) are unusable."""
    try:
        for address in _str_list(peer.get("addresses")):
            ipaddress.ip_interface(address)
        for endpoint in _str_list(peer.get("endpoints")):
            host, port = split_endpoint(endpoint)
            ipaddress.ip_address(host)
            if not 0 < port < 65536:
                raise ValueError("port out of range")
        public = peer.get("public_address")
        if public is not None:
            ipaddress.ip_address(str(public))
    except ValueError as exc:
        return f"invalid underlay data: {exc}"
    labels = peer.get("labels")
    if labels is not None and not (
        isinstance(labels, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        return "invalid labels"
    return None


# --- diffing -----------------------------------------------------------------------------


def _endpoint_changed(
    key: str, want: str | None, have: str | None, applied: DesiredDevice | None
) -> bool:
    if want is None:
        return False  # nothing to say: keep whatever the device learned
    if have is not None and normalize_endpoint(want) == normalize_endpoint(have):
        return False
    if applied is not None:
        before = applied.peers.get(key)
        # The device roamed to where the peer's packets really come from (e.g. a NAT
        # port): keep that unless the plan itself moved the peer.
        if before is not None and before.endpoint == want and have is not None:
            return False
    return True


def diff(
    desired: DesiredDevice,
    actual: DeviceState,
    applied: DesiredDevice | None = None,
    own_key: str | None = None,
) -> DeviceChanges:
    """What to change so that ``actual`` matches ``desired``; unchanged peers are absent.

    A planned endpoint of ``None`` never clears what the device has. ``applied`` is the
    plan last applied, if known: a peer whose planned endpoint did not change since then
    keeps the endpoint the device roamed to instead of being pointed back.

    With ``own_key`` (this host's public key), a new peer whose key sorts before it is
    added without its keepalive, listed in ``keepalive_deferred``; the next diff adds
    it. Two hosts usually learn of each other at the same moment, and a keepalive makes
    WireGuard start a handshake at once: two handshakes that cross cancel each other and
    the pair waits for the 5-s retry. The host with the lower key starts; the other
    opens its NAT mapping a moment later, once the caller diffs again.
    """
    remove = tuple(sorted(k for k in actual.peers if k not in desired.peers))
    add: list[PeerConfig] = []
    deferred: list[str] = []
    for key in sorted(desired.peers.keys() - actual.peers.keys()):
        peer = desired.peers[key]
        if _deferred_keepalive(peer, own_key):
            peer = replace(peer, keepalive=0)
            deferred.append(key)
        add.append(peer)
    update: dict[str, PeerUpdate] = {}
    for key in sorted(desired.peers.keys() & actual.peers.keys()):
        want, have = desired.peers[key], actual.peers[key]
        endpoint = (
            want.endpoint if _endpoint_changed(key, want.endpoint, have.endpoint, applied) else None
        )
        allowed = normalize_allowed_ips(want.allowed_ips)
        keepalive = want.keepalive if want.keepalive != have.keepalive else None
        change = PeerUpdate(
            public_key=key,
            endpoint=endpoint,
            allowed_ips=allowed if allowed != normalize_allowed_ips(have.allowed_ips) else None,
            keepalive=keepalive,
        )
        if change.fields():
            update[key] = change
    return DeviceChanges(
        listen_port=desired.listen_port if desired.listen_port != actual.listen_port else None,
        peers_to_remove=remove,
        peers_to_add=tuple(add),
        peers_to_update=update,
        keepalive_deferred=tuple(deferred),
    )


def with_endpoint_refresh(changes: DeviceChanges, desired: DesiredDevice) -> DeviceChanges:
    """``changes`` plus the endpoint of every kept peer, re-sent even if unchanged.

    For use after this host's own address changed: wireguard-go caches the source
    address per endpoint and may keep sending from the vanished one until the peer's
    endpoint is set again.
    """
    added = {p.public_key for p in changes.peers_to_add}
    update = dict(changes.peers_to_update)
    for key, peer in desired.peers.items():
        if key in added or peer.endpoint is None:
            continue
        update[key] = replace(update.get(key, PeerUpdate(public_key=key)), endpoint=peer.endpoint)
    return replace(changes, peers_to_update=update)


def _deferred_keepalive(peer: PeerConfig, own_key: str | None) -> bool:
    """Whether a new peer is added without its keepalive for now (see :func:`diff`)."""
    return own_key is not None and bool(peer.keepalive) and peer.public_key < own_key


def diff_plans(
    before: Mapping[str, PeerConfig],
    after: Mapping[str, PeerConfig],
    own_key: str | None = None,
) -> DeviceChanges:
    """What to change on a device that holds the plan ``before`` so it holds ``after``.

    Both map peer id → config, for the same set of peers (the rest is untouched); a key
    may move between ids. Like :func:`diff` with ``applied``: an endpoint is only sent
    when the plan moved it (so one the device roamed to is kept), and a new peer's
    keepalive may be deferred.
    """
    old = {c.public_key: c for c in before.values()}
    new = {c.public_key: c for c in after.values()}
    add: list[PeerConfig] = []
    deferred: list[str] = []
    for key in sorted(new.keys() - old.keys()):
        peer = new[key]
        if _deferred_keepalive(peer, own_key):
            peer = replace(peer, keepalive=0)
            deferred.append(key)
        add.append(peer)
    update: dict[str, PeerUpdate] = {}
    for key in sorted(new.keys() & old.keys()):
        want, had = new[key], old[key]
        moved = want.endpoint is not None and (
            had.endpoint is None
            or normalize_endpoint(want.endpoint) != normalize_endpoint(had.endpoint)
        )
        allowed = normalize_allowed_ips(want.allowed_ips)
        change = PeerUpdate(
            public_key=key,
            endpoint=want.endpoint if moved else None,
            allowed_ips=allowed if allowed != normalize_allowed_ips(had.allowed_ips) else None,
            keepalive=want.keepalive if want.keepalive != had.keepalive else None,
        )
        if change.fields():
            update[key] = change
    return DeviceChanges(
        peers_to_remove=tuple(sorted(old.keys() - new.keys())),
        peers_to_add=tuple(add),
        peers_to_update=update,
        keepalive_deferred=tuple(deferred),
    )


def summary(changes: DeviceChanges) -> dict[str, Any]:
    """A short, loggable description of ``changes`` (keys cut to 8 characters)."""
    out: dict[str, Any] = {}
    if changes.listen_port is not None:
        out["listen_port"] = changes.listen_port
    if changes.peers_to_add:
        out["add"] = [p.public_key[:8] for p in changes.peers_to_add]
    if changes.peers_to_remove:
        out["remove"] = [k[:8] for k in changes.peers_to_remove]
    if changes.peers_to_update:
        out["update"] = {k[:8]: u.fields() for k, u in changes.peers_to_update.items()}
    if changes.keepalive_deferred:
        out["keepalive_later"] = [k[:8] for k in changes.keepalive_deferred]
    return out
