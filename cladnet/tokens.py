"""Bearer secrets: admin tokens, join tokens and per-host agent credentials.

A secret looks like ``<kind>_<id>.<random>``. The id lets the controller find the
record in one read; only ``sha256(random)`` is stored. The random part carries
256 bits of entropy, so a fast hash is enough (no password-style KDF needed).
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
from dataclasses import dataclass

KINDS = ("cla", "clj", "clh")  # admin, join, host credential


@dataclass(frozen=True)
class ParsedToken:
    kind: str
    id: str
    secret: str


def new_id(prefix: str = "", nbytes: int = 8) -> str:
    """A short random identifier such as ``n-3f2a…``."""
    return f"{prefix}{secrets.token_hex(nbytes)}"


def hash_secret(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def mint(kind: str, token_id: str) -> tuple[str, str]:
    """Create a token of ``kind`` for ``token_id``: returns ``(token, stored_hash)``."""
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r}")
    secret = secrets.token_urlsafe(32)
    return f"{kind}_{token_id}.{secret}", hash_secret(secret)


def parse(token: str) -> ParsedToken | None:
    """Split a token into kind, id and secret; None when it is malformed."""
    head, dot, secret = token.partition(".")
    kind, underscore, token_id = head.partition("_")
    if not (dot and underscore and secret and token_id) or kind not in KINDS:
        return None
    return ParsedToken(kind, token_id, secret)


def verify(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented secret against its stored hash."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def pick_slot(max_uses: int, taken: set[int], rng: random.Random | None = None) -> int | None:
    """A random use slot in ``range(max_uses)`` not in ``taken``, or None when all are.

    Random probes while at least half is free (expected under two), else a walk from
    a random start: never a list of all ``max_uses`` slots (a token may allow millions).
    """
    free = max_uses - len(taken)
    if free <= 0:
        return None
    rng = rng or random.Random()
    if free * 2 >= max_uses:
        while True:
            slot = rng.randrange(max_uses)
            if slot not in taken:
                return slot
    start = rng.randrange(max_uses)
    for i in range(max_uses):
        slot = (start + i) % max_uses
        if slot not in taken:
            return slot
    return None
