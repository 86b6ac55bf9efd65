"""Paged etcd range reads for the API's lists (``limit`` + ``continue``, as Kubernetes
lists do): every page of one list is read at the revision of its first page, so the pages
add up to one consistent snapshot, and a watch can resume from that revision.

A continue token is ``<revision>.<hex of the last key after the prefix>``: it says where
to go on, and reading from it can only reach keys under the list's own prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aetcd import exceptions as etcd_errors
from aetcd import rpc
from grpc import StatusCode

from controller.errors import ApiError
from controller.etcd import Etcd, prefix_end

CONTINUE_PATTERN = r"^[1-9][0-9]{0,17}\.([0-9a-f]{2}){1,512}$"
_CONTINUE_RE = re.compile(CONTINUE_PATTERN)
MAX_LIMIT = 10_000


@dataclass
class Page:
    kvs: list[Any]
    revision: int
    continue_token: str | None  # None: this was the last page


def _gone() -> ApiError:
    return ApiError(
        410, "continue_expired", "the list this token continues is too old; list from the start"
    )


async def read_page(
    etcd: Etcd, prefix: bytes, limit: int | None, token: str | None, descend: bool = False
) -> Page:
    """Up to ``limit`` keys under ``prefix`` (all without a limit), after ``token``'s key,
    in key order (``descend``: newest key first)."""
    start, end, revision = prefix, prefix_end(prefix), 0
    if token is not None:
        if not _CONTINUE_RE.fullmatch(token):  # the schema's pattern; checked here too
            raise ApiError(422, "invalid_request", "continue: not a continue token")
        rev, last = token.split(".")
        revision, last_key = int(rev), prefix + bytes.fromhex(last)
        if descend:
            end = last_key
        else:
            start = last_key + b"\0"
    try:
        response = await etcd.range(
            prefix, limit=limit or 0, descend=descend, start=start, end=end, revision=revision
        )
    except etcd_errors.ClientError as exc:
        # A compacted or future revision (etcd's OUT_OF_RANGE, which aetcd leaves unmapped):
        # the token no longer names a snapshot.
        cause = exc.__cause__
        if isinstance(cause, rpc.AioRpcError) and cause.code() == StatusCode.OUT_OF_RANGE:
            raise _gone() from exc
        raise
    kvs = list(response.kvs)
    revision = revision or response.header.revision
    more = response.more and bool(kvs)
    next_token = f"{revision}.{kvs[-1].key[len(prefix) :].hex()}" if more else None
    return Page(kvs, revision, next_token)
