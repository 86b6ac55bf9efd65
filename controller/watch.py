"""Peer watch fan-out: one etcd watch per network per controller, many HTTP watchers.

Like the Kubernetes watch cache: a ``NetworkHub`` watches the network's peer prefix
once, encodes each event once, keeps a bounded buffer of recent events and copies
them to every subscriber. A subscriber resuming from a revision still in the
buffer is served from memory; an older one gets its own etcd watch from that
revision, and a compacted one gets ``WatchGone`` (HTTP 410: list again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from aetcd import exceptions as etcd_errors
from aetcd import rpc

from cladnet.backoff import Backoff
from cladnet.tasks import cancel_and_wait
from controller import keyspace as ks
from controller.etcd import Etcd, prefix_end
from controller.etcd_revision import range_at_revision
from controller.policy import public_view, record_of
from controller.telemetry import ETCD_WATCH_RESTARTS, WATCH_EVENTS, WATCHERS

log = logging.getLogger("cladnet.controller.watch")

BUFFER_EVENTS = 4096
SUBSCRIBER_QUEUE = 10_000
HUB_IDLE_SECONDS = 30.0

# (revision, encoded NDJSON line); None tells a subscriber its stream is over.
Line = tuple[int, bytes]


class WatchGone(Exception):
    """The requested revision was compacted away; the client must list again."""

    def __init__(self, compacted: int) -> None:
        super().__init__(f"revision compacted; oldest available is {compacted}")
        self.compacted = compacted


def encode_event(event: Any) -> Line:
    """An etcd peer event as one NDJSON line (ADDED / MODIFIED / DELETED), or the
    network's policy as a POLICY line."""
    kv = event.kv
    revision = kv.mod_revision
    if ks.is_policy(kv.key):  # deleted only with its network: allow-all until then
        record = record_of(None if event.kind == "DELETE" else kv)
        body: dict[str, Any] = {
            "type": "POLICY",
            "revision": revision,
            "policy": public_view(record),
        }
    elif event.kind == "DELETE":
        body = {
            "type": "DELETED",
            "revision": revision,
            "id": ks.last_segment(kv.key),
        }
    else:
        body = {
            "type": "ADDED" if kv.version == 1 else "MODIFIED",
            "revision": revision,
            "peer": json.loads(kv.value),
        }
    return revision, json.dumps(body, separators=(",", ":")).encode() + b"\n"


def bookmark(revision: int) -> bytes:
    """A keep-alive line; its revision is safe to resume from."""
    return b'{"type":"BOOKMARK","revision":%d}\n' % revision


async def _ensure_available(client: Any, prefix: bytes, since: int) -> None:
    """Raise WatchGone if revision ``since + 1`` is compacted.

    etcd accepts a watch on a compacted revision and only cancels it afterwards, which
    would be too late for an HTTP 410; a range read at that revision fails at once.
    """
    try:
        await range_at_revision(client, prefix, prefix_end(prefix), since + 1)
    except rpc.AioRpcError as exc:
        details = exc.details() or ""
        if "compacted" in details:
            raise WatchGone(since + 1) from exc
        if "future revision" in details:  # nothing happened after since yet
            return
        raise


async def open_watch(etcd: Etcd, prefix: bytes, start: int) -> Any:
    """An established etcd watch of ``prefix`` from revision ``start``; WatchGone if compacted."""

    async def opened(client: Any) -> Any:
        await client.connect()
        await _ensure_available(client, prefix, start - 1)
        return await client.watch_prefix(prefix, start_revision=start)

    try:
        return await etcd.call(opened)
    except etcd_errors.RevisionCompactedError as exc:
        raise WatchGone(exc.compacted_revision) from exc


class Subscriber:
    """One HTTP watcher's queue of encoded events."""

    def __init__(self, since: int) -> None:
        self.since = since
        self.queue: asyncio.Queue[Line | None] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)

    def offer(self, line: Line | None) -> bool:
        """Queue a line; False when the subscriber is too far behind (it is then closed)."""
        try:
            self.queue.put_nowait(line)
            return True
        except asyncio.QueueFull:
            return False

    def close(self) -> None:
        """End the stream; a backlog that fills the queue is dropped (the client resumes)."""
        if not self.offer(None):
            self.queue = asyncio.Queue(maxsize=1)
            self.offer(None)


class NetworkHub:
    """The single etcd watch of one network's peers in this controller."""

    def __init__(self, etcd: Etcd, network_id: str, base_revision: int) -> None:
        self.etcd = etcd
        self.prefix = ks.prefix("peers", network_id)
        # Every event with revision > floor is in the buffer or was never there.
        self.floor = base_revision
        self.last_revision = base_revision
        self.buffer: deque[Line] = deque()
        self.subscribers: set[Subscriber] = set()
        self.failed: WatchGone | None = None
        self.idle_since: float | None = asyncio.get_running_loop().time()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the etcd watch; raises WatchGone to the first caller if it is compacted."""
        watch = await open_watch(self.etcd, self.prefix, self.floor + 1)
        self.task = asyncio.create_task(self._run(watch))

    async def _run(self, watch: Any) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                if watch is None:
                    watch = await open_watch(self.etcd, self.prefix, self.last_revision + 1)
                async for event in watch:
                    self._publish(encode_event(event))
                    backoff.reset()
                raise ConnectionError("etcd watch stream ended")
            except (WatchGone, etcd_errors.RevisionCompactedError) as exc:
                log.warning("peer watch compacted", extra={"prefix": self.prefix.decode()})
                self.failed = (
                    exc if isinstance(exc, WatchGone) else WatchGone(exc.compacted_revision)
                )
                self._close_all()
                return
            except Exception as exc:  # etcd down or restarting: resume from the last revision
                ETCD_WATCH_RESTARTS.inc()
                log.warning("etcd watch broke, resuming", extra={"error": repr(exc)})
                with contextlib.suppress(Exception):
                    await watch.cancel()
                watch = None
                await backoff.wait()

    def _publish(self, line: Line) -> None:
        self.last_revision = max(self.last_revision, line[0])
        self.buffer.append(line)
        if len(self.buffer) > BUFFER_EVENTS:
            self.floor = self.buffer.popleft()[0]
        for sub in list(self.subscribers):
            if line[0] > sub.since and not sub.offer(line):
                log.warning("dropping a watcher that fell behind")
                self.subscribers.discard(sub)
                sub.close()
        WATCH_EVENTS.inc(len(self.subscribers))

    def _close_all(self) -> None:
        for sub in self.subscribers:
            sub.close()
        self.subscribers.clear()

    def serves(self, since: int) -> bool:
        return self.failed is None and since >= self.floor

    def subscribe(self, since: int) -> Subscriber:
        sub = Subscriber(since)
        for line in self.buffer:
            if line[0] > since:
                sub.offer(line)
        self.subscribers.add(sub)
        self.idle_since = None
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        if not self.subscribers:
            self.idle_since = asyncio.get_running_loop().time()

    async def stop(self) -> None:
        await cancel_and_wait([self.task], Exception)
        self._close_all()


class WatchHubs:
    """All hubs of this controller, created on demand and stopped when idle."""

    def __init__(self, etcd: Etcd, keepalive: float) -> None:
        self.etcd = etcd
        self.keepalive = keepalive
        self.hubs: dict[str, NetworkHub] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None

    async def _hub_for(self, network_id: str, since: int) -> NetworkHub | None:
        """A hub that can serve ``since``, or None if it needs a direct watch."""
        async with self._lock:
            hub = self.hubs.get(network_id)
            if hub is not None and hub.failed is None:
                return hub if hub.serves(since) else None
            hub = NetworkHub(self.etcd, network_id, since)
            await hub.start()
            self.hubs[network_id] = hub
            if self._reaper is None:
                self._reaper = asyncio.create_task(self._reap())
            return hub

    async def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HUB_IDLE_SECONDS / 3)
            for net_id, hub in list(self.hubs.items()):
                idle = (
                    hub.idle_since is not None and loop.time() - hub.idle_since > HUB_IDLE_SECONDS
                )
                if hub.failed is not None or idle:
                    del self.hubs[net_id]
                    await hub.stop()

    async def open(self, network_id: str, since: int) -> AsyncIterator[bytes]:
        """Prepare a stream of NDJSON lines after ``since``; raises WatchGone before streaming."""
        hub = await self._hub_for(network_id, since)
        if hub is not None:
            return self._from_hub(hub, since)
        watch = await open_watch(self.etcd, ks.prefix("peers", network_id), since + 1)
        return self._direct(watch, since)

    async def _from_hub(self, hub: NetworkHub, since: int) -> AsyncIterator[bytes]:
        sub = hub.subscribe(since)
        WATCHERS.inc()
        revision = since
        try:
            while True:
                try:
                    line = await asyncio.wait_for(sub.queue.get(), self.keepalive)
                except TimeoutError:
                    yield bookmark(max(revision, hub.last_revision))
                    continue
                if line is None:
                    return  # hub failed or we fell behind: the client resumes or relists
                revision = line[0]
                yield line[1]
        finally:
            WATCHERS.dec()
            hub.unsubscribe(sub)

    async def _direct(self, watch: Any, since: int) -> AsyncIterator[bytes]:
        WATCHERS.inc()
        revision = since
        events = aiter(watch)
        pending: asyncio.Future[Any] | None = None
        try:
            while True:
                # Wait without cancelling: cancelling anext() would end the etcd watch.
                pending = pending or asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({pending}, timeout=self.keepalive)
                if not done:
                    yield bookmark(revision)
                    continue
                try:
                    event = pending.result()
                except Exception:  # compacted, etcd gone, or cancelled: the client resumes
                    return
                finally:
                    pending = None
                revision, line = encode_event(event)
                yield line
        finally:
            WATCHERS.dec()
            if pending is not None:
                pending.cancel()
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for hub in self.hubs.values():
            await hub.stop()
        self.hubs.clear()
