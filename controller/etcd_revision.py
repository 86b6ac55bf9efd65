"""Raw KV requests through aetcd's private request attributes.

Two uses: a range read at a given revision, and range/txn requests with options
aetcd's public API lacks (a limit, a count, min_mod_revision, batched reads).

aetcd 1.0.0's public ``get``/``get_prefix``/``get_range`` always read the latest
revision. The watch needs to know, before it answers an HTTP watcher, whether an old
revision is still there (a read at it fails at once when it is compacted), so this
module sends the ``RangeRequest`` itself on the client's ``kvstub`` with its
``_timeout`` and ``metadata``: the only place outside etcd_tls.py that relies on
aetcd's attributes. pyproject pins ``aetcd==1.0.0``; tests/test_dependency_adapters.py
fails when the attributes or the upstream code that sets them change.
"""

from __future__ import annotations

from typing import Any

from aetcd import exceptions as etcd_errors
from aetcd import rpc

PINNED_AETCD = "1.0.0"


async def range_at_revision(
    client: Any, key: bytes, range_end: bytes, revision: int, *, limit: int = 1
) -> Any:
    """``RangeResponse`` of the keys in [key, range_end) at ``revision`` (keys only).

    ``client`` is a connected ``aetcd.Client``. Raises ``rpc.AioRpcError`` untranslated:
    the caller reads etcd's "compacted" / "future revision" details from it.
    """
    request = rpc.RangeRequest(
        key=key, range_end=range_end, revision=revision, limit=limit, keys_only=True
    )
    timeout = client._timeout  # private: aetcd has no public per-request timeout
    return await client.kvstub.Range(request, timeout=timeout, metadata=client.metadata)


async def raw_call(client: Any, method: str, request: Any) -> Any:
    """One raw KV gRPC call (``Range``, ``Txn``) on ``client``, its errors mapped to
    aetcd's exceptions, as its public calls map them (so ``Etcd.call`` retries alike)."""
    await client.connect()
    try:
        stub = getattr(client.kvstub, method)
        return await stub(request, timeout=client._timeout, metadata=client.metadata)
    except rpc.AioRpcError as exc:
        etcd_errors._handle_exception(exc)  # private: aetcd's own error mapping
        raise
