"""Joins: a new host takes a unique overlay IP, hostname and key in one transaction; an
existing host re-joins with its credential or a proof of its key (a challenge)."""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from dataclasses import dataclass
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


class AddressHints:
    """Per network, the overlay addresses in use as this controller last read them: a
    hint for picking an address, so a join does not list every address of its network
    (that list was most of a join's CPU at a few thousand hosts). The transaction's
    compare on the address key stays what guarantees uniqueness."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self._used: dict[str, tuple[float, set[int]]] = {}  # net id → (when read, addresses)

    async def in_use(self, net_id: str, fresh: bool) -> set[int]:
        """The overlay addresses in use in a network, read at most IP_HINT_SECONDS ago
        unless ``fresh``; the set is shared, and picks are added to it."""
        cached = self._used.get(net_id)
        if fresh or cached is None or time.monotonic() - cached[0] > IP_HINT_SECONDS:
            res = await self.etcd.get_prefix(ks.prefix("ips", net_id), keys_only=True)
            used = {int(ipaddress.IPv4Address(ks.last_segment(kv.key))) for kv in res}
            self._used[net_id] = cached = (time.monotonic(), used)
        return cached[1]

    def release(self, net_id: str, address: str) -> None:
        """An address was freed: the next join through this controller may take it."""
        if net_id in self._used:
            self._used[net_id][1].discard(int(ipaddress.IPv4Address(address)))


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
        one. A join token alone never becomes an existing host."""
        if req.host_id is not None or vouched_host is not None:
            return await self._rejoin(req, observed, vouched_host)
        fresh = False
        key_hex = keys.key_to_hex(req.public_key)

        async def attempt() -> Joined | Lost:
            nonlocal fresh
            token, token_revision = await self.tokens.check(req.token)
            # The network, the hostname's and the key's owners in one round trip.
            net_id = token["network_id"]
            _, (net_kv, name_kv, key_kv) = await self.etcd.txn(
                [],
                [
                    tx.Get(ks.network(net_id)),
                    tx.Get(ks.hostname(net_id, req.hostname)),
                    tx.Get(ks.public_key(net_id, key_hex)),
                ],
            )
            if not net_kv:
                raise not_found("network", net_id)
            net = Network.model_validate_json(net_kv[0][0])
            if key_kv:
                raise publickeys.key_in_use(net)
            name, renamed_from = req.hostname, None
            if name_kv:
                name = await self._name_for_taken(req, net)
                renamed_from = req.hostname
            cidr = ipaddress.IPv4Network(net.cidr)
            used_ips = await self.addresses.in_use(net.id, fresh)
            address = ipam.pick_address(cidr, used_ips)
            if address is None and not fresh:
                # The hint may hold addresses freed since it was read.
                used_ips = await self.addresses.in_use(net.id, fresh=True)
                address = ipam.pick_address(cidr, used_ips)
            if address is None:
                raise conflict(
                    "network_full", f"network {net.name} ({net.cidr}) has no free overlay address"
                )
            # Taken at once, so concurrent joins through this controller pick apart.
            used_ips.add(int(address))
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
            compare = [
                tx.Create(ks.ip(net.id, str(address))) == 0,
                tx.Create(ks.hostname(net.id, name)) == 0,
                tx.Create(ks.public_key(net.id, key_hex)) == 0,
                tx.Create(ks.network(net.id)) > 0,  # not deleted meanwhile
                # Not revoked meanwhile (a token record never changes, so joins do not
                # contend on it): a revoked token's join must not count a use.
                tx.Mod(ks.token(token["id"])) == token_revision,
            ]
            slot = None
            if token["max_uses"] is not None:
                # A limited token has max_uses slots; claiming one is a create-if-absent
                # like an IP, so concurrent joiners do not serialise on the token.
                slot = await self.tokens.free_slot(token)
                compare.append(tx.Create(ks.token_slot(token["id"], slot)) == 0)
            success = [
                tx.Put(ks.ip(net.id, str(address)), host_id.encode()),
                tx.Put(ks.hostname(net.id, name), host_id.encode()),
                tx.Put(ks.public_key(net.id, key_hex), host_id.encode()),
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
            ok, _ = await self.etcd.txn(compare, success)
            if ok:
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
            # Most likely another controller took this address (it stays marked); if
            # not, something else changed (a name, the key): read everything again.
            fresh = await self.etcd.get(ks.ip(net.id, str(address))) is None
            return LOST

        return await retry("join", attempt, "too many concurrent joins, try again")

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
        token, _ = await self.tokens.check(req.token, new_host=False)
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
        token, _ = await self.tokens.check(req.token, new_host=False)
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
