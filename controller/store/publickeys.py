"""The public-key index: a WireGuard key belongs to at most one host of a network."""

from __future__ import annotations

import logging
from typing import Any

from aetcd import transactions as tx

from cladnet import keys
from cladnet.models import Network, Peer
from controller import keyspace as ks
from controller.errors import ApiError, conflict
from controller.etcd import Etcd

log = logging.getLogger("cladnet.controller.store")


def key_in_use(net: Network) -> ApiError:
    """409: the key is another host's."""
    return conflict(
        "key_in_use",
        f"another host of network {net.name} has this public key; "
        "a host that holds its private key re-joins with a proof (POST /v1/join/challenge)",
    )


async def release(
    etcd: Etcd, net_id: str, host_id: str, public_key: str
) -> tuple[list[Any], list[Any]]:
    """The compares and operations that free a host's old key for others, if the host
    holds its index (and still does when the transaction runs)."""
    index = ks.public_key(net_id, keys.key_to_hex(public_key))
    owner = await etcd.get(index)
    if owner is None or owner.value.decode() != host_id:
        return [], []
    return [tx.Mod(index) == owner.mod_revision], [tx.Delete(index)]


async def index_public_keys(etcd: Etcd) -> int:
    """Index the keys of hosts that joined before keys were unique (idempotent, run at
    start); returns how many were added. Of two hosts that share a key, the first
    indexed keeps it and the other is logged (it must re-key through its agent)."""
    indexed = {kv.key for kv in await etcd.get_prefix(ks.prefix("public-keys"), keys_only=True)}
    added = 0
    for kv in await etcd.get_prefix(ks.prefix("peers")):
        if ks.is_policy(kv.key):
            continue
        peer = Peer.model_validate_json(kv.value)
        index = ks.public_key(peer.network_id, keys.key_to_hex(peer.public_key))
        if index in indexed:
            continue
        ok, _ = await etcd.txn(
            compare=[tx.Create(index) == 0, tx.Mod(kv.key) == kv.mod_revision],
            success=[tx.Put(index, peer.id.encode())],
        )
        if ok:
            indexed.add(index)
            added += 1
        else:
            log.warning("public key not indexed: shared or changed", extra={"host": peer.id})
    return added
