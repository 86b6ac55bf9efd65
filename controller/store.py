"""The controller's state in etcd: networks, join tokens, hosts, peers.

Every write that must be unique is one etcd transaction guarded by
``create_revision == 0`` (a name, an overlay IP) or by "nothing in this range
changed since I read it" (a network CIDR must not overlap another). Losers of a
race re-read and retry; nothing is read-then-written without a guard.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aetcd import rpc
from aetcd import transactions as tx

from cladnet import addrspace, ipam, keys, tokens
from cladnet.models import (
    AddressSpaceBlock,
    AddressSpaces,
    ChallengeRequest,
    ChallengeResponse,
    EndpointsUpdate,
    Heartbeat,
    Host,
    JoinRequest,
    JoinToken,
    JoinTokenCreated,
    Network,
    NetworkCreate,
    Peer,
    TokenCreate,
)
from controller import keyspace as ks
from controller.errors import ApiError, bad_request, conflict, not_found
from controller.etcd import Etcd, prefix_end
from controller.telemetry import TXN_RETRIES

log = logging.getLogger("cladnet.controller.store")

MAX_TXN_ATTEMPTS = 64
IP_HINT_SECONDS = 10.0  # how stale the address hint may be (freed addresses reused after)
# The agents' heartbeat is 10 s; liveness is written at most this often per host.
LIVENESS_EVERY = 5.0
LIVENESS_FIELDS = ("last_seen", "public_address_changed_at")
# etcd rejects transactions with more operations than --max-txn-ops (default 128).
TXN_CHUNK = 100
CHALLENGE_SECONDS = 60.0  # how long a key challenge may be answered
MAX_SUFFIXED_NAME = 240  # longer names are not given a -N suffix (hostnames stop at 253)


def _dump(model: Any) -> bytes:
    if isinstance(model, dict):
        return json.dumps(model, separators=(",", ":")).encode()
    return model.model_dump_json().encode()


def _subnets_of(kv: Any) -> list[ipaddress.IPv4Network]:
    """The underlay subnets of a key under the peers prefix (a policy key has none: it
    is kept, empty, so the key count still matches)."""
    if ks.is_policy(kv.key):
        return []
    return _underlay_networks(json.loads(kv.value)["addresses"])


def _underlay_networks(addresses: list[str]) -> list[ipaddress.IPv4Network]:
    return [ipaddress.ip_interface(a).network for a in addresses]  # type: ignore[misc]


@dataclass
class Credential:
    """A verified agent credential: the host it belongs to."""

    host_id: str
    network_id: str


@dataclass
class Joined:
    """A join's outcome: the host's peer record, its fresh credential, its network, and
    the hostname it asked for when it got another (``web`` → ``web-2``)."""

    peer: Peer
    credential: str
    network: Network
    renamed_from: str | None


def _key_in_use(net: Network) -> ApiError:
    return conflict(
        "key_in_use",
        f"another host of network {net.name} has this public key; "
        "a host that holds its private key re-joins with a proof (POST /v1/join/challenge)",
    )


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


class Store:
    """All controller reads and writes to etcd."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        # network id → (when read, overlay addresses in use as ints): a hint for picking
        # an address, so a join does not list every address of its network (that list
        # was most of a join's CPU at a few thousand hosts). The transaction's compare
        # on the address key stays what guarantees uniqueness.
        self._used_ips: dict[str, tuple[float, set[int]]] = {}
        # Hosts' creation times (never change) by network: list_hosts reads the host
        # records of new hosts only, not every host of every network.
        self._created: dict[str, dict[str, float]] = {}
        # Every host's underlay subnets (peer key → subnets) as of ``_underlay_rev``;
        # network creation brings it up to date with what changed since.
        self._underlay: dict[bytes, list[ipaddress.IPv4Network]] = {}
        self._underlay_rev = 0
        # host id → when this controller last wrote its last_seen (monotonic).
        self._seen_written: dict[str, float] = {}

    # --- networks -----------------------------------------------------------------------

    async def list_networks(self) -> tuple[list[Network], int]:
        """All networks and the etcd revision they were read at."""
        res = await self.etcd.get_prefix(ks.prefix("networks"))
        return [Network.model_validate_json(kv.value) for kv in res], res.header.revision

    async def get_network(self, ref: str) -> Network:
        """A network by id or by name."""
        kv = await self.etcd.get(ks.network(ref))
        if kv is None:
            by_name = await self.etcd.get(ks.network_name(ref))
            if by_name is not None:
                kv = await self.etcd.get(ks.network(by_name.value.decode()))
        if kv is None:
            raise not_found("network", ref)
        return Network.model_validate_json(kv.value)

    async def _used_cidrs(self) -> tuple[list[Network], list[ipaddress.IPv4Network], int]:
        """Networks, every CIDR in use (networks + hosts' underlay), and the read revision."""
        networks, revision = await self.list_networks()
        used = [ipaddress.IPv4Network(n.cidr) for n in networks]
        for subnets in (await self._underlay_subnets()).values():
            used.extend(subnets)
        return networks, used, revision

    async def _underlay_subnets(self) -> dict[bytes, list[ipaddress.IPv4Network]]:
        """Every host's underlay subnets, read whole only when a host left since last time.

        Peers written since the cached revision come with ``min_mod_revision``; a count
        of all peers tells whether any left (they are then read again, once).
        """
        prefix = ks.prefix("peers")
        if self._underlay_rev:
            # Both at one revision, so an add and a leave in between cannot cancel out.
            (changed, total), revision = await self.etcd.ranges(
                [
                    rpc.RangeRequest(
                        key=prefix,
                        range_end=prefix_end(prefix),
                        min_mod_revision=self._underlay_rev + 1,
                    ),
                    rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True),
                ]
            )
            added = sum(1 for kv in changed.kvs if kv.key not in self._underlay)
            if total.count == len(self._underlay) + added:
                for kv in changed.kvs:
                    self._underlay[kv.key] = _subnets_of(kv)
                self._underlay_rev = revision
                return self._underlay
        res = await self.etcd.get_prefix(prefix)
        self._underlay = {kv.key: _subnets_of(kv) for kv in res}
        self._underlay_rev = res.header.revision
        return self._underlay

    async def address_spaces(self, hosts: int) -> AddressSpaces:
        """Free RFC 1918 space grouped by block, and one recommended prefix for ``hosts``."""
        _, used, _ = await self._used_cidrs()
        plan = addrspace.plan_address_spaces(used, hosts)
        return AddressSpaces(
            hosts=hosts,
            prefix_len=plan.prefix_len,
            recommended=str(plan.recommended) if plan.recommended else None,
            blocks=[
                AddressSpaceBlock(
                    block=str(b.block),
                    free=[str(c) for c in b.free],
                    free_addresses=b.free_addresses,
                )
                for b in plan.blocks
            ],
            used=len(used),
        )

    def _check_cidr(
        self, req: NetworkCreate, networks: list[Network], used: list[ipaddress.IPv4Network]
    ) -> ipaddress.IPv4Network:
        assert req.cidr is not None  # NetworkCreate checked it is a private IPv4 CIDR
        cidr = ipaddress.IPv4Network(req.cidr)
        for net in networks:
            if cidr.overlaps(ipaddress.IPv4Network(net.cidr)):
                raise conflict(
                    "cidr_overlaps_network", f"{cidr} overlaps network {net.name} ({net.cidr})"
                )
        clash = addrspace.find_overlap(cidr, used)
        if clash is not None:
            raise conflict(
                "cidr_overlaps_underlay",
                f"{cidr} overlaps the underlay subnet {clash} of a registered host",
            )
        if ipam.capacity(cidr) < req.expected_hosts:
            raise bad_request(
                "cidr_too_small",
                f"{cidr} holds {ipam.capacity(cidr)} hosts, "
                f"fewer than the expected {req.expected_hosts}",
            )
        return cidr

    async def create_network(self, req: NetworkCreate) -> Network:
        """Create a network; the name is unique and the CIDR overlaps nothing in use."""
        for _ in range(MAX_TXN_ATTEMPTS):
            networks, used, revision = await self._used_cidrs()
            if any(n.name == req.name for n in networks):
                raise conflict("network_exists", f"a network named {req.name!r} already exists")
            if req.cidr is not None:
                cidr = self._check_cidr(req, networks, used)
            else:
                plan = addrspace.plan_address_spaces(used, req.expected_hosts)
                if plan.recommended is None:
                    raise conflict("no_address_space", "no free private address space is left")
                cidr = plan.recommended
            net = Network(
                id=tokens.new_id("n-"),
                name=req.name,
                cidr=str(cidr),
                expected_hosts=req.expected_hosts,
                mtu=req.mtu,
                listen_port=req.listen_port,
                keepalive=req.keepalive,
                metrics_interval=req.metrics_interval,
                dns_zone=req.dns_zone,
                created_at=time.time(),
            )
            nets = ks.prefix("networks")
            ok, _ = await self.etcd.txn(
                compare=[
                    tx.Create(ks.network_name(req.name)) == 0,
                    # No network was created or changed since we checked for overlaps.
                    tx.Mod(nets, prefix_end(nets)) < revision + 1,
                ],
                success=[
                    tx.Put(ks.network(net.id), _dump(net)),
                    tx.Put(ks.network_name(net.name), net.id.encode()),
                ],
            )
            if ok:
                log.info("network created", extra={"network": net.name, "cidr": net.cidr})
                return net
            TXN_RETRIES.labels("create_network").inc()
        raise ApiError(503, "contention", "too many concurrent network changes, try again")

    async def delete_network(self, ref: str, force: bool) -> Network:
        """Delete a network; one with hosts needs ``force`` and takes its hosts with it.

        The network's own keys go last, in one transaction: a deletion cut short (the
        replica killed between chunks) leaves the network in place, and a retry on any
        replica finds what is left and finishes it.
        """
        net = await self.get_network(ref)
        peers_prefix = ks.prefix("peers", net.id)
        for _ in range(MAX_TXN_ATTEMPTS):
            peers = await self.etcd.get_prefix(peers_prefix, keys_only=True)
            host_ids = [ks.last_segment(kv.key) for kv in peers if not ks.is_policy(kv.key)]
            if host_ids and not force:
                raise conflict(
                    "network_has_hosts",
                    f"network {net.name} has {len(host_ids)} host(s); delete with force=true",
                )
            # Tokens first: no new join starts while we clean up.
            token_ids = [t.id for t in await self.list_tokens(net.id)]
            ops: list[Any] = [tx.Delete(ks.token(t)) for t in token_ids]
            for t in token_ids:
                p = ks.prefix("token-uses", t)
                ops.append(tx.Delete(p, prefix_end(p)))
            ops += [tx.Delete(ks.host(h)) for h in host_ids]
            for i in range(0, len(ops), TXN_CHUNK):
                await self.etcd.txn(compare=[], success=ops[i : i + TXN_CHUNK])
            last: list[Any] = []
            for kind in ("ips", "hostnames", "public-keys", "challenges", "liveness", "peers"):
                p = ks.prefix(kind, net.id)
                last.append(tx.Delete(p, prefix_end(p)))
            last += [tx.Delete(ks.network(net.id)), tx.Delete(ks.network_name(net.name))]
            # Unless a join or re-join already under way wrote a host record meanwhile
            # (it would be orphaned): it changed a peer too, so then round again.
            ok, _ = await self.etcd.txn(
                compare=[
                    tx.Mod(peers_prefix, prefix_end(peers_prefix)) < peers.header.revision + 1
                ],
                success=last,
            )
            if ok:
                log.info("network deleted", extra={"network": net.name, "hosts": len(host_ids)})
                return net
            TXN_RETRIES.labels("delete_network").inc()
        raise ApiError(503, "contention", "too many concurrent joins, try again")

    # --- join tokens --------------------------------------------------------------------

    async def create_token(self, net_ref: str, req: TokenCreate) -> JoinTokenCreated:
        net = await self.get_network(net_ref)
        token_id = tokens.new_id()
        secret, digest = tokens.mint("clj", token_id)
        now = time.time()
        record = {
            "id": token_id,
            "network_id": net.id,
            "hash": digest,
            "expires_at": now + req.ttl_seconds,
            "max_uses": req.max_uses,
            "description": req.description,
            "created_at": now,
        }
        await self.etcd.put(ks.token(token_id), _dump(record))
        return JoinTokenCreated(token=secret, uses=0, **_public_token(record))

    async def list_tokens(self, net_id: str) -> list[JoinToken]:
        """The network's join tokens with their use counts (counted in one transaction)."""
        res = await self.etcd.get_prefix(ks.prefix("tokens"))
        records = [r for r in (json.loads(kv.value) for kv in res) if r["network_id"] == net_id]
        uses = await self.etcd.counts([ks.prefix("token-uses", r["id"]) for r in records])
        return [JoinToken(uses=n, **_public_token(r)) for r, n in zip(records, uses, strict=True)]

    async def revoke_token(self, net_ref: str, token_id: str) -> None:
        net = await self.get_network(net_ref)
        kv = await self.etcd.get(ks.token(token_id))
        if kv is None or json.loads(kv.value)["network_id"] != net.id:
            raise not_found("token", token_id)
        p = ks.prefix("token-uses", token_id)
        await self.etcd.txn(
            compare=[], success=[tx.Delete(ks.token(token_id)), tx.Delete(p, prefix_end(p))]
        )

    async def delete_expired_tokens(self, now: float) -> int:
        """Remove join tokens past their expiry (and their use records); returns how many."""
        removed = 0
        for kv in await self.etcd.get_prefix(ks.prefix("tokens")):
            record = json.loads(kv.value)
            if record["expires_at"] < now:
                p = ks.prefix("token-uses", record["id"])
                await self.etcd.txn(
                    compare=[tx.Mod(ks.token(record["id"])) == kv.mod_revision],
                    success=[tx.Delete(ks.token(record["id"])), tx.Delete(p, prefix_end(p))],
                )
                removed += 1
        return removed

    async def _free_slot(self, token: dict[str, Any]) -> int:
        """A random unclaimed use slot of a limited token, or 403 when none is left."""
        res = await self.etcd.get_prefix(ks.prefix("token-uses", token["id"]), keys_only=True)
        taken = {ks.last_segment(kv.key) for kv in res}
        slot = tokens.pick_slot(token["max_uses"], {int(t[5:]) for t in taken if t[:5] == "slot-"})
        if slot is None:
            raise ApiError(
                403,
                "token_exhausted",
                f"the join token was used {token['max_uses']} time(s) already",
            )
        return slot

    async def _token_uses(self, token_id: str) -> int:
        res = await self.etcd.range(ks.prefix("token-uses", token_id), count_only=True)
        return int(res.count)

    async def _check_join_token(
        self, token: str, new_host: bool = True
    ) -> tuple[dict[str, Any], int]:
        """The token record and its mod revision, or 401/403 with a reason. Only a new
        host uses up a limited token: a proven host re-joins with a used-up one."""
        parsed = tokens.parse(token)
        if parsed is None or parsed.kind != "clj":
            raise ApiError(401, "invalid_token", "not a join token")
        kv = await self.etcd.get(ks.token(parsed.id))
        if kv is None or not tokens.verify(parsed.secret, json.loads(kv.value)["hash"]):
            raise ApiError(401, "invalid_token", "unknown or revoked join token")
        record = json.loads(kv.value)
        if record["expires_at"] < time.time():
            raise ApiError(401, "token_expired", "the join token has expired")
        max_uses = record["max_uses"]
        if new_host and max_uses is not None and await self._token_uses(parsed.id) >= max_uses:
            raise ApiError(
                403, "token_exhausted", f"the join token was used {max_uses} time(s) already"
            )
        return record, kv.mod_revision

    # --- hosts --------------------------------------------------------------------------

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
        for _ in range(MAX_TXN_ATTEMPTS):
            token, _ = await self._check_join_token(req.token)
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
                raise _key_in_use(net)
            name, renamed_from = req.hostname, None
            if name_kv:
                name = await self._name_for_taken(req, net)
                renamed_from = req.hostname
            cidr = ipaddress.IPv4Network(net.cidr)
            used_ips = await self._addresses_in_use(net.id, fresh)
            address = ipam.pick_address(cidr, used_ips)
            if address is None and not fresh:
                # The hint may hold addresses freed since it was read.
                used_ips = await self._addresses_in_use(net.id, fresh=True)
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
            ]
            slot = None
            if token["max_uses"] is not None:
                # A limited token has max_uses slots; claiming one is a create-if-absent
                # like an IP, so concurrent joiners do not serialise on the token.
                slot = await self._free_slot(token)
                compare.append(tx.Create(ks.token_slot(token["id"], slot)) == 0)
            success = [
                tx.Put(ks.ip(net.id, str(address)), host_id.encode()),
                tx.Put(ks.hostname(net.id, name), host_id.encode()),
                tx.Put(ks.public_key(net.id, key_hex), host_id.encode()),
                tx.Put(ks.host(host_id), _dump(host)),
                tx.Put(ks.peer(net.id, host_id), _dump(peer)),
                tx.Put(ks.liveness(net.id, host_id), _dump({"last_seen": now})),
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
            TXN_RETRIES.labels("join").inc()
            # Most likely another controller took this address (it stays marked); if
            # not, something else changed (a name, the key): read everything again.
            fresh = await self.etcd.get(ks.ip(net.id, str(address))) is None
        raise ApiError(503, "contention", "too many concurrent joins, try again")

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

    async def _addresses_in_use(self, net_id: str, fresh: bool) -> set[int]:
        """The overlay addresses in use in a network, read at most IP_HINT_SECONDS ago
        unless ``fresh``; the set is shared, and picks are added to it."""
        cached = self._used_ips.get(net_id)
        if fresh or cached is None or time.monotonic() - cached[0] > IP_HINT_SECONDS:
            res = await self.etcd.get_prefix(ks.prefix("ips", net_id), keys_only=True)
            used = {int(ipaddress.IPv4Address(ks.last_segment(kv.key))) for kv in res}
            self._used_ips[net_id] = cached = (time.monotonic(), used)
        return cached[1]

    async def challenge(self, req: ChallengeRequest) -> ChallengeResponse:
        """A challenge for the holder of a registered key in the token's network.

        One open challenge per host (a new one replaces it), written only for a key
        that is registered and with a valid join token: nothing grows with requests.
        """
        token, _ = await self._check_join_token(req.token, new_host=False)
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
            success=[tx.Put(ks.challenge(net_id, host_id), _dump(record))],
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
        token, _ = await self._check_join_token(req.token, new_host=False)
        net = await self.get_network(token["network_id"])
        new_hex = keys.key_to_hex(req.public_key)
        for _ in range(MAX_TXN_ATTEMPTS):
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
            compare = [tx.Mod(ks.peer(net.id, host_id)) == peer_meta.mod_revision]
            success: list[Any] = []
            if vouched_host is None:
                _check_proof(req.proof, challenge_kv, peer)
                # Used once: consumed by this very transaction.
                compare.append(
                    tx.Mod(ks.challenge(net.id, host_id)) == challenge_kv[0][1].mod_revision
                )
                success.append(tx.Delete(ks.challenge(net.id, host_id)))
            if owner_kv and owner_kv[0][0].decode() != host_id:
                raise _key_in_use(net)
            if not owner_kv:
                compare.append(tx.Create(ks.public_key(net.id, new_hex)) == 0)
                success.append(tx.Put(ks.public_key(net.id, new_hex), host_id.encode()))
            if req.public_key != peer.public_key:
                success += await self._release_key(net.id, host_id, peer.public_key)
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
                tx.Put(ks.host(host_id), _dump(host)),
                tx.Put(ks.peer(net.id, host_id), _dump(peer)),
                tx.Put(ks.liveness(net.id, host_id), _dump({"last_seen": now})),
                # A limited token's slot was taken at the first join; unlimited ones
                # record every host that used them.
                *(
                    [tx.Put(ks.token_use(token["id"], host_id), str(now).encode())]
                    if token["max_uses"] is None
                    else []
                ),
            ]
            ok, _ = await self.etcd.txn(compare, success)
            if ok:
                log.info(
                    "host re-joined",
                    extra={
                        "host": host_id,
                        "network": net.name,
                        "by": "credential" if vouched_host else "key proof",
                    },
                )
                return Joined(peer, credential, net, None)
            TXN_RETRIES.labels("rejoin").inc()
        raise ApiError(503, "contention", "host changed concurrently, try again")

    async def index_public_keys(self) -> int:
        """Index the keys of hosts that joined before keys were unique (idempotent, run at
        start); returns how many were added. Of two hosts that share a key, the first
        indexed keeps it and the other is logged (it must re-key through its agent)."""
        indexed = {
            kv.key for kv in await self.etcd.get_prefix(ks.prefix("public-keys"), keys_only=True)
        }
        added = 0
        for kv in await self.etcd.get_prefix(ks.prefix("peers")):
            if ks.is_policy(kv.key):
                continue
            peer = Peer.model_validate_json(kv.value)
            index = ks.public_key(peer.network_id, keys.key_to_hex(peer.public_key))
            if index in indexed:
                continue
            ok, _ = await self.etcd.txn(
                compare=[tx.Create(index) == 0, tx.Mod(kv.key) == kv.mod_revision],
                success=[tx.Put(index, peer.id.encode())],
            )
            if ok:
                indexed.add(index)
                added += 1
            else:
                log.warning("public key not indexed: shared or changed", extra={"host": peer.id})
        return added

    async def _release_key(self, net_id: str, host_id: str, public_key: str) -> list[Any]:
        """The operations that free a host's old key for others (if it holds the index)."""
        index = ks.public_key(net_id, keys.key_to_hex(public_key))
        owner = await self.etcd.get(index)
        if owner is None or owner.value.decode() != host_id:
            return []
        return [tx.Delete(index)]

    async def authenticate_host(self, token: str) -> Credential | None:
        """The host a ``clh_`` credential belongs to, or None."""
        parsed = tokens.parse(token)
        if parsed is None or parsed.kind != "clh":
            return None
        kv = await self.etcd.get(ks.host(parsed.id))
        if kv is None:
            return None
        record = json.loads(kv.value)
        if not tokens.verify(parsed.secret, record["credential_hash"]):
            return None
        return Credential(host_id=record["id"], network_id=record["network_id"])

    async def _load_host(self, host_id: str) -> tuple[dict[str, Any], Any]:
        """The host record and its current peer KV."""
        host_kv = await self.etcd.get(ks.host(host_id))
        if host_kv is None:
            raise not_found("host", host_id)
        host = json.loads(host_kv.value)
        peer_kv = await self.etcd.get(ks.peer(host["network_id"], host_id))
        if peer_kv is None:
            raise not_found("host", host_id)
        return host, peer_kv

    async def _update_peer(self, host_id: str, changes: dict[str, Any]) -> tuple[Peer, bool]:
        """Apply ``changes`` to a peer with a compare-and-swap; write only if something changed."""
        for _ in range(MAX_TXN_ATTEMPTS):
            host, peer_kv = await self._load_host(host_id)
            peer = Peer.model_validate_json(peer_kv.value)
            current = peer.model_dump()
            changed = {k: v for k, v in changes.items() if v is not None and current[k] != v}
            if not changed:
                return peer, False
            if "public_address" in changed:
                await self._touch_liveness(peer, {"public_address_changed_at": time.time()})
            net_id = host["network_id"]
            updated = peer.model_copy(update={**changed, "updated_at": time.time()})
            compare = [tx.Mod(ks.peer(net_id, host_id)) == peer_kv.mod_revision]
            success = [tx.Put(ks.peer(net_id, host_id), _dump(updated))]
            if "public_key" in changed:  # the new key must be no other host's
                index = ks.public_key(net_id, keys.key_to_hex(updated.public_key))
                if await self.etcd.get(index) is not None:
                    raise _key_in_use(await self.get_network(net_id))
                compare.append(tx.Create(index) == 0)
                success.append(tx.Put(index, host_id.encode()))
                success += await self._release_key(net_id, host_id, peer.public_key)
            peer = updated
            ok, _ = await self.etcd.txn(compare, success)
            if ok:
                log.info("peer updated", extra={"host": host_id, "fields": sorted(changed)})
                return peer, True
            TXN_RETRIES.labels("update_peer").inc()
        raise ApiError(503, "contention", "host changed concurrently, try again")

    async def _touch_liveness(self, peer: Peer, fields: dict[str, Any]) -> None:
        """Merge ``fields`` into the host's liveness record: when it was last seen and when
        its public address last moved — nothing else (telemetry goes to the collector)."""
        key = ks.liveness(peer.network_id, peer.id)
        kv = await self.etcd.get(key)
        record = json.loads(kv.value) if kv is not None else {}
        record.update(fields)
        kept = {k: v for k, v in record.items() if k in LIVENESS_FIELDS}
        await self.etcd.put(key, _dump(kept))

    async def heartbeat(self, host_id: str, req: Heartbeat, observed: str) -> tuple[Peer, bool]:
        """Record liveness; update the peer (and so wake watchers) only when an address moved.

        ``last_seen`` is written at most once per ``LIVENESS_EVERY`` per host (by this
        controller): a host that heartbeats faster costs no more etcd writes.
        """
        peer, changed = await self._update_peer(
            host_id,
            {
                "addresses": req.addresses,
                "listen_port": req.listen_port,
                "public_address": observed,
            },
        )
        now = time.monotonic()
        if changed or now - self._seen_written.get(host_id, -LIVENESS_EVERY) >= LIVENESS_EVERY:
            self._seen_written[host_id] = now
            await self._touch_liveness(peer, {"last_seen": time.time()})
        return peer, changed

    async def update_endpoints(self, host_id: str, req: EndpointsUpdate, observed: str) -> Peer:
        peer, _ = await self._update_peer(
            host_id,
            {
                "addresses": req.addresses,
                "listen_port": req.listen_port,
                "public_key": req.public_key,
                "endpoints": req.endpoints,
                "public_address": observed,
            },
        )
        return peer

    async def leave(self, host_id: str) -> Peer:
        """Remove a host and release its overlay IP, hostname and key."""
        host, peer_kv = await self._load_host(host_id)
        peer = Peer.model_validate_json(peer_kv.value)
        net_id = host["network_id"]
        await self.etcd.txn(
            compare=[],
            success=[
                *await self._release_key(net_id, host_id, peer.public_key),
                tx.Delete(ks.challenge(net_id, host_id)),
                tx.Delete(ks.peer(net_id, host_id)),
                tx.Delete(ks.liveness(net_id, host_id)),
                tx.Delete(ks.ip(net_id, peer.overlay_ip)),
                tx.Delete(ks.hostname(net_id, peer.name)),
                tx.Delete(ks.host(host_id)),
            ],
        )
        self._seen_written.pop(host_id, None)
        if net_id in self._used_ips:  # free for the next join through this controller
            self._used_ips[net_id][1].discard(int(ipaddress.IPv4Address(peer.overlay_ip)))
        log.info("host left", extra={"host": host_id, "network_id": net_id})
        return peer

    async def host_ids(self) -> set[str]:
        """Every host of every network (what may keep a broker user)."""
        res = await self.etcd.get_prefix(ks.prefix("hosts"), keys_only=True)
        return {ks.last_segment(kv.key) for kv in res}

    async def list_peers(self, net_id: str) -> tuple[list[Peer], int]:
        peers, _, revision = await self.list_peers_and_policy(net_id)
        return peers, revision

    async def list_peers_and_policy(self, net_id: str) -> tuple[list[Peer], Any, int]:
        """The peers, the policy's KV (None if never written) and the revision: one read."""
        res = await self.etcd.get_prefix(ks.prefix("peers", net_id))
        peers = [Peer.model_validate_json(kv.value) for kv in res if not ks.is_policy(kv.key)]
        policy = next((kv for kv in res if ks.is_policy(kv.key)), None)
        return peers, policy, res.header.revision

    async def set_tags(self, host_id: str, tags: list[str]) -> Peer:
        """Replace a host's tags (an admin's call: policies trust them)."""
        peer, _ = await self._update_peer(host_id, {"tags": tags})
        return peer

    async def list_hosts(self, net_id: str, peers: list[Peer] | None = None) -> list[Host]:
        """The network's hosts (``peers``: only these of them, a page): peers with liveness
        and creation time (two range reads; the host records only of hosts this controller
        has not listed before)."""
        whole = peers is None
        if peers is None:
            peers, _ = await self.list_peers(net_id)
        live = await self.etcd.get_prefix(ks.prefix("liveness", net_id))
        liveness = {ks.last_segment(kv.key): json.loads(kv.value) for kv in live}
        known = self._created.get(net_id, {})
        created = {p.id: known[p.id] for p in peers if p.id in known}
        missing = [ks.host(p.id) for p in peers if p.id not in known]
        new = await self.etcd.get_many(missing) if missing else {}
        for value in new.values():
            record = json.loads(value)
            created[record["id"]] = record["created_at"]
        if whole:  # drops the removed hosts
            self._created[net_id] = created
        else:
            self._created.setdefault(net_id, {}).update(created)
        return [
            Host(
                **p.model_dump(),
                created_at=created.get(p.id, p.updated_at),
                **{k: v for k, v in liveness.get(p.id, {}).items() if k in Host.model_fields},
            )
            for p in peers
        ]

    async def get_host(self, host_id: str) -> Host:
        host, peer_kv = await self._load_host(host_id)
        peer = Peer.model_validate_json(peer_kv.value)
        kv = await self.etcd.get(ks.liveness(peer.network_id, host_id))
        live = json.loads(kv.value) if kv is not None else {}
        return Host(
            **peer.model_dump(),
            created_at=host["created_at"],
            **{k: v for k, v in live.items() if k in Host.model_fields},
        )


def _public_token(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "hash"}
