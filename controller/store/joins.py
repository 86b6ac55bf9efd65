"""Joins: a new host takes a unique overlay IP, hostname and key in one transaction; an
existing host re-joins with its credential or a proof of its key (a challenge)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aetcd import transactions as tx

from cladnet import ipam, keys, tokens
from cladnet.models import (
    ChallengeRequest,
    ChallengeResponse,
    JoinRequest,
    Network,
    Peer,
)
from controller import keyspace as ks
from controller.errors import ApiError, bad_request, conflict, not_found
from controller.etcd import Etcd
from controller.store import publickeys
from controller.store.networks import Networks
from controller.store.tokens import Tokens
from controller.store.txn import LOST, Lost, dump, retry

log = logging.getLogger("cladnet.controller.store")

IP_HINT_SECONDS = 10.0  # how stale the address hint may be (freed addresses reused after)
IP_HINT_AFTER_CONFLICT = 1.0  # how stale, once another controller took an address we picked
BLOCK = 64  # addresses a controller picks among until they are nearly all taken
BLOCK_TRIES = 4  # blocks tried before walking the network for a free address
RANDOM_PROBES = 16  # random picks tried in a block
CHALLENGE_SECONDS = 60.0  # how long a key challenge may be answered
MAX_SUFFIXED_NAME = 240  # longer names are not given a -N suffix (hostnames stop at 253)


@dataclass
class Joined:
    """A join's outcome: the host's peer record, its fresh credential, its network, and
    the hostname it asked for when it got another (``web`` → ``web-2``)."""

    peer: Peer
    credential: str
    network: Network
    renamed_from: str | None


def pick_in_block(
    cidr: ipaddress.IPv4Network,
    used: set[int],
    block: int | None,
    rng: random.Random | None = None,
) -> tuple[ipaddress.IPv4Address | None, int | None]:
    """A free address of ``cidr`` (not in ``used``), or None when it is full; and the
    block (of BLOCK addresses) it is in, to pick in next time.

    Random addresses of one block until it is nearly full (random probes miss), then of
    another block, the emptiest of a few random ones; once none is found so, the next
    free one after a random start. A controller keeps its block, and leaves it when
    another controller takes an address it picked there: controllers then pick in
    blocks of their own (as Calico's IPAM gives each node its blocks) and their
    transactions rarely collide, which they did at the end of every run of used
    addresses when each walked up from a random start.
    """
    first, last = ipam.host_range(cidr)
    size = last - first + 1
    rng = rng or random.Random()
    if size > 0:
        span = min(BLOCK, size)

        def bounds(b: int) -> tuple[int, int]:
            return first + b * span, min(span, last + 1 - first - b * span)

        def fill(b: int) -> int:
            low, width = bounds(b)
            return sum(1 for a in range(low, low + width) if a in used)

        for attempt in range(BLOCK_TRIES):
            if block is None or attempt or block * span >= size:
                candidates = [rng.randrange(-(-size // span)) for _ in range(BLOCK_TRIES)]
                block = min(candidates, key=fill)
            low, width = bounds(block)
            for _ in range(RANDOM_PROBES):
                candidate = low + rng.randrange(width)
                if candidate not in used:
                    return ipaddress.IPv4Address(candidate), block
    return ipam.pick_address(cidr, used, rng), None


@functools.lru_cache(maxsize=1024)
def _network(cidr: str) -> ipaddress.IPv4Network:
    """A network's CIDR, parsed once (parsing it and its broadcast address on every join
    were ≈ 5 % of a join's CPU in the controller)."""
    return ipaddress.IPv4Network(cidr)


@dataclass
class _Hint:
    """One network's overlay addresses as this controller knows them."""

    used: set[int] = field(default_factory=set)  # read from etcd, plus picks since
    in_flight: set[int] = field(default_factory=set)  # picked, transaction not answered
    committed: set[int] = field(default_factory=set)  # taken while a read is under way
    read_at: float = 0.0
    reads: int = 0
    stale: bool = False  # another controller took one of our picks: read again soon
    block: int | None = None  # the block this controller picks in (``pick_in_block``)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AddressHints:
    """Per network, the overlay addresses in use as this controller last read them: a
    hint for picking an address, so a join does not list every address of its network
    (that list was most of a join's CPU at a few thousand hosts). The transaction's
    compare on the address key stays what guarantees uniqueness.

    A pick is held (``in_flight``) until its join's transaction is answered, and a read
    of the addresses keeps the picks held or taken while it ran: a read never hands out
    again an address a join of this controller is still writing.
    """

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self._hints: dict[str, _Hint] = {}

    async def pick(
        self, net_id: str, cidr: ipaddress.IPv4Network, fresh: bool = False
    ) -> ipaddress.IPv4Address | None:
        """A free overlay address of the network by the hint (read again when older than
        IP_HINT_SECONDS, or than IP_HINT_AFTER_CONFLICT after a conflict, or when
        ``fresh``), held until ``keep`` or ``give_back``; None when the hint is full."""
        hint = self._hints.setdefault(net_id, _Hint())
        age = time.monotonic() - hint.read_at
        if (
            fresh
            or not hint.reads
            or age > (IP_HINT_AFTER_CONFLICT if hint.stale else IP_HINT_SECONDS)
        ):
            await self._read(net_id, hint, fresh)
        address, block = pick_in_block(cidr, hint.used, hint.block)
        if block != hint.block and time.monotonic() - hint.read_at > IP_HINT_AFTER_CONFLICT:
            # Into another block: first see where the other controllers pick now.
            await self._read(net_id, hint, fresh=False)
            address, block = pick_in_block(cidr, hint.used, hint.block)
        hint.block = block
        if address is not None:
            hint.used.add(int(address))
            hint.in_flight.add(int(address))
        return address

    async def _read(self, net_id: str, hint: _Hint, fresh: bool) -> None:
        """Read the network's addresses; joins that find a read under way use its result
        (one read, not one per join), except a ``fresh`` one, which reads after it."""
        reads = hint.reads
        async with hint.lock:
            if hint.reads != reads and not fresh:
                return
            hint.committed = set()
            res = await self.etcd.get_prefix(ks.prefix("ips", net_id), keys_only=True)
            used = {int(ipaddress.IPv4Address(ks.last_segment(kv.key))) for kv in res}
            hint.used = used | hint.in_flight | hint.committed
            hint.read_at, hint.stale = time.monotonic(), False
            hint.reads += 1

    def keep(self, net_id: str, address: ipaddress.IPv4Address, conflict: bool = False) -> None:
        """A picked address is taken: by its join, or (``conflict``) by another writer."""
        hint = self._hints[net_id]
        hint.in_flight.discard(int(address))
        hint.used.add(int(address))
        if hint.lock.locked():
            hint.committed.add(int(address))
        if conflict:  # another controller picks here too: leave it this block
            hint.stale, hint.block = True, None

    def give_back(self, net_id: str, address: ipaddress.IPv4Address) -> None:
        """A picked address was not taken: free for the next pick."""
        hint = self._hints[net_id]
        hint.in_flight.discard(int(address))
        hint.used.discard(int(address))

    def release(self, net_id: str, address: str) -> None:
        """An address was freed: the next join through this controller may take it."""
        if net_id in self._hints:
            self._hints[net_id].used.discard(int(ipaddress.IPv4Address(address)))


def _check_proof(proof: str | None, challenge_kv: list[Any], peer: Peer) -> None:
    """Raise 403 unless ``proof`` answers the host's open challenge for its current key."""
    if proof is None:
        raise ApiError(
            403,
            "proof_required",
            f"becoming host {peer.id} needs its current credential, a proof of its "
            "WireGuard key (POST /v1/join/challenge) or an admin",
        )
    if not challenge_kv:
        raise ApiError(403, "invalid_proof", "no open challenge for this host; ask for one")
    record = json.loads(challenge_kv[0][0])
    if record["expires_at"] < time.time():
        raise ApiError(403, "invalid_proof", "the challenge expired; ask for a new one")
    if record["public_key"] != peer.public_key or not keys.check_proof(
        proof, record["proof_digest"]
    ):
        raise ApiError(403, "invalid_proof", "the proof does not answer the host's challenge")


class Joins:
    """Joins, re-joins and key challenges."""

    def __init__(
        self, etcd: Etcd, networks: Networks, tokens: Tokens, addresses: AddressHints
    ) -> None:
        self.etcd, self.networks, self.tokens, self.addresses = etcd, networks, tokens, addresses

    async def join(
        self, req: JoinRequest, observed: str, vouched_host: str | None = None
    ) -> Joined:
        """Register a new host; or, with ``req.host_id`` or ``vouched_host`` (the host the
        caller's bearer credential proved, or the one an admin names), re-join an existing
        one. A join token alone never becomes an existing host.

        A new host's join is one etcd transaction: the token and network come from
        caches (their records never change; the transaction compares their revisions),
        and the hostname, key and address are compared absent. A transaction that fails
        reads, in the same round trip, what was in the way.
        """
        if req.host_id is not None or vouched_host is not None:
            return await self._rejoin(req, observed, vouched_host)
        key_hex = keys.key_to_hex(req.public_key)
        name, renamed_from = req.hostname, None

        async def attempt() -> Joined | Lost:
            nonlocal name, renamed_from
            token, token_revision = await self.tokens.for_join(req.token)
            net, net_revision = await self.networks.for_join(token["network_id"])
            slot = None
            if token["max_uses"] is not None:
                # A limited token has max_uses slots; claiming one is a create-if-absent
                # like an IP, so concurrent joiners do not serialise on the token.
                slot = await self.tokens.free_slot(token)
            address = await self._address(req, net, key_hex)
            try:  # the address is held for this join until its transaction is answered
                host_id = tokens.new_id("h-")
                credential, digest = tokens.mint("clh", host_id)
                now = time.time()
                peer = Peer(
                    id=host_id,
                    name=name,
                    network_id=net.id,
                    public_key=req.public_key,
                    overlay_ip=str(address),
                    listen_port=req.listen_port or net.listen_port,
                    addresses=req.addresses,
                    public_address=observed,
                    endpoints=[],
                    labels=req.labels,
                    updated_at=now,
                )
                host = {
                    "id": host_id,
                    "network_id": net.id,
                    "credential_hash": digest,
                    "created_at": now,
                    "overlay_ip": str(address),
                }
                token_key, net_key = ks.token(token["id"]), ks.network(net.id)
                ip_key, name_key = ks.ip(net.id, str(address)), ks.hostname(net.id, name)
                key_key = ks.public_key(net.id, key_hex)
                compare = [
                    tx.Create(ip_key) == 0,
                    tx.Create(name_key) == 0,
                    tx.Create(key_key) == 0,
                    tx.Mod(net_key) == net_revision,  # not deleted meanwhile
                    # Not revoked meanwhile (a token record never changes, so joins do not
                    # contend on it): a revoked token's join must not count a use.
                    tx.Mod(token_key) == token_revision,
                ]
                if slot is not None:
                    compare.append(tx.Create(ks.token_slot(token["id"], slot)) == 0)
                success = [
                    tx.Put(ip_key, host_id.encode()),
                    tx.Put(name_key, host_id.encode()),
                    tx.Put(key_key, host_id.encode()),
                    tx.Put(ks.host(host_id), dump(host)),
                    tx.Put(ks.peer(net.id, host_id), dump(peer)),
                    tx.Put(ks.liveness(net.id, host_id), dump({"last_seen": now})),
                    tx.Put(
                        ks.token_use(token["id"], host_id)
                        if slot is None
                        else ks.token_slot(token["id"], slot),
                        host_id.encode(),
                    ),
                ]
                failure = [tx.Get(k) for k in (token_key, net_key, key_key, name_key, ip_key)]
                ok, responses = await self.etcd.txn(compare, success, failure)
            except BaseException:
                self.addresses.give_back(net.id, address)
                raise
            if ok:
                self.addresses.keep(net.id, address)
                log.info(
                    "host joined",
                    extra={
                        "host": host_id,
                        "hostname": name,
                        "network": net.name,
                        "ip": str(address),
                    },
                )
                return Joined(peer, credential, net, renamed_from)
            token_kv, net_kv, key_kv, name_kv, ip_kv = responses
            if ip_kv:  # most likely another controller's join
                self.addresses.keep(net.id, address, conflict=True)
            else:
                self.addresses.give_back(net.id, address)
            if not token_kv or token_kv[0][1].mod_revision != token_revision:
                self.tokens.forget(token["id"])  # read again: refused if revoked
                return LOST
            if not net_kv or net_kv[0][1].mod_revision != net_revision:
                self.networks.forget(net.id)
                return LOST
            if key_kv:
                raise publickeys.key_in_use(net)
            if name_kv:
                name, renamed_from = await self._name_for_taken(req, net), req.hostname
            # Otherwise the address or the token slot: pick again.
            return LOST

        return await retry("join", attempt, "too many concurrent joins, try again")

    async def _address(self, req: JoinRequest, net: Network, key_hex: str) -> ipaddress.IPv4Address:
        """A free overlay address for a new host, held until its transaction is answered.

        When there is none, a taken key or hostname is still the answer (as when there
        is room): an agent whose join answer was lost re-joins on ``key_in_use``.
        """
        cidr = _network(net.cidr)
        address = await self.addresses.pick(net.id, cidr)
        if address is None:
            # The hint may hold addresses freed since it was read.
            address = await self.addresses.pick(net.id, cidr, fresh=True)
        if address is not None:
            return address
        _, (key_kv, name_kv) = await self.etcd.txn(
            [],
            [
                tx.Get(ks.public_key(net.id, key_hex)),
                tx.Get(ks.hostname(net.id, req.hostname)),
            ],
        )
        if key_kv:
            raise publickeys.key_in_use(net)
        if name_kv:
            await self._name_for_taken(req, net)
        raise conflict(
            "network_full", f"network {net.name} ({net.cidr}) has no free overlay address"
        )

    async def _name_for_taken(self, req: JoinRequest, net: Network) -> str:
        """The name a new host gets when its requested one is taken: ``web-2``, ``web-3``…
        for a machine's own name; an error for a name the caller chose."""
        if req.replace:
            raise ApiError(
                403,
                "proof_required",
                f"host {req.hostname!r} exists in network {net.name}: becoming it needs its "
                "current credential or a proof of its WireGuard key (POST /v1/join/challenge)",
            )
        if req.explicit_hostname or len(req.hostname) > MAX_SUFFIXED_NAME:
            raise conflict(
                "hostname_taken",
                f"a host named {req.hostname!r} is already in network {net.name}; choose "
                "another hostname (a machine's own hostname would get a -N suffix)",
            )
        res = await self.etcd.get_prefix(ks.hostname(net.id, req.hostname + "-"), keys_only=True)
        taken = {ks.last_segment(kv.key)[len(req.hostname) + 1 :] for kv in res}
        n = 2
        while str(n) in taken:
            n += 1
        return f"{req.hostname}-{n}"

    async def challenge(self, req: ChallengeRequest) -> ChallengeResponse:
        """A challenge for the holder of a registered key in the token's network.

        One open challenge per host (a new one replaces it), written only for a key
        that is registered and with a valid join token: nothing grows with requests.
        """
        token, _ = await self.tokens.check(req.token)
        net_id = token["network_id"]
        index = ks.public_key(net_id, keys.key_to_hex(req.public_key))
        owner = await self.etcd.get(index)
        if owner is None:
            raise ApiError(404, "host_not_found", "no host of this network has this public key")
        host_id = owner.value.decode()
        try:
            made = keys.make_challenge(req.public_key, host_id, net_id)
        except ValueError as exc:
            raise bad_request("weak_key", "this public key cannot prove possession") from exc
        expires_at = time.time() + CHALLENGE_SECONDS
        record = {
            "public_key": req.public_key,
            "proof_digest": made.proof_digest,
            "expires_at": expires_at,
        }
        ok, _ = await self.etcd.txn(
            # Still this host's key: a host that left meanwhile gets no orphaned challenge.
            compare=[tx.Value(index) == host_id.encode()],
            success=[tx.Put(ks.challenge(net_id, host_id), dump(record))],
        )
        if not ok:
            raise ApiError(404, "host_not_found", "no host of this network has this public key")
        return ChallengeResponse(
            host_id=host_id,
            network_id=net_id,
            ephemeral_public_key=made.ephemeral_public,
            nonce=made.nonce,
            expires_at=expires_at,
        )

    async def _rejoin(self, req: JoinRequest, observed: str, vouched_host: str | None) -> Joined:
        """An existing host joins again (same overlay IP and name, fresh credential),
        proven by ``vouched_host`` or by ``req.proof``; it may change its key."""
        if vouched_host is not None and req.host_id not in (None, vouched_host):
            raise ApiError(403, "forbidden", "the credential belongs to another host")
        host_id = req.host_id or vouched_host
        assert host_id is not None
        token, _ = await self.tokens.check(req.token)
        net = await self.networks.get(token["network_id"])
        new_hex = keys.key_to_hex(req.public_key)

        async def attempt() -> Joined | Lost:
            _, (peer_kv, host_kv, challenge_kv, owner_kv) = await self.etcd.txn(
                [],
                [
                    tx.Get(ks.peer(net.id, host_id)),
                    tx.Get(ks.host(host_id)),
                    tx.Get(ks.challenge(net.id, host_id)),
                    tx.Get(ks.public_key(net.id, new_hex)),
                ],
            )
            if not peer_kv or not host_kv:  # also: a host of another network
                raise not_found("host", host_id)
            peer_value, peer_meta = peer_kv[0]
            peer = Peer.model_validate_json(peer_value)
            compare = [
                tx.Mod(ks.peer(net.id, host_id)) == peer_meta.mod_revision,
                # The host record is rewritten from what was read (a new credential).
                tx.Mod(ks.host(host_id)) == host_kv[0][1].mod_revision,
            ]
            success: list[Any] = []
            if vouched_host is None:
                _check_proof(req.proof, challenge_kv, peer)
                # Used once: consumed by this very transaction.
                compare.append(
                    tx.Mod(ks.challenge(net.id, host_id)) == challenge_kv[0][1].mod_revision
                )
                success.append(tx.Delete(ks.challenge(net.id, host_id)))
            if owner_kv and owner_kv[0][0].decode() != host_id:
                raise publickeys.key_in_use(net)
            if not owner_kv:
                compare.append(tx.Create(ks.public_key(net.id, new_hex)) == 0)
                success.append(tx.Put(ks.public_key(net.id, new_hex), host_id.encode()))
            if req.public_key != peer.public_key:
                released = await publickeys.release(self.etcd, net.id, host_id, peer.public_key)
                compare += released[0]
                success += released[1]
            host = json.loads(host_kv[0][0])
            credential, host["credential_hash"] = tokens.mint("clh", host_id)
            now = time.time()
            peer = peer.model_copy(
                update={
                    "public_key": req.public_key,
                    "listen_port": req.listen_port or peer.listen_port,
                    "addresses": req.addresses,
                    "labels": req.labels,
                    "public_address": observed,
                    "updated_at": now,
                }
            )
            success += [
                tx.Put(ks.host(host_id), dump(host)),
                tx.Put(ks.peer(net.id, host_id), dump(peer)),
                tx.Put(ks.liveness(net.id, host_id), dump({"last_seen": now})),
                # A limited token's slot was taken at the first join; unlimited ones
                # record every host that used them.
                *(
                    [tx.Put(ks.token_use(token["id"], host_id), str(now).encode())]
                    if token["max_uses"] is None
                    else []
                ),
            ]
            ok, _ = await self.etcd.txn(compare, success)
            if not ok:
                return LOST
            log.info(
                "host re-joined",
                extra={
                    "host": host_id,
                    "network": net.name,
                    "by": "credential" if vouched_host else "key proof",
                },
            )
            return Joined(peer, credential, net, None)

        return await retry("rejoin", attempt, "host changed concurrently, try again")
