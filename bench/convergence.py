#!/usr/bin/env python3
"""Watch fan-out: how fast one endpoint change reaches N open peer watch streams.

One command, one JSON object on stdout (inputs, machine facts, every figure, the
same-run etcd baseline, ratios), then a one-line human summary. Progress on stderr.

    /work/venv/bin/python bench/convergence.py                  # N = 100, 1,000, 5,000
    /work/venv/bin/python bench/convergence.py --sizes 100,1000
    /work/venv/bin/python bench/convergence.py --smoke          # N = 50 (CI)

For every N, on one throwaway etcd and a fresh controller (``--watch-keepalive 30``):

1. create a network, join one host ("mover"), list the peers to get a revision;
2. open N watch streams ``GET /v1/networks/{id}/peers?watch=true&since=<revision>``
   from this one process, as raw asyncio streams with a hand-written HTTP/1.1 request
   and a hand-rolled chunked decoder (httpx per stream costs too much memory for
   thousands), and wait until the controller's ``cladnet_controller_watchers`` gauge
   shows all N;
3. ``--changes`` times: the mover PUTs a new endpoint; for every watcher, the time
   from just before the PUT is sent to the moment this process reads that MODIFIED
   line, and the bytes that line cost on the wire (incl. chunk framing);
4. baseline: N watches of one prefix directly on etcd through aetcd, the same
   number of puts of a same-sized value, the time for each to reach every watcher.

Arrival times are taken when this process reads a line, so they include this
process's own queueing (it shares the 2 cores with the controller and etcd): the
figures are an upper bound for what the controller alone would show. Targets
(p99 < 1 s at 1,000, < 3 s at 5,000) are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import httpx

from bench import common
from bench.common import cpu_seconds, percentile, rss_bytes
from cladnet.keys import generate_keypair
from lab.components import ADMIN_TOKEN, Controller, Etcd, free_port

HOST = "127.0.0.1"
TARGETS_P99_SECONDS = {1000: 1.0, 5000: 3.0}
# File descriptors beyond the N streams: etcd/gRPC, httpx clients, logs, slack.
FD_SLACK = 256
# Rough resident memory per watcher (controller + this process), for a feasibility check.
EST_BYTES_PER_WATCHER = 200 * 1024


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON object plus one summary line."""
    print(f"[convergence {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- facts and small statistics --------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """The shared facts, plus memory and file-descriptor limits (they bound N)."""
    return {
        **common.machine_facts("aetcd", "uvicorn"),
        "mem_available_mb": mem_available() // 2**20,
        "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/min in milliseconds."""
    s = sorted(values)
    return {
        "p50": ms(percentile(s, 50)),
        "p90": ms(percentile(s, 90)),
        "p99": ms(percentile(s, 99)),
        "max": ms(s[-1] if s else None),
        "min": ms(s[0] if s else None),
    }


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


async def metric(client: httpx.AsyncClient, name: str) -> float:
    """Sum of a metric's samples at the controller's /metrics."""
    text = (await client.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match[1] == name:
            total += float(match[3])
    return total


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (soft, and hard if allowed) to ``needed``; return the result.

    Done before any controller starts: child processes inherit the limit, and the
    controller needs one descriptor per stream too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            soft, hard = needed, needed
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- the measurement of one change -----------------------------------------------------


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No garbage collection in this process while a change is being timed.

    With thousands of streams a full collection here takes ~0.1 s and would be
    charged to the system under test; collect before instead.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass
class Change:
    """One endpoint change and when/what each watcher received for it."""

    marker: bytes  # unique bytes of this change's event line (the new endpoint)
    watchers: int
    sent_at: float = 0.0
    arrivals: list[float | None] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)
    line_bytes: list[int] = field(default_factory=list)
    remaining: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.arrivals = [None] * self.watchers
        self.wire_bytes = [0] * self.watchers
        self.line_bytes = [0] * self.watchers
        self.remaining = self.watchers

    def record(self, index: int, at: float, wire: int, line: int) -> None:
        if self.arrivals[index] is None:
            self.arrivals[index] = at
            self.wire_bytes[index] = wire
            self.line_bytes[index] = line
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def latencies(self) -> list[float]:
        return [a - self.sent_at for a in self.arrivals if a is not None]


@dataclass
class StreamStats:
    """What the watch streams received outside the measured changes."""

    bookmarks: int = 0
    other_events: int = 0
    ended: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Fanout:
    """Routes lines from all N streams to the change being measured."""

    def __init__(self, watchers: int) -> None:
        self.watchers = watchers
        self.current: Change | None = None
        self.stats = StreamStats()

    def on_line(self, index: int, line: bytes, wire: int, at: float) -> None:
        change = self.current
        # Byte search, not json.loads: thousands of lines arrive in a burst and
        # parsing them here would inflate the very latency being measured.
        if change is not None and change.marker in line and b'"type":"MODIFIED"' in line:
            change.record(index, at, wire, len(line) + 1)
        elif b'"type":"BOOKMARK"' in line:
            self.stats.bookmarks += 1
        else:
            self.stats.other_events += 1


# --- raw HTTP/1.1 watch streams --------------------------------------------------------


class HttpError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


async def open_stream(
    port: int, path: str, token: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Send the GET and read the response head; return (reader, writer, head bytes).

    A streaming response's head is written before its body starts, and the
    controller subscribes the stream to the hub when the body starts: so a head
    means "almost subscribed", and the watchers gauge confirms it.
    """
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: application/x-ndjson\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    status_line = await reader.readline()
    head = len(status_line)
    parts = status_line.split(None, 2)
    if len(parts) < 2:
        writer.close()
        raise HttpError(0, status_line)
    status = int(parts[1])
    headers: dict[bytes, bytes] = {}
    while True:
        line = await reader.readline()
        head += len(line)
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if status != 200 or headers.get(b"transfer-encoding") != b"chunked":
        body = await reader.read(int(headers.get(b"content-length", b"0") or 0))
        writer.close()
        raise HttpError(status, body)
    return reader, writer, head


async def read_stream(index: int, reader: asyncio.StreamReader, fanout: Fanout) -> None:
    """Decode a chunked NDJSON body line by line, charging each line its wire bytes.

    A line's wire bytes are its own bytes plus the chunk framing (``<hex>\\r\\n`` and
    the trailing ``\\r\\n``) of the chunks that completed it; the sum over lines is
    exactly what came over the socket after the head.
    """
    pending = b""
    framing = 0
    try:
        while True:
            size_line = await reader.readline()
            if not size_line:
                break
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:  # last chunk: the server ended the stream
                break
            data = await reader.readexactly(size + 2)
            now = time.perf_counter()
            framing += len(size_line) + 2
            pending += data[:-2]
            if b"\n" not in pending:
                continue
            *lines, pending = pending.split(b"\n")
            for j, line in enumerate(lines):
                wire = len(line) + 1
                if j == len(lines) - 1:  # framing goes to the last line it carried
                    wire += framing
                    framing = 0
                fanout.on_line(index, line, wire, now)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        key = type(exc).__name__
        fanout.stats.errors[key] = fanout.stats.errors.get(key, 0) + 1
    finally:
        fanout.stats.ended += 1


async def close_streams(
    writers: list[asyncio.StreamWriter], readers: list[asyncio.Task[None]]
) -> None:
    """Close the watch streams and wait for their readers to end."""
    for w in writers:
        w.close()
    for t in readers:
        t.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


# --- one size against the controller ---------------------------------------------------


async def controller_run(
    etcd: Etcd, tmp: Path, index: int, n: int, changes: int, open_concurrency: int
) -> tuple[dict[str, Any], bytes]:
    """Open N watch streams on a fresh controller and time ``changes`` endpoint changes.

    Returns the figures and one peer record (the etcd baseline writes same-sized values).
    """
    ctl = Controller(
        etcd_url=etcd.url,
        state_dir=tmp / f"controller-{index}",
        port=free_port(),
        extra_env={"CLADNET_WATCH_KEEPALIVE": "30"},  # components pass it as --watch-keepalive
    )
    ctl.start()
    assert ctl.proc is not None
    pid = ctl.proc.pid
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.Task[None]] = []
    admin = httpx.AsyncClient(
        base_url=ctl.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
    )
    mover_client: httpx.AsyncClient | None = None
    try:
        name = f"conv-{index}-{n}"
        r = await admin.post("/v1/networks", json={"name": name, "cidr": _cidr_for(index)})
        r.raise_for_status()
        net_id = r.json()["id"]
        r = await admin.post(f"/v1/networks/{net_id}/tokens", json={})
        r.raise_for_status()
        join_token = r.json()["token"]
        r = await admin.post(
            "/v1/join",
            json={
                "token": join_token,
                "hostname": "mover",
                "public_key": generate_keypair()[1],
                "listen_port": 51820,
            },
        )
        r.raise_for_status()
        mover = r.json()
        listed = (await admin.get(f"/v1/networks/{net_id}/peers")).json()
        revision = listed["revision"]
        peer_record = json.dumps(listed["peers"][0], separators=(",", ":")).encode()

        rss_before = rss_bytes(pid)
        own_rss_before = rss_bytes(os.getpid())
        fanout = Fanout(n)
        path = f"/v1/networks/{net_id}/peers?watch=true&since={revision}"
        gate = asyncio.Semaphore(open_concurrency)  # don't overflow the listen backlog
        head_bytes: list[int] = []

        async def open_one(index: int) -> None:
            async with gate:  # a controller that never answers fails the size, not hangs it
                reader, writer, head = await asyncio.wait_for(
                    open_stream(ctl.port, path, ADMIN_TOKEN), 60
                )
            writers.append(writer)
            head_bytes.append(head)
            readers.append(asyncio.create_task(read_stream(index, reader, fanout)))

        log(f"N={n}: opening {n} watch streams")
        opened_at = time.perf_counter()
        await asyncio.gather(*(open_one(i) for i in range(n)))
        # Every stream subscribed to the hub: only then is a change a fair test.
        deadline = time.monotonic() + 60 + n / 50
        while await metric(admin, "cladnet_controller_watchers") < n:
            if time.monotonic() > deadline:
                raise TimeoutError("not every watch stream subscribed")
            await asyncio.sleep(0.05)
        open_seconds = time.perf_counter() - opened_at
        rss_open = rss_bytes(pid)
        own_rss_open = rss_bytes(os.getpid())
        log(f"N={n}: {n} streams open in {open_seconds:.1f}s; changing the endpoint")

        mover_client = httpx.AsyncClient(
            base_url=ctl.url,
            headers={"Authorization": f"Bearer {mover['credential']}"},
            timeout=60,
        )
        await mover_client.get(f"/v1/hosts/{mover['host_id']}")  # open the connection
        events_before = await metric(admin, "cladnet_controller_watch_events_total")
        rounds: list[Change] = []
        put_latencies: list[float] = []
        cpu_per_change: list[float] = []
        timeout = 30 + n / 100
        missing_total = 0
        for k in range(changes):
            await asyncio.sleep(0.5)  # let the previous burst settle
            endpoint = f"198.51.100.{k + 1}:{51820 + k}"
            change = Change(marker=endpoint.encode(), watchers=n)
            fanout.current = change
            cpu_before = cpu_seconds(pid)
            with quiet_gc():
                change.sent_at = time.perf_counter()
                r = await mover_client.put(
                    f"/v1/hosts/{mover['host_id']}/endpoints", json={"endpoints": [endpoint]}
                )
                put_latencies.append(time.perf_counter() - change.sent_at)
                r.raise_for_status()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(change.done.wait(), timeout)
            cpu_per_change.append(cpu_seconds(pid) - cpu_before)
            fanout.current = None
            missing_total += change.remaining
            rounds.append(change)
            lat = sorted(change.latencies())
            log(
                f"N={n}: change {k + 1}: p50 {ms(percentile(lat, 50))} ms, "
                f"p99 {ms(percentile(lat, 99))} ms, max {ms(lat[-1] if lat else None)} ms, "
                f"missing {change.remaining}"
            )
        events_sent = await metric(admin, "cladnet_controller_watch_events_total") - events_before
    finally:
        await close_streams(writers, readers)
        if mover_client is not None:
            await mover_client.aclose()
        await admin.aclose()
        ctl.stop()

    pooled = [x for c in rounds for x in c.latencies()]
    wire = [b for c in rounds for b, a in zip(c.wire_bytes, c.arrivals, strict=True) if a]
    line = [b for c in rounds for b, a in zip(c.line_bytes, c.arrivals, strict=True) if a]
    total_per_change = [sum(c.wire_bytes) for c in rounds]
    return {
        "watchers": n,
        "open_seconds": round(open_seconds, 2),
        "streams_per_second_opened": round(n / open_seconds, 1),
        "response_head_bytes": head_bytes[0] if head_bytes else None,
        "latency_ms_all_changes": distribution(pooled),
        "latency_ms_per_change": [distribution(c.latencies()) for c in rounds],
        "p99_of_change_p99s_ms": (
            max(distribution(c.latencies())["p99"] or 0.0 for c in rounds) if rounds else None
        ),
        "missing_events": missing_total,
        "put_latency_ms": [ms(x) for x in put_latencies],
        "bytes": {
            "per_watcher_per_change_wire": round(sum(wire) / len(wire), 1) if wire else None,
            "per_watcher_per_change_wire_min_max": [min(wire), max(wire)] if wire else None,
            "per_watcher_per_change_line": round(sum(line) / len(line), 1) if line else None,
            "chunk_framing_per_event": round((sum(wire) - sum(line)) / len(wire), 1)
            if wire
            else None,
            "total_per_change": total_per_change,
            "total_per_change_per_watcher": round(sum(total_per_change) / len(rounds) / n, 1)
            if rounds
            else None,
        },
        "controller": {
            "events_sent_per_change": round(events_sent / max(1, len(rounds)), 1),
            "cpu_seconds_per_change": [round(x, 3) for x in cpu_per_change],
            # The controller's CPU per delivered event (median change): the fan-out cost.
            "cpu_us_per_delivered_event": round(
                sorted(cpu_per_change)[len(cpu_per_change) // 2] / n * 1e6, 1
            )
            if cpu_per_change
            else None,
            "rss_mb_before_streams": round(rss_before / 2**20, 1),
            "rss_mb_with_streams": round(rss_open / 2**20, 1),
            "rss_kb_per_stream": round((rss_open - rss_before) / 1024 / n, 1),
        },
        "bench_process": {
            "rss_kb_per_stream": round((own_rss_open - own_rss_before) / 1024 / n, 1),
        },
        "streams": {
            "bookmarks_seen": fanout.stats.bookmarks,
            "other_lines_seen": fanout.stats.other_events,
            "ended_early_or_errors": fanout.stats.errors,
        },
    }, peer_record


def _cidr_for(index: int) -> str:
    """A distinct private network per run on this etcd (its size is irrelevant here)."""
    return f"10.{100 + index}.0.0/24"


# --- one size directly on etcd (baseline) -----------------------------------------------


async def etcd_run(port: int, n: int, changes: int, value: bytes, clients: int) -> dict[str, Any]:
    """N aetcd watches of one prefix; time ``changes`` puts of a same-sized value to all."""
    pool = [aetcd.Client(host=HOST, port=port, timeout=60) for _ in range(clients)]
    watches: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for c in pool:
            await c.connect()
        prefix = f"/bench/convergence/{n}/{time.monotonic_ns()}/".encode()
        key = prefix + b"mover"
        await pool[0].put(key, value)
        current: list[Change | None] = [None]

        async def consume(index: int, watch: Any) -> None:
            async for _event in watch:
                now = time.perf_counter()
                change = current[0]
                if change is not None:
                    change.record(index, now, 0, 0)

        async def create(client: aetcd.Client, indices: range) -> None:
            # aetcd creates one watch at a time per client (one gRPC stream), so
            # several clients create in parallel.
            for i in indices:
                watch = await client.watch_prefix(prefix)
                watches.append(watch)
                tasks.append(asyncio.create_task(consume(i, watch)))

        log(f"N={n}: creating {n} etcd watches on {clients} aetcd client(s)")
        started = time.perf_counter()
        per = math.ceil(n / clients)
        await asyncio.gather(
            *(create(c, range(j * per, min(n, (j + 1) * per))) for j, c in enumerate(pool))
        )
        create_seconds = time.perf_counter() - started
        rounds: list[Change] = []
        timeout = 30 + n / 100
        for k in range(changes):
            await asyncio.sleep(0.5)
            change = Change(marker=b"", watchers=n)
            current[0] = change
            # Same size as the controller's peer record, different content per change.
            body = value[:-8] + f"{k:08d}".encode()
            with quiet_gc():
                change.sent_at = time.perf_counter()
                await pool[k % clients].put(key, body)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(change.done.wait(), timeout)
            current[0] = None
            rounds.append(change)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in pool:
            with contextlib.suppress(Exception):
                await c.close()
    pooled = [x for c in rounds for x in c.latencies()]
    return {
        "watchers": n,
        "what": f"{n} aetcd watch_prefix calls spread over {clients} aetcd client(s) "
        "(one gRPC watch stream each) in this process; time from put sent to the event "
        "read by each watch's iterator",
        "aetcd_clients": clients,
        "create_seconds": round(create_seconds, 2),
        "value_bytes": len(value),
        "latency_ms_all_changes": distribution(pooled),
        "latency_ms_per_change": [distribution(c.latencies()) for c in rounds],
        "missing_events": sum(c.remaining for c in rounds),
    }


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", default="100,1000,5000", help="watcher counts, comma separated")
    p.add_argument("--changes", type=int, default=5, help="endpoint changes per size")
    p.add_argument("--open-concurrency", type=int, default=100, help="streams opened at once")
    p.add_argument(
        "--etcd-clients",
        type=int,
        default=1,
        help="aetcd clients the baseline spreads its watches over (default 1)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny and fast: N = 50 (for CI)")
    args = p.parse_args(argv)
    args.sizes = [50] if args.smoke else [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.smoke:
        args.changes = min(args.changes, 3)
    return args


def feasibility(n: int, fd_limit: int) -> str | None:
    """Why N watchers cannot run here, or None if they can."""
    if fd_limit != resource.RLIM_INFINITY and fd_limit < n + FD_SLACK:
        return f"RLIMIT_NOFILE is {fd_limit}; {n} streams need ~{n + FD_SLACK}"
    need = n * EST_BYTES_PER_WATCHER
    if mem_available() < 2 * need:
        return f"MemAvailable {mem_available() // 2**20} MB < 2 x ~{need // 2**20} MB estimated"
    return None


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fd_soft, _ = raise_fd_limit(max(args.sizes) + FD_SLACK)
    etcd = Etcd.serving(tmp / "etcd", host=HOST)
    per_size: dict[str, Any] = {}
    try:
        log(f"starting etcd on {etcd.url}")
        etcd.start()
        for index, n in enumerate(args.sizes):
            reason = feasibility(n, fd_soft)
            if reason is not None:
                log(f"N={n}: skipped: {reason}")
                per_size[str(n)] = {"skipped": reason}
                continue
            started = time.monotonic()
            entry: dict[str, Any] = {}
            try:
                cladnet, peer_record = await controller_run(
                    etcd, tmp, index, n, args.changes, args.open_concurrency
                )
                entry["cladnet"] = cladnet
                gc.collect()
                entry["etcd"] = await etcd_run(
                    etcd.client_port, n, args.changes, peer_record, args.etcd_clients
                )
                c99 = cladnet["latency_ms_all_changes"]["p99"]
                e99 = entry["etcd"]["latency_ms_all_changes"]["p99"]
                entry["ratio_p99_cladnet_vs_etcd"] = round(c99 / e99, 2) if c99 and e99 else None
                if n in TARGETS_P99_SECONDS:
                    entry["target"] = {
                        "p99_ms_below": TARGETS_P99_SECONDS[n] * 1000,
                        "met": c99 is not None
                        and c99 < TARGETS_P99_SECONDS[n] * 1000
                        and cladnet["missing_events"] == 0,
                    }
            except Exception as exc:  # report it and go on with the next size
                log(f"N={n}: failed: {exc!r}")
                entry["error"] = repr(exc)
            entry["seconds"] = round(time.monotonic() - started, 1)
            per_size[str(n)] = entry
            gc.collect()
    finally:
        etcd.stop()

    measured = {n: e for n, e in per_size.items() if "cladnet" in e}
    bytes_per_watcher = {
        n: e["cladnet"]["bytes"]["total_per_change_per_watcher"] for n, e in measured.items()
    }
    values = [v for v in bytes_per_watcher.values() if v]
    return {
        "sizes": per_size,
        "scaling": {
            "bytes_per_change_per_watcher_by_n": bytes_per_watcher,
            # ~1.0 means total bytes per change grow linearly with N: O(N), not O(N^2).
            "max_over_min_bytes_per_watcher": round(max(values) / min(values), 3)
            if values
            else None,
            "total_bytes_per_change_by_n": {
                n: e["cladnet"]["bytes"]["total_per_change"][0] for n, e in measured.items()
            },
        },
        "ok": all("error" not in e for e in per_size.values())
        and all(e["cladnet"]["missing_events"] == 0 for e in measured.values()),
    }


def main(argv: list[str] | None = None) -> int:
    common.clean_up_on_sigterm()
    args = parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "cladnet.convergence",
        "inputs": {
            "sizes": args.sizes,
            "changes_per_size": args.changes,
            "open_concurrency": args.open_concurrency,
            "etcd_baseline_clients": args.etcd_clients,
            "controller_watch_keepalive_seconds": 30,
            "smoke": args.smoke,
            "client": "one asyncio process, raw HTTP/1.1 over asyncio streams, admin token; "
            "latency = PUT sent -> MODIFIED line read by this process",
        },
        "machine": machine_facts(),
    }
    with tempfile.TemporaryDirectory(prefix="cladnet-bench-convergence-") as tmp:
        report |= asyncio.run(run(args, Path(tmp)))
    report["duration_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, separators=(",", ":")))
    parts = []
    for n, e in report["sizes"].items():
        if "cladnet" in e:
            c, b = e["cladnet"], e["etcd"]
            parts.append(
                f"N={n}: p50 {c['latency_ms_all_changes']['p50']} / "
                f"p99 {c['latency_ms_all_changes']['p99']} ms "
                f"(etcd p99 {b['latency_ms_all_changes']['p99']} ms, "
                f"x{e['ratio_p99_cladnet_vs_etcd']}), "
                f"{c['bytes']['per_watcher_per_change_wire']} B/watcher/change"
                + (
                    f", target {'met' if e['target']['met'] else 'NOT met'}"
                    if "target" in e
                    else ""
                )
            )
        else:
            parts.append(f"N={n}: {e.get('skipped') or e.get('error')}")
    print("convergence: " + "; ".join(parts) + ("" if report["ok"] else " — FAILED"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
