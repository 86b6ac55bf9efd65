"""One replica at a time runs the background jobs: an etcd lease-based election.

The leader holds ``/cladnet/leader/<name>`` attached to its lease and refreshes the
lease every TTL/3. If it dies, the lease expires and another replica's create-if-
absent transaction wins within one TTL. No home-made consensus: etcd decides.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

from aetcd import transactions as tx

from cladnet.tasks import cancel_and_wait
from controller import keyspace as ks
from controller.etcd import Etcd

log = logging.getLogger("cladnet.controller.leader")

Job = Callable[[], Coroutine[Any, Any, None]]


class Leadership:
    """Campaign forever; while leading, run ``job`` (cancelled when leadership is lost)."""

    def __init__(self, etcd: Etcd, name: str, job: Job, ttl: int = 10) -> None:
        self.etcd, self.name, self.job, self.ttl = etcd, name, job, ttl
        self.identity = secrets.token_hex(6)
        self.leading = False

    async def _try_lead(self) -> object | None:
        lease = await self.etcd.call(lambda c: c.lease(self.ttl))
        key = ks.leader(self.name)
        ok, _ = await self.etcd.txn(
            compare=[tx.Version(key) == 0],
            success=[tx.Put(key, self.identity.encode(), lease)],
        )
        if ok:
            return lease
        await self.etcd.call(lambda c: c.revoke_lease(lease.id))
        return None

    async def _hold(self, lease: object) -> None:
        """Refresh the lease until that fails; then leadership is gone."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            responses = await self.etcd.call(lambda c: c.refresh_lease(lease.id))  # type: ignore[attr-defined]
            ttl = getattr(responses, "TTL", None)
            if ttl is not None and ttl <= 0:
                return

    async def run(self) -> None:
        while True:
            try:
                lease = await self._try_lead()
                if lease is None:
                    await asyncio.sleep(self.ttl / 3)
                    continue
                self.leading = True
                log.info("leading background jobs", extra={"job": self.name, "me": self.identity})
                job = asyncio.create_task(self.job())
                hold = asyncio.create_task(self._hold(lease))
                await asyncio.wait({job, hold}, return_when=asyncio.FIRST_COMPLETED)
                await cancel_and_wait([job, hold], Exception)
                log.warning("stopped leading", extra={"job": self.name})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd trouble: campaign again after a pause
                log.warning("leader election error", extra={"error": repr(exc)})
                await asyncio.sleep(self.ttl / 3)
            finally:
                self.leading = False
