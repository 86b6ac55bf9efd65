"""The collector's SQLite metrics store: write throughput and query latency.

    /work/venv/bin/python -m bench.store            # 1000 hosts x 60 series
    /work/venv/bin/python -m bench.store --smoke    # 50 hosts, a few rounds (CI)

Load: ``--hosts`` hosts x 60 series (the agent's metric names: cpu per core,
memory, disks, interfaces, peers), one sample per series every 2 s. Writes go in
chunks of ``--chunk-hosts`` hosts (the collector flushes every 0.2 s, i.e. about a
tenth of the hosts per write at 1000 hosts / 2 s). Only ``store.write`` is timed,
not building the samples.

Writers compared in the same run, on the same samples, each in a fresh file:

- ``store``: :class:`collector.store.SqliteStore` (interned series, raw + 10-s
  rollups + latest, one transaction per write);
- ``batched-flat``: one ``executemany`` per chunk into a flat table (network, host,
  name, labels JSON, ts, value) with an index for series queries — batched, but no
  interning and no rollups;
- ``naive``: the same flat table, one ``INSERT`` and one ``COMMIT`` per sample
  (run for ``--naive-seconds`` only; its rate does not depend on the total).

All three use WAL and ``synchronous=NORMAL``. Ratios are against ``naive``, and the
store's rate against the target (hosts x 60 / 2 s).

Query latency: ``series`` over the last hour at step 10 s (rollups), over the last
10 minutes at step 2 s (raw), and ``latest``/``aggregate`` over the network, after
writing an hour of history for ``--history-hosts`` hosts on top of the write load.
Reported as the median and p95 of ``--queries`` calls. No asserts: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import common
from cladnet.metrics import Sample
from collector.store import SqliteStore

INTERVAL = 2.0


def host_series() -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The 60 series one agent sends (names from the agent's metric set)."""
    out: list[tuple[str, tuple[tuple[str, str], ...]]] = [("cpu_percent", ())]
    out += [("cpu_percent", (("core", str(c)),)) for c in range(4)]
    out += [
        (n, ())
        for n in (
            "mem_used_bytes",
            "mem_total_bytes",
            "mem_percent",
            "swap_percent",
            "load1",
            "load5",
            "load15",
            "procs",
            "uptime_seconds",
        )
    ]
    for mount in ("/", "/data"):
        out += [("disk_percent", (("mount", mount),)), ("disk_used_bytes", (("mount", mount),))]
    for disk in ("vda", "vdb"):
        out += [("disk_read_bytes", (("disk", disk),)), ("disk_write_bytes", (("disk", disk),))]
    for iface in ("eth0", "cladnet0"):
        out += [("net_rx_bytes", (("iface", iface),)), ("net_tx_bytes", (("iface", iface),))]
    peers = 0
    while len(out) < 60:
        peer = (("peer", f"peer{peers:02d}"),)
        for name in ("peer_handshake_age_seconds", "peer_rx_bytes", "peer_tx_bytes", "peer_rtt_ms"):
            if len(out) < 60:
                out.append((name, peer))
        peers += 1
    return out


SERIES = host_series()


def round_samples(hosts: Sequence[str], ts: float, rng: random.Random) -> list[Sample]:
    return [
        Sample("bench", host, name, labels, ts + (i % 20) * 0.05, rng.random() * 100)
        for i, host in enumerate(hosts)
        for name, labels in SERIES
    ]


def chunks(samples: list[Sample], size: int) -> list[list[Sample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def connect_flat(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(
        "CREATE TABLE samples (network TEXT, host TEXT, name TEXT, labels TEXT, ts REAL,"
        " value REAL)"
    )
    db.execute("CREATE INDEX samples_series ON samples (host, name, labels, ts)")
    return db


def flat_row(s: Sample) -> tuple[Any, ...]:
    return (s.network, s.host, s.name, json.dumps(dict(s.labels)), s.ts, s.value)


def bench_flat_batched(path: Path, rounds: list[list[list[Sample]]]) -> float:
    db = connect_flat(path)
    spent = 0.0
    for batches in rounds:
        for batch in batches:
            started = time.perf_counter()
            db.execute("BEGIN")
            db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)", map(flat_row, batch))
            db.execute("COMMIT")
            spent += time.perf_counter() - started
    db.close()
    return spent


def bench_naive(path: Path, samples: list[Sample], budget: float) -> tuple[int, float]:
    db = connect_flat(path)
    done, started = 0, time.perf_counter()
    for s in samples:
        db.execute("BEGIN")
        db.execute("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)", flat_row(s))
        db.execute("COMMIT")
        done += 1
        if done % 100 == 0 and time.perf_counter() - started > budget:
            break
    spent = time.perf_counter() - started
    db.close()
    return done, spent


async def bench_store(store: SqliteStore, rounds: list[list[list[Sample]]]) -> float:
    spent = 0.0
    for batches in rounds:
        for batch in batches:
            started = time.perf_counter()
            await store.write(batch)
            spent += time.perf_counter() - started
    return spent


async def timed(fn: Callable[[], Any], n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[min(len(times) - 1, int(len(times) * 0.95))], 2),
    }


def file_size(work: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in work.glob(pattern))


def make_rounds(hosts: list[str], n: int, t0: float, chunk: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    per_chunk = chunk * len(SERIES)
    return [chunks(round_samples(hosts, t0 + r * INTERVAL, rng), per_chunk) for r in range(n)]


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    hosts = [f"vm{i:04d}" for i in range(args.hosts)]
    now = time.time()
    # The write load is the newest data; the hour of history lies right before it.
    t_load = now - args.rounds * INTERVAL
    rounds = make_rounds(hosts, args.rounds, t_load, args.chunk_hosts, args.seed)
    total = args.rounds * len(hosts) * len(SERIES)
    target = len(hosts) * len(SERIES) / INTERVAL
    report: dict[str, Any] = {"samples": total, "target_samples_per_s": target}

    store = SqliteStore(work / "store.db", raw_retention=6 * 3600, rollup_retention=30 * 86400)
    try:
        # Warm-up round (creates the series rows), not timed.
        await bench_store(store, make_rounds(hosts, 1, t_load - 3600 - 10, args.chunk_hosts, 0))
        spent = await bench_store(store, rounds)
        report["store"] = {"seconds": round(spent, 3), "samples_per_s": round(total / spent)}

        # An hour of history for a few hosts, then the queries.
        history_hosts = hosts[: args.history_hosts]
        rng = random.Random(args.seed + 1)
        started = time.perf_counter()
        per_write = args.chunk_hosts * len(SERIES)
        pending: list[Sample] = []
        for r in range(int(3600 / INTERVAL)):
            pending += round_samples(history_hosts, t_load - 3600 + r * INTERVAL, rng)
            if len(pending) >= per_write:
                await store.write(pending)
                pending = []
        if pending:
            await store.write(pending)
        report["history"] = {
            "hosts": len(history_hosts),
            "samples": int(3600 / INTERVAL) * len(history_hosts) * len(SERIES),
            "seconds": round(time.perf_counter() - started, 2),
        }
        end = now
        qrng = random.Random(args.seed + 2)

        def pick() -> str:
            return qrng.choice(history_hosts)

        queries = {
            "series 1h step 10s avg (rollups)": lambda: store.series(
                pick(), "cpu_percent", None, end - 3600, end, 10, "avg"
            ),
            "series 1h step 10s last (rollups)": lambda: store.series(
                pick(), "peer_rtt_ms", {"peer": "peer00"}, end - 3600, end, 10, "last"
            ),
            "series 10min step 2s avg (raw)": lambda: store.series(
                pick(), "load1", None, end - 600, end, 2, "avg"
            ),
            "latest(host)": lambda: store.latest(network="bench", host=pick()),
            "latest(network)": lambda: store.latest(network="bench"),
            "aggregate(network, cpu_percent)": lambda: store.aggregate(
                "bench", "cpu_percent", end - 60
            ),
            "hosts(network)": lambda: store.hosts("bench"),
        }
        points = await store.series(hosts[0], "cpu_percent", None, end - 3600, end, 10, "avg")
        report["series_points_1h_step10"] = len(points)
        report["queries"] = {
            name: await timed(fn, max(3, args.queries // (10 if "network" in name else 1)))
            for name, fn in queries.items()
        }
        size = file_size(work, "store.db*")
        report["store_file_mb"] = round(size / 2**20, 1)
        written = total + len(hosts) * len(SERIES) + report["history"]["samples"]
        report["store_bytes_per_sample"] = round(size / written, 1)
    finally:
        await store.close()

    spent = bench_flat_batched(work / "flat.db", rounds)
    report["batched-flat"] = {"seconds": round(spent, 3), "samples_per_s": round(total / spent)}
    flat = [s for batches in rounds for batch in batches for s in batch]
    done, spent = bench_naive(work / "naive.db", flat, args.naive_seconds)
    report["naive"] = {
        "samples": done,
        "seconds": round(spent, 3),
        "samples_per_s": round(done / spent),
    }
    naive = report["naive"]["samples_per_s"]
    for key in ("store", "batched-flat", "naive"):
        rate = report[key]["samples_per_s"]
        report[key]["x_naive"] = round(rate / naive, 1)
        report[key]["x_target"] = round(rate / target, 2)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="50 hosts, few rounds (CI)")
    parser.add_argument("--hosts", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="2-s rounds written")
    parser.add_argument("--chunk-hosts", type=int, default=100, help="hosts per write call")
    parser.add_argument("--history-hosts", type=int, default=None)
    parser.add_argument("--queries", type=int, default=None, help="timed calls per query")
    parser.add_argument("--naive-seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (tmp)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.hosts = args.hosts or (50 if smoke else 1000)
    args.rounds = args.rounds or (5 if smoke else 30)
    args.history_hosts = min(args.hosts, args.history_hosts or (2 if smoke else 20))
    args.queries = args.queries or (10 if smoke else 50)
    args.naive_seconds = args.naive_seconds or (1.0 if smoke else 5.0)
    args.chunk_hosts = min(args.chunk_hosts, args.hosts)
    return args


def print_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    """The human-readable tables, on stderr (stdout carries the JSON and the summary)."""
    out = functools.partial(print, file=sys.stderr)
    out(
        f"SQLite store bench: {args.hosts} hosts x {len(SERIES)} series every {INTERVAL:.0f} s,"
        f" {args.rounds} rounds ({report['samples']:,} samples), {args.chunk_hosts} hosts"
        f" per write; target {report['target_samples_per_s']:,.0f} samples/s"
    )
    out(f"{'writer':<14}{'samples/s':>12}{'x naive':>10}{'x target':>10}")
    for key in ("store", "batched-flat", "naive"):
        r = report[key]
        out(f"{key:<14}{r['samples_per_s']:>12,}{r['x_naive']:>10}{r['x_target']:>10}")
    h = report["history"]
    out(
        f"queries (after 1 h history for {h['hosts']} hosts, {h['samples']:,} samples in"
        f" {h['seconds']} s; file {report['store_file_mb']} MB,"
        f" {report['store_bytes_per_sample']} B/sample;"
        f" 1 h at step 10 s = {report['series_points_1h_step10']} points):"
    )
    out(f"{'query':<36}{'median ms':>11}{'p95 ms':>9}")
    for name, q in report["queries"].items():
        out(f"{name:<36}{q['median_ms']:>11}{q['p95_ms']:>9}")


def main(argv: list[str] | None = None) -> int:
    common.clean_up_on_sigterm()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cladnet-store-bench-", dir=args.dir) as tmp:
        report = asyncio.run(run(args, Path(tmp)))
    report["benchmark"] = "cladnet.store"
    report["machine"] = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
    }
    print_table(report, args)
    print(json.dumps(report, separators=(",", ":")))
    q = report["queries"]["series 1h step 10s avg (rollups)"]
    print(
        f"store: SQLite writes {report['store']['samples_per_s']:,} samples/s "
        f"(x{report['store']['x_naive']} one-INSERT-per-row), a 1-h series at a 10-s step "
        f"in {q['median_ms']} ms median"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
