"""The controller's etcd connection: aetcd with keepalives and failover across endpoints.

aetcd talks to one host; an etcd cluster has several. ``Etcd`` keeps one client to
the current endpoint and moves to the next one when a call fails with a
connection error, retrying that call once per endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
from aetcd import exceptions as etcd_errors
from aetcd import rpc

from controller.config import Settings
from controller.etcd_revision import raw_call
from controller.etcd_tls import EtcdTls, TlsClient

log = logging.getLogger("cladnet.controller.etcd")

T = TypeVar("T")

# Without keepalive pings a watch on a frozen (not crashed) etcd member hangs
# forever; etcd's default --grpc-keepalive-min-time is 5 s, so ping no faster.
GRPC_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
}

CONNECTION_ERRORS = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError)


class EtcdAuthError(RuntimeError):
    """etcd refused the controller's user name or password."""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def parse_endpoints(spec: str) -> list[tuple[str, int]]:
    """``http://h1:2379,h2:2379`` → ``[("h1", 2379), ("h2", 2379)]``.

    ``https://`` is accepted too; ``from_settings`` decides about TLS.
    """
    endpoints = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        parts = urlsplit(item if "://" in item else f"http://{item}")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported etcd endpoint scheme in {item!r}")
        if not parts.hostname:
            raise ValueError(f"etcd endpoint without a host: {item!r}")
        endpoints.append((parts.hostname, parts.port or 2379))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


class Etcd:
    """A failover wrapper around ``aetcd.Client``; use ``call`` for every request."""

    def __init__(
        self,
        endpoints: list[tuple[str, int]],
        timeout: float = 5.0,
        user: str | None = None,
        password: str | None = None,
        tls: EtcdTls | None = None,
    ) -> None:
        self.endpoints = endpoints
        # Read once: a missing or unreadable file fails the start, not a later failover.
        self._credentials = tls.credentials() if tls else None
        self.timeout = timeout
        self.user = user
        self._password = password
        self._index = 0
        self.client = self._new_client()
        self.failovers = 0
        self._closing: set[asyncio.Task[None]] = set()

    def _new_client(self) -> aetcd.Client:
        host, port = self.endpoints[self._index]
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "username": self.user,
            "password": self._password,
            "timeout": self.timeout,
            "options": GRPC_OPTIONS,
        }
        if self._credentials is not None:
            return TlsClient(credentials=self._credentials, **kwargs)
        return aetcd.Client(**kwargs)

    async def connect(self) -> None:
        """Connect to the first endpoint that answers and, with a user, log in.

        Refused credentials raise ``EtcdAuthError``: retrying cannot fix them.
        """
        try:
            await self.call(lambda c: c.connect())
        except (etcd_errors.InvalidArgumentError, etcd_errors.UnauthenticatedError) as exc:
            if self.user is None:
                raise
            raise EtcdAuthError(f"etcd refused the login of user {self.user!r}: {exc}") from exc

    async def close(self) -> None:
        for task in self._closing:
            task.cancel()
        await self.client.close()

    def _replace(self, failed: aetcd.Client, next_endpoint: bool) -> None:
        """A new client (to the next endpoint, or the same one to log in again)."""
        if failed is not self.client:  # another task already replaced it
            return
        if next_endpoint:
            self._index = (self._index + 1) % len(self.endpoints)
            self.failovers += 1
            log.warning("etcd endpoint failed, trying %s:%s", *self.endpoints[self._index])
        else:
            log.info("etcd auth token expired, logging in again as %s", self.user)
        old, self.client = self.client, self._new_client()
        # Closing a gRPC channel cancels the calls still on it; let them end first.
        task = asyncio.get_running_loop().create_task(self._close_later(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_later(self, old: aetcd.Client, grace: float = 30.0) -> None:
        await asyncio.sleep(grace)
        try:
            await old.close()
        except Exception:  # a broken channel may fail to close; it is dropped anyway
            log.debug("closing failed etcd client", exc_info=True)

    async def call(self, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run ``fn(client)``, failing over to the next endpoint on connection errors."""
        attempts = max(2, len(self.endpoints))
        for attempt in range(attempts):
            client = self.client
            try:
                return await fn(client)
            except CONNECTION_ERRORS:
                if attempt == attempts - 1:
                    raise
                # The new client connects (and logs in) lazily, inside the next try.
                self._replace(client, next_endpoint=True)
            except etcd_errors.UnauthenticatedError:
                # "invalid auth token": etcd's tokens expire (--auth-token-ttl, an
                # idle simple token; JWT's ttl). A fresh login gets a new one.
                if self.user is None or attempt == attempts - 1:
                    raise
                self._replace(client, next_endpoint=False)
            except etcd_errors.InternalError:
                # e.g. "leader changed" during an election: the cluster is fine a moment
                # later. Every write we make is guarded by compares, so a retry is safe.
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    # Thin helpers for the calls the controller makes most.

    async def get(self, key: bytes) -> Any:
        return await self.call(lambda c: c.get(key))

    async def get_prefix(self, prefix: bytes, keys_only: bool = False) -> Any:
        return await self.call(lambda c: c.get_prefix(prefix, keys_only=keys_only))

    async def range(
        self,
        prefix: bytes,
        *,
        limit: int = 0,
        descend: bool = False,
        keys_only: bool = False,
        count_only: bool = False,
        min_mod_revision: int = 0,
        start: bytes | None = None,
        end: bytes | None = None,
        revision: int = 0,
    ) -> Any:
        """A range read of ``prefix`` with the options aetcd's ``get_prefix`` lacks (a
        limit, a count, only keys changed since a revision, a part of the prefix from
        ``start`` to before ``end``, an older ``revision``): the raw RangeResponse."""
        request = rpc.RangeRequest(
            key=start or prefix,
            range_end=end or prefix_end(prefix),
            limit=limit,
            revision=revision,
            sort_order=rpc.RangeRequest.DESCEND if descend else rpc.RangeRequest.NONE,
            sort_target=rpc.RangeRequest.KEY,
            keys_only=keys_only,
            count_only=count_only,
            min_mod_revision=min_mod_revision,
        )
        return await self.call(partial(raw_call, method="Range", request=request))

    async def ranges(self, requests: list[Any]) -> tuple[list[Any], int]:
        """Several range reads (``rpc.RangeRequest``) in transactions of 100: one round
        trip per 100, not one each. The responses, and the revision of the last
        transaction (up to 100 are read at one revision)."""
        out: list[Any] = []
        revision = 0
        for i in range(0, len(requests), 100):
            ops = [rpc.RequestOp(request_range=r) for r in requests[i : i + 100]]
            txn = rpc.TxnRequest(compare=[], success=ops, failure=[])
            response = await self.call(partial(raw_call, method="Txn", request=txn))
            out += [r.response_range for r in response.responses]
            revision = response.header.revision
        return out, revision

    async def counts(self, prefixes: list[bytes]) -> list[int]:
        """How many keys each prefix holds."""
        responses, _ = await self.ranges(
            [rpc.RangeRequest(key=p, range_end=prefix_end(p), count_only=True) for p in prefixes]
        )
        return [r.count for r in responses]

    async def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The values of those of ``keys`` that exist."""
        responses, _ = await self.ranges([rpc.RangeRequest(key=k) for k in keys])
        return {kv.key: kv.value for r in responses for kv in r.kvs}

    async def put(self, key: bytes, value: bytes) -> Any:
        return await self.call(lambda c: c.put(key, value))

    async def txn(self, compare: list[Any], success: list[Any], failure: list[Any] | None = None):
        return await self.call(lambda c: c.transaction(compare, success, failure or []))

    async def status(self) -> Any:
        return await self.call(lambda c: c.status())

    async def compact(self, revision: int) -> None:
        await self.call(lambda c: c.compact(revision, physical=True))


def from_settings(settings: Settings) -> Etcd:
    """The controller's etcd client as configured (endpoints, user, TLS).

    TLS with ``--etcd-ca``, or with ``https://`` endpoints (then the system's CAs)."""
    tls = None
    if settings.etcd_ca or "https://" in settings.etcd:
        tls = EtcdTls(settings.etcd_ca, settings.etcd_cert, settings.etcd_key)
    return Etcd(
        parse_endpoints(settings.etcd),
        user=settings.etcd_user,
        password=settings.etcd_password,
        tls=tls,
    )


class DailyLease:
    """One lease per day for records that expire together, instead of a lease each.

    A record written on a day lives at least ``keep`` seconds and at most a day more.
    """

    def __init__(self, etcd: Etcd, keep: float) -> None:
        self.etcd, self.keep = etcd, keep
        self._lease: Any = None
        self._until = 0.0

    async def current(self, now: float) -> Any:
        if self._lease is None or now >= self._until:
            self._lease = await self.etcd.call(lambda c: c.lease(int(self.keep + 86400)))
            self._until = now + 86400
        return self._lease
