"""Who is calling: the admin (management API) or one host (its agent credential)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cladnet import tokens
from cladnet.files import write_atomic
from cladnet.ttlcache import TtlCache
from controller import keyspace as ks
from controller.errors import ApiError
from controller.etcd import Etcd
from controller.store import Store

log = logging.getLogger("cladnet.controller.auth")

ADMIN_TOKEN_FILE = "admin-token"
CACHE_SECONDS = 5.0
CACHE_ENTRIES = 1024  # more than any fleet has operator tokens


ROLES = ("admin", "viewer")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``host_id`` is set for agents only."""

    kind: str  # "admin" | "viewer" | "host"
    host_id: str | None = None
    network_id: str | None = None
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def can_read_all(self) -> bool:
        return self.kind in ROLES

    @property
    def name(self) -> str:
        """For the audit log: role and token id, or the host."""
        if self.kind == "host":
            return f"host:{self.host_id}"
        return f"{self.kind}:{self.token_id or 'configured'}"


ADMIN = Principal("admin")


def load_or_create_admin_token(state_dir: Path) -> str:
    """The admin token in ``<state_dir>/admin-token``, generated (mode 0600) if missing."""
    path = state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        parsed = tokens.parse(token)
        if parsed is None or parsed.kind != "cla":
            raise SystemExit(f"{path} does not hold a CLADNet admin token")
        return token
    token, _ = tokens.mint("cla", tokens.new_id())
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, token + "\n")
    log.info("generated admin token", extra={"path": str(path)})
    return token


async def bootstrap_admin_token(etcd: Etcd, token: str) -> None:
    """Store the hash of a generated admin token in etcd, so every replica accepts it."""
    parsed = tokens.parse(token)
    assert parsed is not None
    if await etcd.get(ks.admin_token(parsed.id)) is None:
        record = {"hash": tokens.hash_secret(parsed.secret), "created_at": time.time()}
        await etcd.put(ks.admin_token(parsed.id), json.dumps(record).encode())


class Authenticator:
    """Resolves bearer tokens to principals. Admin token records found are cached briefly;
    misses are not, so made-up token ids cost an etcd read (rate limited per source), not
    memory."""

    def __init__(self, etcd: Etcd, store: Store, configured_hash: str | None) -> None:
        self.etcd = etcd
        self.store = store
        self.configured_hash = configured_hash
        self._admin_cache: TtlCache[str, dict[str, Any]] = TtlCache(CACHE_ENTRIES, CACHE_SECONDS)

    async def _admin_record(self, token_id: str) -> dict[str, Any] | None:
        cached = self._admin_cache.get(token_id, time.monotonic())
        if cached is not None:
            return cached
        kv = await self.etcd.get(ks.admin_token(token_id))
        if kv is None:
            return None
        record: dict[str, Any] = json.loads(kv.value)
        self._admin_cache.put(token_id, record, time.monotonic())
        return record

    async def authenticate(self, authorization: str | None) -> Principal:
        """A principal for an ``Authorization: Bearer …`` header, or 401."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "unauthorized", "missing bearer token")
        token = authorization[7:].strip()
        if self.configured_hash and tokens.verify(token, self.configured_hash):
            return ADMIN
        parsed = tokens.parse(token)
        if parsed is not None and parsed.kind == "cla":
            record = await self._admin_record(parsed.id)
            if record and tokens.verify(parsed.secret, record["hash"]):
                return Principal(record.get("role", "admin"), token_id=parsed.id)
        elif parsed is not None and parsed.kind == "clh":
            cred = await self.store.authenticate_host(token)
            if cred is not None:
                return Principal("host", cred.host_id, cred.network_id)
        raise ApiError(401, "unauthorized", "invalid token")


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "this call needs an admin token")


def require_reader(principal: Principal) -> None:
    if not principal.can_read_all:
        raise ApiError(403, "forbidden", "this call needs an admin or viewer token")


async def create_admin_token(etcd: Etcd, role: str, description: str) -> tuple[str, dict[str, Any]]:
    """A new operator token of ``role``; only its hash is stored. Returns (token, record)."""
    token_id = tokens.new_id()
    token, digest = tokens.mint("cla", token_id)
    record = {
        "id": token_id,
        "role": role,
        "description": description,
        "hash": digest,
        "created_at": time.time(),
    }
    await etcd.put(ks.admin_token(token_id), json.dumps(record).encode())
    return token, record


async def list_admin_tokens(etcd: Etcd) -> list[dict[str, Any]]:
    res = await etcd.get_prefix(ks.prefix("admin-tokens"))
    out = []
    for kv in res:
        record = json.loads(kv.value)
        record.pop("hash", None)
        out.append({"role": "admin", "description": "", "id": ks.last_segment(kv.key), **record})
    return sorted(out, key=lambda r: r["created_at"])


def require_self(principal: Principal, host_id: str) -> None:
    """Agents may act on their own host only; the admin on any (a viewer on none)."""
    if not principal.is_admin and principal.host_id != host_id:
        raise ApiError(403, "forbidden", "an agent credential can only change its own host")


def require_member(principal: Principal, network_id: str) -> None:
    """Peers of a network are visible to operators and to that network's hosts."""
    if not principal.can_read_all and principal.network_id != network_id:
        raise ApiError(403, "forbidden", "this host is not a member of that network")
