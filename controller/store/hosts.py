"""Hosts after they joined: their credential, their peer record's changes (heartbeats,
endpoint updates, tags), and leaving."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aetcd import transactions as tx

from cladnet import keys, tokens
from cladnet.models import EndpointsUpdate, Heartbeat, Peer
from controller import keyspace as ks
from controller.errors import not_found
from controller.etcd import Etcd
from controller.store import publickeys
from controller.store.joins import AddressHints
from controller.store.liveness import Liveness
from controller.store.networks import Networks
from controller.store.txn import LOST, Lost, dump, retry

log = logging.getLogger("cladnet.controller.store")


@dataclass
class Credential:
    """A verified agent credential: the host it belongs to."""

    host_id: str
    network_id: str


class Hosts:
    """Registered hosts: their records, peers and the indexes they hold."""

    def __init__(
        self, etcd: Etcd, networks: Networks, liveness: Liveness, addresses: AddressHints
    ) -> None:
        self.etcd, self.networks = etcd, networks
        self.liveness, self.addresses = liveness, addresses

    async def authenticate(self, token: str) -> Credential | None:
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

    async def load(self, host_id: str) -> tuple[dict[str, Any], Any]:
        """The host record and its current peer KV."""
        host_kv = await self.etcd.get(ks.host(host_id))
        if host_kv is None:
            raise not_found("host", host_id)
        host = json.loads(host_kv.value)
        peer_kv = await self.etcd.get(ks.peer(host["network_id"], host_id))
        if peer_kv is None:
            raise not_found("host", host_id)
        return host, peer_kv

    async def ids(self) -> set[str]:
        """Every host of every network (what may keep a broker user)."""
        res = await self.etcd.get_prefix(ks.prefix("hosts"), keys_only=True)
        return {ks.last_segment(kv.key) for kv in res}

    async def _update_peer(self, host_id: str, changes: dict[str, Any]) -> tuple[Peer, bool]:
        """Apply ``changes`` to a peer with a compare-and-swap; write only if something
        changed. A moved public address is noted in the host's liveness record after."""

        async def attempt() -> tuple[Peer, set[str]] | Lost:
            host, peer_kv = await self.load(host_id)
            peer = Peer.model_validate_json(peer_kv.value)
            current = peer.model_dump()
            changed = {k: v for k, v in changes.items() if v is not None and current[k] != v}
            if not changed:
                return peer, set()
            net_id = host["network_id"]
            if "public_address" in changed and current["public_address"]:
                # The host's NAT moved: what the relays saw of its mapping was at the old
                # address. Forgotten here, its pairs take their relays at once (which see
                # it anew) instead of trying a mapping that no longer exists.
                changed |= {"reflexive": [], "mapping_varies": False}
            updated = peer.model_copy(update={**changed, "updated_at": time.time()})
            compare = [tx.Mod(ks.peer(net_id, host_id)) == peer_kv.mod_revision]
            success = [tx.Put(ks.peer(net_id, host_id), dump(updated))]
            if "public_key" in changed:  # the new key must be no other host's
                index = ks.public_key(net_id, keys.key_to_hex(updated.public_key))
                if await self.etcd.get(index) is not None:
                    raise publickeys.key_in_use(await self.networks.get(net_id))
                compare.append(tx.Create(index) == 0)
                success.append(tx.Put(index, host_id.encode()))
                released = await publickeys.release(self.etcd, net_id, host_id, peer.public_key)
                compare += released[0]
                success += released[1]
            ok, _ = await self.etcd.txn(compare, success)
            if not ok:
                return LOST
            log.info("peer updated", extra={"host": host_id, "fields": sorted(changed)})
            return updated, set(changed)

        peer, changed = await retry("update_peer", attempt, "host changed concurrently, try again")
        if "public_address" in changed:
            await self.liveness.merge(
                peer.network_id, host_id, {"public_address_changed_at": time.time()}
            )
        return peer, bool(changed)

        return await retry("update_peer", attempt, "host changed concurrently, try again")

    async def heartbeat(self, host_id: str, req: Heartbeat, observed: str) -> tuple[Peer, bool]:
        """Record liveness; update the peer (and so wake watchers) only when an address moved."""
        peer, changed = await self._update_peer(
            host_id,
            {
                "addresses": req.addresses,
                "listen_port": req.listen_port,
                "public_address": observed,
            },
        )
        await self.liveness.seen(peer.network_id, host_id, changed)
        return peer, changed

    async def update_endpoints(self, host_id: str, req: EndpointsUpdate, observed: str) -> Peer:
        """The agent's own report of its addresses, port, key and endpoints."""
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

    async def set_tags(self, host_id: str, tags: list[str]) -> Peer:
        """Replace a host's tags (an admin's call: policies trust them)."""
        peer, _ = await self._update_peer(host_id, {"tags": tags})
        return peer

    async def leave(self, host_id: str) -> Peer:
        """Remove a host and release its overlay IP, hostname and key — once: of two
        concurrent leaves one succeeds, the other finds no host (404)."""

        async def attempt() -> Peer | Lost:
            host_kv = await self.etcd.get(ks.host(host_id))
            if host_kv is None:
                raise not_found("host", host_id)
            net_id = json.loads(host_kv.value)["network_id"]
            peer_kv = await self.etcd.get(ks.peer(net_id, host_id))
            if peer_kv is None:
                raise not_found("host", host_id)
            peer = Peer.model_validate_json(peer_kv.value)
            key_compare, key_ops = await publickeys.release(
                self.etcd, net_id, host_id, peer.public_key
            )
            # Both records as read: the name, address and key deleted are still this
            # host's, not those of a host that took them after it left.
            ok, _ = await self.etcd.txn(
                compare=[
                    tx.Mod(ks.host(host_id)) == host_kv.mod_revision,
                    tx.Mod(ks.peer(net_id, host_id)) == peer_kv.mod_revision,
                    *key_compare,
                ],
                success=[
                    *key_ops,
                    tx.Delete(ks.challenge(net_id, host_id)),
                    tx.Delete(ks.peer(net_id, host_id)),
                    tx.Delete(ks.liveness(net_id, host_id)),
                    tx.Delete(ks.ip(net_id, peer.overlay_ip)),
                    tx.Delete(ks.hostname(net_id, peer.name)),
                    tx.Delete(ks.host(host_id)),
                ],
            )
            return peer if ok else LOST

        peer = await retry("leave", attempt, "host changed concurrently, try again")
        self.liveness.forget(host_id)
        self.addresses.release(peer.network_id, peer.overlay_ip)
        log.info("host left", extra={"host": host_id, "network_id": peer.network_id})
        return peer
