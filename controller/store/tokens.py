"""Join tokens: records hold a hash only; uses are one key each (a limited token's are
``max_uses`` slots, claimed create-if-absent like an overlay IP)."""

from __future__ import annotations

import json
import time
from typing import Any

from aetcd import transactions as tx

from cladnet import tokens
from cladnet.models import JoinToken, JoinTokenCreated, Network, TokenCreate
from controller import keyspace as ks
from controller.errors import ApiError, not_found
from controller.etcd import Etcd, prefix_end
from controller.store.txn import dump


def public_token(record: dict[str, Any]) -> dict[str, Any]:
    """A token record without its hash."""
    return {k: v for k, v in record.items() if k != "hash"}


class Tokens:
    """A network's join tokens in etcd."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd

    async def create(self, net: Network, req: TokenCreate) -> JoinTokenCreated:
        """A new token of ``net``; its secret is in the answer only."""
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
        ok, _ = await self.etcd.txn(
            # Not of a network deleted since it was read: no orphaned token.
            compare=[tx.Create(ks.network(net.id)) > 0],
            success=[tx.Put(ks.token(token_id), dump(record))],
        )
        if not ok:
            raise not_found("network", net.id)
        return JoinTokenCreated(token=secret, uses=0, **public_token(record))

    async def of_network(self, net_id: str) -> list[JoinToken]:
        """The network's join tokens with their use counts (counted in one transaction)."""
        res = await self.etcd.get_prefix(ks.prefix("tokens"))
        records = [r for r in (json.loads(kv.value) for kv in res) if r["network_id"] == net_id]
        uses = await self.etcd.counts([ks.prefix("token-uses", r["id"]) for r in records])
        return [JoinToken(uses=n, **public_token(r)) for r, n in zip(records, uses, strict=True)]

    async def revoke(self, net: Network, token_id: str) -> None:
        """Delete a token of ``net`` and its uses."""
        kv = await self.etcd.get(ks.token(token_id))
        if kv is None or json.loads(kv.value)["network_id"] != net.id:
            raise not_found("token", token_id)
        p = ks.prefix("token-uses", token_id)
        ok, _ = await self.etcd.txn(
            compare=[tx.Mod(ks.token(token_id)) == kv.mod_revision],
            success=[tx.Delete(ks.token(token_id)), tx.Delete(p, prefix_end(p))],
        )
        if not ok:  # records never change: it was deleted meanwhile
            raise not_found("token", token_id)

    async def delete_expired(self, now: float) -> int:
        """Remove join tokens past their expiry (and their use records); returns how many."""
        removed = 0
        for kv in await self.etcd.get_prefix(ks.prefix("tokens")):
            record = json.loads(kv.value)
            if record["expires_at"] < now:
                p = ks.prefix("token-uses", record["id"])
                ok, _ = await self.etcd.txn(
                    compare=[tx.Mod(ks.token(record["id"])) == kv.mod_revision],
                    success=[tx.Delete(ks.token(record["id"])), tx.Delete(p, prefix_end(p))],
                )
                removed += int(ok)
        return removed

    async def free_slot(self, token: dict[str, Any]) -> int:
        """A random unclaimed use slot of a limited token, or 403 when none is left."""
        res = await self.etcd.get_prefix(ks.prefix("token-uses", token["id"]), keys_only=True)
        taken = {ks.last_segment(kv.key) for kv in res}
        slot = tokens.pick_slot(token["max_uses"], {int(t[5:]) for t in taken if t[:5] == "slot-"})
        if slot is None:
            raise _exhausted(token["max_uses"])
        return slot

    async def uses(self, token_id: str) -> int:
        """How many times a token was used."""
        res = await self.etcd.range(ks.prefix("token-uses", token_id), count_only=True)
        return int(res.count)

    async def check(self, token: str, new_host: bool = True) -> tuple[dict[str, Any], int]:
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
        if new_host and max_uses is not None and await self.uses(parsed.id) >= max_uses:
            raise _exhausted(max_uses)
        return record, kv.mod_revision


def _exhausted(max_uses: int) -> ApiError:
    return ApiError(403, "token_exhausted", f"the join token was used {max_uses} time(s) already")
