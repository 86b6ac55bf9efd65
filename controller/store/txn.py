"""The one compare-and-swap loop every store write that depends on a read goes through.

A write that depends on what was read is an etcd transaction comparing what it read
(``create_revision == 0`` for a key that must not exist yet, ``mod_revision`` for one
that must not have changed). An attempt that loses the race returns ``LOST``; the
loop counts the retry and runs the attempt again, which reads again.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from aetcd import transactions as tx

from controller.errors import ApiError
from controller.telemetry import TXN_RETRIES

T = TypeVar("T")

MAX_TXN_ATTEMPTS = 64
# etcd rejects transactions with more operations than --max-txn-ops (default 128).
TXN_CHUNK = 100


class Lost(enum.Enum):
    """What an attempt answers when its transaction's compare failed: read again."""

    RACE = "lost the race"


LOST: Final = Lost.RACE


async def retry(name: str, attempt: Callable[[], Awaitable[T | Lost]], contention: str) -> T:
    """Run ``attempt`` until it returns something other than ``LOST`` (each loss counted
    in ``cladnet_controller_txn_retries_total{op=name}``); 503 after too many."""
    for _ in range(MAX_TXN_ATTEMPTS):
        result = await attempt()
        if not isinstance(result, Lost):
            return result
        TXN_RETRIES.labels(name).inc()
    raise ApiError(503, "contention", contention)


def unchanged(key: bytes, kv: Any) -> Any:
    """The compare that holds while ``key`` is as read: ``kv`` (a KV with a
    ``mod_revision``), or absent when ``kv`` is None."""
    if kv is None:
        return tx.Create(key) == 0
    return tx.Mod(key) == kv.mod_revision


def dump(model: Any) -> bytes:
    """A record (a pydantic model or a dict) as compact JSON."""
    if isinstance(model, dict):
        return json.dumps(model, separators=(",", ":")).encode()
    return model.model_dump_json().encode()
