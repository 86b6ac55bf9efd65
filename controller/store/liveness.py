"""Liveness: when a host was last seen and when its public address last moved — kept
apart from its peer record, so heartbeats do not wake the watchers, and nothing else
(telemetry goes to the collector)."""

from __future__ import annotations

import json
import time
from typing import Any

from aetcd import transactions as tx

from controller import keyspace as ks
from controller.errors import not_found
from controller.etcd import Etcd
from controller.store.txn import LOST, Lost, dump, retry, unchanged

# The agents' heartbeat is 10 s; liveness is written at most this often per host.
LIVENESS_EVERY = 5.0
LIVENESS_FIELDS = ("last_seen", "public_address_changed_at")


class Liveness:
    """Hosts' liveness records, and when this controller last wrote each one's last_seen."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        # host id → when this controller last wrote its last_seen (monotonic).
        self._seen_written: dict[str, float] = {}

    async def merge(self, net_id: str, host_id: str, fields: dict[str, Any]) -> None:
        """Merge ``fields`` into the host's liveness record, keeping what others wrote in
        the meantime (a heartbeat's last_seen, an update's public_address_changed_at):
        written only if the record is as read and the host is still there."""
        key, peer = ks.liveness(net_id, host_id), ks.peer(net_id, host_id)

        async def attempt() -> Lost | None:
            _, (live_kv, peer_kv) = await self.etcd.txn([], [tx.Get(key), tx.Get(peer)])
            if not peer_kv:  # left: no orphaned record
                raise not_found("host", host_id)
            record = json.loads(live_kv[0][0]) if live_kv else {}
            record.update(fields)
            kept = {k: v for k, v in record.items() if k in LIVENESS_FIELDS}
            ok, _ = await self.etcd.txn(
                compare=[
                    unchanged(key, live_kv[0][1] if live_kv else None),
                    tx.Create(peer) == peer_kv[0][1].create_revision,
                ],
                success=[tx.Put(key, dump(kept))],
            )
            return None if ok else LOST

        await retry("liveness", attempt, "host changed concurrently, try again")

    async def seen(self, net_id: str, host_id: str, changed: bool) -> None:
        """Record that the host was seen now: at most once per ``LIVENESS_EVERY`` per host
        (by this controller) unless something ``changed``, so a host that heartbeats
        faster costs no more etcd writes."""
        now = time.monotonic()
        if changed or now - self._seen_written.get(host_id, -LIVENESS_EVERY) >= LIVENESS_EVERY:
            self._seen_written[host_id] = now
            await self.merge(net_id, host_id, {"last_seen": time.time()})

    def forget(self, host_id: str) -> None:
        """The host left: drop what this controller keeps about it."""
        self._seen_written.pop(host_id, None)
