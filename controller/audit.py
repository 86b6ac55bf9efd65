"""The audit log: who changed what, when — in etcd (shared by all replicas) and in the
structured log. Entries expire with a daily etcd lease after ``retention`` seconds."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

from aetcd import transactions as tx

from cladnet.ratelimit import RateLimiter
from controller import keyspace as ks
from controller.etcd import DailyLease, Etcd
from controller.paging import read_page
from controller.store.txn import TXN_CHUNK
from controller.telemetry import AUDIT_NOT_STORED

log = logging.getLogger("cladnet.audit")

# Host telemetry that is not an operator action and would flood the log.
QUIET_SUFFIXES = ("/heartbeat", "/status", "/endpoints", "/metrics-credentials")

# Entries one host credential may add to etcd: a stolen VM that loops on refused calls
# must not fill etcd (30 days of entries) either. Past it, the log line is the record.
HOST_ENTRIES_PER_SECOND = 1.0
HOST_ENTRIES_BURST = 60.0


def is_audited(method: str, path: str, route_matched: bool, who: str | None, status: int) -> bool:
    """Mutating calls by an authenticated caller to a known route, except the hosts'
    own high-frequency reports. Anonymous calls are never stored: anyone could fill
    etcd with them (a 401 is anonymous even when the route named a caller, as a join
    with a made-up token does)."""
    return (
        who is not None
        and route_matched
        and status != 401
        and method in ("POST", "PUT", "PATCH", "DELETE")
        and not path.endswith(QUIET_SUFFIXES)
    )


class AuditLog:
    """Audit entries in etcd. Entries recorded while a write is under way go out
    together in the next one (a transaction of up to TXN_CHUNK puts): a burst of audited
    calls, such as a fleet joining, costs etcd a few writes, not one per call. Each
    ``record`` still returns only once its entry is stored."""

    def __init__(self, etcd: Etcd, retention: float = 30 * 86400) -> None:
        self.etcd, self.retention = etcd, retention
        self._lease = DailyLease(etcd, retention)
        self._per_host = RateLimiter(HOST_ENTRIES_PER_SECOND, HOST_ENTRIES_BURST)
        self._pending: list[tuple[bytes, bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(
        self,
        who: str,
        method: str,
        path: str,
        status: int,
        source: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Log and store one call; ``detail``: what the route chose to add (a command)."""
        now = time.time()
        entry: dict[str, Any] = {
            "ts": now,
            "who": who,
            "method": method,
            "path": path,
            "status": status,
            "source": source,
        }
        if detail:
            entry["detail"] = detail
        if who.startswith("host:") and self._per_host.hit(who, time.monotonic()) > 0:
            AUDIT_NOT_STORED.inc()
            log.info("audit", extra={**entry, "stored": False})
            return
        log.info("audit", extra=entry)
        key = ks.audit(f"{int(now * 1e6):020d}-{secrets.token_hex(3)}")
        stored = asyncio.get_running_loop().create_future()
        self._pending.append((key, json.dumps(entry).encode(), stored))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="audit-writer")
        try:
            await stored
        except Exception as exc:  # the log line above is the fallback record
            log.warning("audit entry not stored in etcd", extra={"error": repr(exc)})

    async def _write(self) -> None:
        """Store the pending entries, TXN_CHUNK per transaction, until none is left."""
        batch: list[tuple[bytes, bytes, asyncio.Future[None]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:TXN_CHUNK], self._pending[TXN_CHUNK:]
                try:
                    lease = await self._lease.current(time.time())
                    await self.etcd.txn([], [tx.Put(k, v, lease=lease) for k, v, _ in batch])
                except Exception as exc:
                    _settle(batch, exc)
                else:
                    _settle(batch, None)
        finally:
            self._writer = None
            # Cancelled (at shutdown): nobody waits forever.
            _settle(batch + self._pending, RuntimeError("the audit writer stopped"))
            self._pending = []

    async def recent(self, limit: int, after: str | None = None) -> tuple[list[Any], str | None]:
        """Up to ``limit`` entries, newest first, older than ``after``'s (a continue token);
        and the token of the next page, if any (etcd sends no more than ``limit``)."""
        page = await read_page(self.etcd, ks.prefix("audit"), limit, after, descend=True)
        return [json.loads(kv.value) for kv in page.kvs], page.continue_token


def _settle(batch: list[tuple[bytes, bytes, asyncio.Future[None]]], exc: Exception | None) -> None:
    """Answer the ``record`` calls waiting for ``batch``: stored, or failed with ``exc``."""
    for *_, stored in batch:
        if stored.done():
            continue
        if exc is None:
            stored.set_result(None)
        else:
            stored.set_exception(exc)
