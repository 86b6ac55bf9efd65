"""Liveness: when a host was last seen and when its public address last moved — kept
apart from its peer record, so heartbeats do not wake the watchers, and nothing else
(telemetry goes to the collector)."""

from __future__ import annotations

import json
import time
from typing import Any

from controller import keyspace as ks
from controller.etcd import Etcd
from controller.store.txn import dump

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
        """Merge ``fields`` into the host's liveness record."""
        key = ks.liveness(net_id, host_id)
        kv = await self.etcd.get(key)
        record = json.loads(kv.value) if kv is not None else {}
        record.update(fields)
        kept = {k: v for k, v in record.items() if k in LIVENESS_FIELDS}
        await self.etcd.put(key, dump(kept))

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
