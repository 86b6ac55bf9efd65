"""Relays in etcd: registration on a lease, and the relay-written fields of peer records.

/cladnet/relays/<relay_id>   {"id", "address", "port_min", "port_max"} on the relay's
                             lease: it vanishes within the lease TTL when the relay dies,
                             and the other relays take its pairs over.

A relay writes three fields of a peer record (``reflexive``, ``mapping_varies``,
``relays``) with a compare-and-swap, only when they change, so the peers' watch wakes
only on a real change of path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aetcd import transactions as tx

from cladnet.paths import Relay
from controller import keyspace as ks
from controller.etcd import Etcd

log = logging.getLogger("cladnet.relay")

RELAYS = ks.prefix("relays")
RELAY_FIELDS = ("reflexive", "mapping_varies", "relays")
MAX_ATTEMPTS = 5


def relay_key(relay_id: str) -> bytes:
    return RELAYS + relay_id.encode()


async def register(etcd: Etcd, relay: Relay, ttl: int) -> Any:
    """Put the relay's record on a new lease of ``ttl`` seconds; returns the lease."""
    lease = await etcd.call(lambda c: c.lease(ttl))
    record = json.dumps(
        {
            "id": relay.id,
            "address": relay.address,
            "port_min": relay.port_min,
            "port_max": relay.port_max,
        }
    ).encode()
    await etcd.call(lambda c: c.put(relay_key(relay.id), record, lease=lease))
    return lease


async def live_relays(etcd: Etcd) -> list[Relay]:
    """Every registered relay (a malformed record is skipped)."""
    out = []
    for kv in await etcd.get_prefix(RELAYS):
        try:
            r = json.loads(kv.value)
            out.append(
                Relay(str(r["id"]), str(r["address"]), int(r["port_min"]), int(r["port_max"]))
            )
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed relay record", extra={"key": kv.key.decode()})
    return out


async def all_peers(etcd: Etcd) -> list[dict[str, Any]]:
    """Every peer record of every network (each network's policy key is not a peer)."""
    kvs = await etcd.get_prefix(ks.prefix("peers"))
    return [json.loads(kv.value) for kv in kvs if not ks.is_policy(kv.key)]


async def update_peer(
    etcd: Etcd,
    net_id: str,
    host_id: str,
    change: Callable[[dict[str, Any]], dict[str, Any] | None],
) -> bool:
    """Apply ``change`` (record → relay fields to set, or None) with a compare-and-swap.

    Only :data:`RELAY_FIELDS` may change; True when something was written.
    """
    key = ks.peer(net_id, host_id)
    for _ in range(MAX_ATTEMPTS):
        kv = await etcd.get(key)
        if kv is None:
            return False  # the host left meanwhile
        record = json.loads(kv.value)
        fields = change(record)
        if not fields:
            return False
        fields = {k: v for k, v in fields.items() if k in RELAY_FIELDS and record.get(k) != v}
        if not fields:
            return False
        updated = {**record, **fields, "updated_at": time.time()}
        ok, _ = await etcd.txn(
            [tx.Mod(key) == kv.mod_revision], [tx.Put(key, json.dumps(updated).encode())]
        )
        if ok:
            log.info("peer path data updated", extra={"host": host_id, "fields": sorted(fields)})
            return True
    log.warning("peer changed concurrently; retrying on the next pass", extra={"host": host_id})
    return False
