"""Who is calling: the admin (management API) or one host (its agent credential)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cladnet import tokens
from controller import keyspace as ks
from controller.errors import ApiError
from controller.etcd import Etcd
from controller.store import Store

log = logging.getLogger("cladnet.controller.auth")

ADMIN_TOKEN_FILE = "admin-token"
CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``host_id`` is set for agents only."""

    kind: str  # "admin" | "host"
    host_id: str | None = None
    network_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"


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
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    tmp.replace(path)
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
    """Resolves bearer tokens to principals. Admin token lookups are cached briefly."""

    def __init__(self, etcd: Etcd, store: Store, configured_hash: str | None) -> None:
        self.etcd = etcd
        self.store = store
        self.configured_hash = configured_hash
        self._admin_cache: dict[str, tuple[str | None, float]] = {}

    async def _admin_hash(self, token_id: str) -> str | None:
        cached = self._admin_cache.get(token_id)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        kv = await self.etcd.get(ks.admin_token(token_id))
        digest = json.loads(kv.value)["hash"] if kv is not None else None
        self._admin_cache[token_id] = (digest, time.monotonic() + CACHE_SECONDS)
        return digest

    async def authenticate(self, authorization: str | None) -> Principal:
        """A principal for an ``Authorization: Bearer …`` header, or 401."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "unauthorized", "missing bearer token")
        token = authorization[7:].strip()
        if self.configured_hash and tokens.verify(token, self.configured_hash):
            return ADMIN
        parsed = tokens.parse(token)
        if parsed is not None and parsed.kind == "cla":
            digest = await self._admin_hash(parsed.id)
            if digest and tokens.verify(parsed.secret, digest):
                return ADMIN
        elif parsed is not None and parsed.kind == "clh":
            cred = await self.store.authenticate_host(token)
            if cred is not None:
                return Principal("host", cred.host_id, cred.network_id)
        raise ApiError(401, "unauthorized", "invalid token")


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "this call needs the admin token")


def require_self(principal: Principal, host_id: str) -> None:
    """Agents may act on their own host only; the admin on any."""
    if not principal.is_admin and principal.host_id != host_id:
        raise ApiError(403, "forbidden", "an agent credential can only change its own host")


def require_member(principal: Principal, network_id: str) -> None:
    """Peers of a network are visible to the admin and to that network's hosts."""
    if not principal.is_admin and principal.network_id != network_id:
        raise ApiError(403, "forbidden", "this host is not a member of that network")
