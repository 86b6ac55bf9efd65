"""Join tokens: records hold a hash only; uses are one key each (a limited token's are
``max_uses`` slots, claimed create-if-absent like an overlay IP)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

from aetcd import transactions as tx

from cladnet import tokens
from cladnet.models import JoinToken, JoinTokenCreated, Network, TokenCreate
from controller import keyspace as ks
from controller.errors import ApiError, not_found
from controller.etcd import Etcd, prefix_end
from controller.store.txn import dump

CACHED_TOKENS = 1024  # join token records a controller keeps (least recently used go)


def public_token(record: dict[str, Any]) -> dict[str, Any]:
    """A token record without its hash."""
    return {k: v for k, v in record.items() if k != "hash"}


class Tokens:
    """A network's join tokens in etcd."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        # Verified join token records and their revisions, by id: a record never
        # changes, and a join's transaction compares the revision (a revoked token's
        # join fails there, and ``forget`` drops it).
        self._records: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()

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
        self.forget(token_id)
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
                self.forget(record["id"])
        return removed

    async def free_slot(self, token: dict[str, Any]) -> int:
        """A random unclaimed use slot of a limited token, or 403 when none is left."""
        res = await self.etcd.get_prefix(ks.prefix("token-uses", token["id"]), keys_only=True)
        taken = {ks.last_segment(kv.key) for kv in res}
        slot = tokens.pick_slot(token["max_uses"], {int(t[5:]) for t in taken if t[:5] == "slot-"})
        if slot is None:
            raise _exhausted(token["max_uses"])
        return slot

    async def check(self, token: str) -> tuple[dict[str, Any], int]:
        """The token record and its mod revision, or 401 with a reason: for a re-join
        or a challenge, which use up nothing (a proven host re-joins with a used-up
        limited token). A new host's join uses ``for_join``."""
        parsed = _join_token(token)
        kv = await self.etcd.get(ks.token(parsed.id))
        if kv is None:
            raise _unknown()
        return _valid(parsed, json.loads(kv.value)), kv.mod_revision

    async def for_join(self, token: str) -> tuple[dict[str, Any], int]:
        """``check`` for a new host's join, from the cache of verified records: the
        join's transaction must compare the revision. A limited token's uses are not
        counted here: ``free_slot`` finds them all taken."""
        parsed = _join_token(token)
        cached = self._records.get(parsed.id)
        if cached is None:
            kv = await self.etcd.get(ks.token(parsed.id))
            if kv is None:
                raise _unknown()
            cached = (_valid(parsed, json.loads(kv.value)), kv.mod_revision)
            self._records[parsed.id] = cached
            if len(self._records) > CACHED_TOKENS:
                self._records.popitem(last=False)
        else:
            _valid(parsed, cached[0])
            self._records.move_to_end(parsed.id)
        return cached

    def forget(self, token_id: str) -> None:
        """Drop a token's cached record (revoked, expired, or seen changed)."""
        self._records.pop(token_id, None)


def _join_token(token: str) -> tokens.ParsedToken:
    parsed = tokens.parse(token)
    if parsed is None or parsed.kind != "clj":
        raise ApiError(401, "invalid_token", "not a join token")
    return parsed


def _unknown() -> ApiError:
    return ApiError(401, "invalid_token", "unknown or revoked join token")


def _valid(parsed: tokens.ParsedToken, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` if the secret matches it and it has not expired; else 401."""
    if not tokens.verify(parsed.secret, record["hash"]):
        raise _unknown()
    if record["expires_at"] < time.time():
        raise ApiError(401, "token_expired", "the join token has expired")
    return record


def _exhausted(max_uses: int) -> ApiError:
    return ApiError(403, "token_exhausted", f"the join token was used {max_uses} time(s) already")
