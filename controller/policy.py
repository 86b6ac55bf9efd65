"""A network's access policy in etcd: versioned, checked by its own tests on every write.

Stored at ``ks.policy(net_id)``, inside the peers prefix, as
``{"version", "updated_at", "document"}``. A network without one has the explicit
allow-all policy (version 0). Writes compare the key's mod_revision with the one
read, so two admins never silently overwrite each other; ``if_version`` lets a client
say which version its edit was based on.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aetcd import transactions as tx

from cladnet import policy as acl
from controller import keyspace as ks
from controller.errors import ApiError
from controller.etcd import Etcd
from controller.store import Store
from controller.telemetry import TXN_RETRIES

log = logging.getLogger("cladnet.controller.policy")

MAX_TXN_ATTEMPTS = 16


def record_of(kv: Any) -> dict[str, Any]:
    """The stored record of a policy KV, or the allow-all default when there is none."""
    if kv is None:
        return {"version": 0, "updated_at": None, "document": acl.ALLOW_ALL}
    record: dict[str, Any] = json.loads(kv.value)
    return record


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """What every member gets (in the watch): groups and rules, not the admins' tests."""
    document = record["document"]
    return {
        "version": record["version"],
        "document": {"groups": document.get("groups", {}), "rules": document.get("rules", [])},
    }


def admin_view(network_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """The whole policy, with whether it is the default and whether it allows everything."""
    parsed = acl.parse(record["document"])
    return {
        "network_id": network_id,
        "version": record["version"],
        "updated_at": record["updated_at"],
        "default": record["version"] == 0,
        "allows_all": parsed.allows_all,
        "policy": record["document"],
    }


def _parse(document: Any) -> acl.Policy:
    try:
        return acl.parse(document)
    except acl.PolicyError as exc:
        raise ApiError(400, "invalid_policy", str(exc)) from None


class PolicyStore:
    """Read, check and write network policies."""

    def __init__(self, etcd: Etcd, store: Store) -> None:
        self.etcd = etcd
        self.store = store

    async def get(self, net_id: str) -> dict[str, Any]:
        """The current record (the allow-all default if never written)."""
        return record_of(await self.etcd.get(ks.policy(net_id)))

    async def check(self, net_id: str, document: Any) -> tuple[acl.Policy, list[str]]:
        """Parse ``document`` (400 if invalid) and run its tests against the current hosts."""
        parsed = _parse(document)
        peers, _ = await self.store.list_peers(net_id)
        return parsed, acl.run_tests(parsed, [p.model_dump() for p in peers])

    async def put(self, net_id: str, document: Any, if_version: int | None) -> dict[str, Any]:
        """Write a new version; 422 with the failing tests, 409 if ``if_version`` is stale."""
        for _ in range(MAX_TXN_ATTEMPTS):
            kv = await self.etcd.get(ks.policy(net_id))
            current = record_of(kv)
            if if_version is not None and if_version != current["version"]:
                raise ApiError(
                    409,
                    "version_conflict",
                    f"the policy is at version {current['version']}, not {if_version}; "
                    "get it again and re-apply the change",
                )
            parsed, failures = await self.check(net_id, document)
            if failures:
                raise ApiError(422, "policy_tests_failed", "; ".join(failures))
            record = {
                "version": current["version"] + 1,
                "updated_at": time.time(),
                "document": acl.to_doc(parsed),
            }
            mod = kv.mod_revision if kv is not None else 0
            ok, _ = await self.etcd.txn(
                compare=[tx.Mod(ks.policy(net_id)) == mod],
                success=[tx.Put(ks.policy(net_id), json.dumps(record).encode())],
            )
            if ok:
                log.info(
                    "policy written", extra={"network_id": net_id, "version": record["version"]}
                )
                return record
            TXN_RETRIES.labels("put_policy").inc()
        raise ApiError(503, "contention", "the policy changed concurrently, try again")
