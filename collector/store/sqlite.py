"""The embedded backend: one SQLite file (stdlib ``sqlite3``), WAL, batched writes.

Schema (``PRAGMA user_version`` = 1)::

    hosts  (id, network, host, last_ts)              UNIQUE (network, host), INDEX (host)
    series (id, hid → hosts, name, labels_json)      UNIQUE (hid, name, labels)
    raw    (hid, ts, sid → series, value)            PK (hid, ts, sid)            WITHOUT ROWID
    rollup (hid, bucket, sid, min, max, sum, count,  PK (hid, bucket, sid)        WITHOUT ROWID
            last, last_ts)
    latest (sid, ts, value)                          PK (sid)                     WITHOUT ROWID
    meta   (key, value)                               raw_horizon: raw data older is gone

Design notes:

- Series are interned, so a raw row is just four numbers. Network/host live in
  ``hosts``; the writer keeps the id maps in memory.
- ``raw`` and ``rollup`` are clustered by *host first*, then time. A host's batch
  (all its series at one timestamp) is one contiguous append, so a commit of a
  few hundred hosts' batches dirties a few hundred pages. Clustering by series
  would touch one page per series (60,000 at 1000 hosts) on every commit. The
  price: a query of one series scans the host's other series in the same time
  range (≈ 60 rows per timestamp), which is cheap for the ranges charts ask.
- Rollups (10-s buckets: min, max, sum, count, last) and ``latest`` are folded in
  once per write, in its transaction: the write's rows go to a temporary table,
  then into raw (``ON CONFLICT DO NOTHING``), then one ``INSERT … SELECT … ON
  CONFLICT DO UPDATE`` each merges them into the rollup and latest rows (an
  ``AFTER INSERT`` trigger used to, row by row). Only rows new to raw
  are folded, so a re-delivered batch changes nothing. (One edge: a duplicate of a
  sample whose raw row was already pruned is folded into its rollup again.)
- Queries with a step that is a multiple of 10 s read the rollups; others read raw
  samples, except ranges that start before the raw horizon (what retention already
  removed), which fall back to the rollups at 10-s resolution.
- One writer connection on one dedicated thread (SQLite has one writer anyway);
  queries use a second connection on their own thread, so reads run beside writes
  (WAL) and never wait for a write transaction.
- Retention deletes a host at a time through the primary key (hosts in chunks,
  each chunk its own short transaction, so ingest writes interleave). Series with
  no data left (older than the rollup retention) are forgotten.

Sizing (``python -m bench.store``, 2 cores): about 100,000 samples/s sustained on one
writer thread (1000 hosts x 60 series every 2 s is 30,000/s), flat over 30 minutes of
such load. On disk: ≈ 30 bytes per raw sample and ≈ 68 bytes per rollup row (one per
series per 10 s). At 1000 hosts that is ≈ 3.2 GB per hour of raw data and ≈ 35 GB per
day of rollups; at 50 hosts the defaults (6 h raw, 7 days of rollups) take ≈ 13 GB.
Long histories at large scale want a coarser second rollup tier, or VictoriaMetrics.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from cladnet.metrics import Batch, Sample, SeriesColumn
from collector.store.base import (
    ROLLUP_STEP,
    ColumnGroup,
    Labels,
    MetricsStore,
    SampleGroup,
    bucket_bounds,
    check_query,
    network_aggregate,
    normalize_labels,
    pick_series,
    split_batches,
    usable_time,
)

T = TypeVar("T")
SCHEMA_VERSION = 1
PRUNE_CHUNK = 64  # hosts per retention transaction
FILL_CHUNK = 8192  # rows per multi-row INSERT: 32,768 parameters, SQLite's default limit
# (hid, name, labels as the writer got them: a dict's items or Labels) → series id.
SeriesKey = tuple[int, str, Labels]
# An id map and a key added to it during a write transaction (undone on rollback).
Interned = tuple[dict[Any, Any], Any]
COLUMN_CACHE = 65536  # (host, series column) → series ids kept; about one per host

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hosts (
    id INTEGER PRIMARY KEY, network TEXT NOT NULL, host TEXT NOT NULL, last_ts REAL,
    UNIQUE (network, host));
CREATE INDEX IF NOT EXISTS hosts_by_host ON hosts (host);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, hid INTEGER NOT NULL REFERENCES hosts (id), name TEXT NOT NULL,
    labels TEXT NOT NULL, UNIQUE (hid, name, labels));
CREATE TABLE IF NOT EXISTS raw (
    hid INTEGER NOT NULL, ts REAL NOT NULL, sid INTEGER NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (hid, ts, sid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup (
    hid INTEGER NOT NULL, bucket INTEGER NOT NULL, sid INTEGER NOT NULL,
    min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, count INTEGER NOT NULL,
    last REAL NOT NULL, last_ts REAL NOT NULL,
    PRIMARY KEY (hid, bucket, sid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS latest (
    sid INTEGER PRIMARY KEY, ts REAL NOT NULL, value REAL NOT NULL) WITHOUT ROWID;
-- Dropped: rollups and latest are folded in per write (SqliteStore._write).
DROP TRIGGER IF EXISTS raw_fold;
"""

# A write's rows (hid, ts, sid, value) before they go to raw; see SqliteStore._write.
FLUSH_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS flush"
    " (hid INTEGER NOT NULL, ts REAL NOT NULL, sid INTEGER NOT NULL, value REAL NOT NULL)"
)


@lru_cache(maxsize=16)
def fill_flush(rows: int) -> str:
    """A multi-row INSERT of ``rows`` rows into the flush table (a power of two, so few
    distinct statements exist and sqlite3's statement cache keeps them prepared)."""
    return "INSERT INTO temp.flush (hid, ts, sid, value) VALUES " + ",".join(["(?,?,?,?)"] * rows)


INSERT_RAW = (
    "INSERT INTO raw (hid, ts, sid, value) SELECT hid, ts, sid, value FROM temp.flush"
    " WHERE true ON CONFLICT DO NOTHING"  # WHERE: upsert parsing rule
)
# Only when some rows were already stored (a re-delivery after a restart) or came twice
# in this flush: keep the rows that are new, the first of each, like ON CONFLICT DO NOTHING.
DROP_STORED = (
    "DELETE FROM temp.flush WHERE rowid NOT IN"
    " (SELECT MIN(rowid) FROM temp.flush GROUP BY hid, ts, sid)"
    " OR EXISTS (SELECT 1 FROM raw r"
    " WHERE r.hid = flush.hid AND r.ts = flush.ts AND r.sid = flush.sid)"
)
BUCKET = f"CAST(ts / {ROLLUP_STEP} AS INTEGER) * {ROLLUP_STEP}"
# The write's new rows folded into the rollups in one statement, in insertion order:
# what the per-row trigger did, without a trigger program per row. (Aggregating with
# GROUP BY first measured slower: it sorts, and ``last`` needs a second statement,
# as SQLite takes a bare column from the MAX() row only beside a single MIN()/MAX().)
FOLD_ROLLUP = (
    "INSERT INTO rollup (hid, bucket, sid, min, max, sum, count, last, last_ts)"
    f" SELECT hid, {BUCKET}, sid, value, value, value, 1, value, ts"
    " FROM temp.flush WHERE true ORDER BY rowid"
    " ON CONFLICT (hid, bucket, sid) DO UPDATE SET"
    " min = MIN(min, excluded.min), max = MAX(max, excluded.max),"
    " sum = sum + excluded.sum, count = count + 1,"
    " last = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last ELSE last END,"
    " last_ts = MAX(last_ts, excluded.last_ts)"
)
# Row by row in insertion order, the newest timestamp winning (no ties: raw's key);
# a GROUP BY sid picking each series' newest row first cost twice as much (it sorts).
FOLD_LATEST = (
    "INSERT INTO latest (sid, ts, value) SELECT sid, ts, value"
    " FROM temp.flush WHERE true ORDER BY rowid"
    " ON CONFLICT (sid) DO UPDATE SET ts = excluded.ts, value = excluded.value"
    " WHERE excluded.ts >= latest.ts"
)

# SQL per aggregation over raw rows / rollup rows of one series, grouped by bucket
# index ``b``. For ``last`` SQLite takes the bare column from the row holding MAX().
RAW_AGG = {
    "avg": "AVG(value)",
    "min": "MIN(value)",
    "max": "MAX(value)",
    "last": "value, MAX(ts)",
}
ROLLUP_AGG = {
    "avg": "SUM(sum) / SUM(count)",
    "min": "MIN(min)",
    "max": "MAX(max)",
    "last": "last, MAX(last_ts)",
}


def labels_json(labels: Labels) -> str:
    return json.dumps(dict(labels), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=65536)
def parse_labels(text: str) -> Labels:
    return tuple(sorted(json.loads(text).items()))


def _connect(path: Path, cache_mib: int) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(f"PRAGMA cache_size = {-1024 * cache_mib}")
    db.execute("PRAGMA temp_store = MEMORY")
    db.execute("PRAGMA journal_size_limit = 67108864")  # truncate the WAL to 64 MiB
    # Checkpoint every 64 MiB of WAL, not every 4 MiB: the latest and rollup pages a
    # flush rewrites are then copied back once per checkpoint, not once every few
    # flushes (halved the writer's COMMIT time in bench.ingest's load).
    db.execute("PRAGMA wal_autocheckpoint = 16384")
    return db


class SqliteStore(MetricsStore):
    """Metrics in one SQLite file: raw samples for ``raw_retention`` seconds, 10-s
    rollups for ``rollup_retention`` seconds (must be at least as long)."""

    def __init__(
        self,
        path: Path | str,
        raw_retention: float = 6 * 3600,
        rollup_retention: float = 7 * 86400,
        *,
        cache_mib: int = 64,
    ) -> None:
        if not (raw_retention > 0 and rollup_retention > 0):
            raise ValueError("retention periods must be positive")
        if raw_retention > rollup_retention:
            raise ValueError(
                f"raw_retention ({raw_retention}) must not exceed rollup_retention "
                f"({rollup_retention}): rollups answer where raw data is gone"
            )
        self.path = Path(path)
        self.raw_retention, self.rollup_retention = float(raw_retention), float(rollup_retention)
        self.skipped = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._w = _connect(self.path, cache_mib)
        version = self._w.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            self._w.close()
            raise RuntimeError(f"{self.path}: unknown schema version {version}")
        self._w.executescript(SCHEMA)
        self._w.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._w.execute(FLUSH_TABLE)
        self._r = _connect(self.path, cache_mib)
        self._r.execute("PRAGMA query_only = 1")
        # Writer-thread state: id maps (the tables are the truth; these mirror them).
        self._hids: dict[tuple[str, str], int] = {
            (n, h): i for i, n, h in self._w.execute("SELECT id, network, host FROM hosts")
        }
        self._sids: dict[tuple[int, str, Labels], int] = {
            (hid, name, parse_labels(lb)): sid
            for sid, hid, name, lb in self._w.execute("SELECT id, hid, name, labels FROM series")
        }
        # The hot path's one lookup per sample (see SeriesKey).
        self._keys: dict[SeriesKey, int] = {}
        # The columnar path's one lookup per batch: (hid, id(column)) → the column (kept
        # so its id is not reused while cached) and the series id of each of its entries.
        self._columns: dict[tuple[int, int], tuple[SeriesColumn, list[int]]] = {}
        row = self._w.execute("SELECT value FROM meta WHERE key = 'raw_horizon'").fetchone()
        self.raw_horizon: float = float(row[0]) if row else -math.inf
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="metrics-sqlite-w")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="metrics-sqlite-r")
        self._closed = False

    # ---- plumbing ---------------------------------------------------------------------

    async def _on(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("the metrics store is closed")
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _transaction(self, fn: Callable[[], T]) -> T:
        db = self._w
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # ---- writes -----------------------------------------------------------------------

    def _intern_host(self, network: str, host: str, ts: float, new: list[Interned]) -> int:
        """A host's id, creating its row (inside the transaction)."""
        hkey = (network, host)
        hid = self._hids.get(hkey)
        if hid is None:
            cur = self._w.execute(
                "INSERT INTO hosts (network, host, last_ts) VALUES (?, ?, ?)", (network, host, ts)
            )
            hid = self._hids[hkey] = int(cur.lastrowid or 0)
            new.append((self._hids, hkey))
        return hid

    def _intern_series(self, key: SeriesKey, new: list[Interned]) -> int:
        """A series' id for a ``_keys`` key, creating its row (inside the transaction)."""
        hid, name, given = key
        labels = normalize_labels(given)
        skey = (hid, name, labels)
        sid = self._sids.get(skey)
        if sid is None:
            cur = self._w.execute(
                "INSERT INTO series (hid, name, labels) VALUES (?, ?, ?)",
                (hid, name, labels_json(labels)),
            )
            sid = self._sids[skey] = int(cur.lastrowid or 0)
            new.append((self._sids, skey))
        self._keys[key] = sid
        new.append((self._keys, key))
        return sid

    def _column_sids(self, hid: int, column: SeriesColumn, new: list[Interned]) -> list[int]:
        """The series ids of a column's entries for one host (inside the transaction)."""
        ckey = (hid, id(column))
        cached = self._columns.get(ckey)
        if cached is not None and cached[0] is column:
            return cached[1]
        keys = self._keys
        sids = []
        for name, labels in zip(*column, strict=True):
            key = (hid, name, tuple(labels.items()))
            sid = keys.get(key)
            sids.append(self._intern_series(key, new) if sid is None else sid)
        if len(self._columns) >= COLUMN_CACHE:  # bounded; rebuilding is one pass
            self._columns.clear()
        self._columns[ckey] = (column, sids)
        new.append((self._columns, ckey))
        return sids

    def _write(self, groups: Sequence[SampleGroup], columns: Sequence[ColumnGroup] = ()) -> None:
        new: list[Interned] = []

        def run() -> None:
            # The rows' parameters, flat: hid, ts, sid, value, hid, ts, …
            flat: list[float] = []
            newest: dict[int, float] = {}
            hids, keys, isfinite = self._hids, self._keys, math.isfinite
            for network, host, ts, column, values in columns:
                if not usable_time(ts):
                    self.skipped += len(values)
                    continue
                if not values:
                    continue
                hid = hids.get((network, host)) or self._intern_host(network, host, ts, new)
                if ts > newest.get(hid, -1.0):
                    newest[hid] = ts
                sids = self._column_sids(hid, column, new)
                # Values are finite (decode checked): no Python code per sample here.
                flat.extend(
                    itertools.chain.from_iterable(
                        zip(itertools.repeat(hid), itertools.repeat(ts), sids, values)
                    )
                )
            for network, host, ts, items in groups:
                if not usable_time(ts):
                    self.skipped += len(items)
                    continue
                hid = 0  # looked up at the first usable sample; ids start at 1
                for name, labels, value in items:
                    if not isfinite(value):
                        self.skipped += 1
                        continue
                    if not hid:
                        hid = hids.get((network, host)) or self._intern_host(network, host, ts, new)
                        if ts > newest.get(hid, -1.0):
                            newest[hid] = ts
                    key = (hid, name, tuple(labels.items()) if isinstance(labels, dict) else labels)
                    sid = keys.get(key)
                    if sid is None:
                        sid = self._intern_series(key, new)
                    flat += (hid, ts, sid, value)
            # Multi-row INSERTs instead of executemany: SQLite then runs each with the
            # GIL released once; executemany takes the GIL back for every row and, beside
            # a busy event loop, waits for it each time (30x slower in the collector).
            # Parameters, not a JSON array: json_extract cost 2.5 us a row.
            db = self._w
            db.execute("DELETE FROM temp.flush")
            rows = len(flat) // 4
            done, size = 0, FILL_CHUNK
            while done < rows:
                while size > rows - done:
                    size //= 2
                db.execute(fill_flush(size), flat[4 * done : 4 * (done + size)])
                done += size
            db.execute("SAVEPOINT fold")
            if db.execute(INSERT_RAW).rowcount != rows:
                # Some were stored already: fold in only the new ones.
                db.execute("ROLLBACK TO fold")
                db.execute(DROP_STORED)
                db.execute(INSERT_RAW)
            db.execute("RELEASE fold")
            # Folded per write, not by a trigger per row.
            for sql in (FOLD_ROLLUP, FOLD_LATEST):
                db.execute(sql)
            self._w.executemany(
                "UPDATE hosts SET last_ts = MAX(COALESCE(last_ts, ?1), ?1) WHERE id = ?2",
                [(ts, hid) for hid, ts in newest.items()],
            )

        try:
            self._transaction(run)
        except BaseException:
            # The rows behind the new ids were rolled back: forget the ids too.
            for ids, key in new:
                ids.pop(key, None)
            raise

    async def write_groups(self, groups: Sequence[SampleGroup]) -> None:
        if groups:
            await self._on(self._writer, self._write, groups)

    async def write_batches(self, batches: Sequence[Batch]) -> None:
        """Decoded version-2 batches by their columns: one series lookup per batch."""
        if batches:
            await self._on(self._writer, self._write, *split_batches(batches))

    # ---- reads ------------------------------------------------------------------------

    def _latest(self, network: str | None, host: str | None) -> list[Sample]:
        sql = (
            "SELECT h.network, h.host, s.name, s.labels, l.ts, l.value"
            " FROM hosts h JOIN series s ON s.hid = h.id JOIN latest l ON l.sid = s.id"
        )
        where, args = [], []
        if network is not None:
            where.append("h.network = ?")
            args.append(network)
        if host is not None:
            where.append("h.host = ?")
            args.append(host)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [
            Sample(n, h, name, parse_labels(lb), ts, value)
            for n, h, name, lb, ts, value in self._r.execute(sql, args)
        ]

    async def latest(self, network: str | None = None, host: str | None = None) -> list[Sample]:
        return await self._on(self._reader, self._latest, network, host)

    def _series(
        self,
        host: str,
        name: str,
        labels: Mapping[str, str] | None,
        start: float,
        end: float,
        step: float,
        agg: str,
        network: str | None,
        source: str,
    ) -> list[tuple[float, float]]:
        sql = (
            "SELECT h.network, s.labels, s.hid, s.id FROM hosts h JOIN series s ON s.hid = h.id"
            " WHERE h.host = ? AND s.name = ?"
        )
        args: list[Any] = [host, name]
        if network is not None:
            sql += " AND h.network = ?"
            args.append(network)
        ids = {(n, parse_labels(lb)): (hid, sid) for n, lb, hid, sid in self._r.execute(sql, args)}
        chosen = pick_series(host, name, labels, ids)
        if chosen is None:
            return []
        hid, sid = ids[chosen]
        first, last = bucket_bounds(start, end, step)
        lo, hi = first * step, (last + 1) * step
        if source == "auto":
            aligned = step % ROLLUP_STEP == 0
            source = "rollup" if aligned or start < self.raw_horizon else "raw"
        if source == "rollup":
            table, time_col, expr = "rollup", "bucket", ROLLUP_AGG[agg]
        elif source == "raw":
            table, time_col, expr = "raw", "ts", RAW_AGG[agg]
        else:
            raise ValueError(f"source must be auto, raw or rollup, got {source!r}")
        query = (
            f"SELECT CAST({time_col} / ?1 AS INTEGER) AS b, {expr} FROM {table}"
            f" WHERE hid = ?2 AND {time_col} >= ?3 AND {time_col} < ?4 AND sid = ?5"
            " GROUP BY b ORDER BY b"
        )
        rows = self._r.execute(query, (step, hid, lo, hi, sid)).fetchall()
        return [(float(b * step), float(row[1])) for row in rows if (b := row[0]) is not None]

    async def series(
        self,
        host: str,
        name: str,
        labels: Mapping[str, str] | None,
        start: float,
        end: float,
        step: float,
        agg: str = "avg",
        *,
        network: str | None = None,
        source: str = "auto",
    ) -> list[tuple[float, float]]:
        """See :meth:`MetricsStore.series`. ``source`` (``auto``/``raw``/``rollup``)
        forces the table read, for diagnostics and tests."""
        check_query(start, end, step, agg)
        return await self._on(
            self._reader,
            self._series,
            host,
            name,
            labels,
            start,
            end,
            step,
            agg,
            network,
            source,
        )

    def _aggregate(self, network: str, name: str, since: float) -> dict[str, Any]:
        rows = self._r.execute(
            "SELECT h.host, s.labels, l.ts, l.value"
            " FROM hosts h JOIN series s ON s.hid = h.id JOIN latest l ON l.sid = s.id"
            " WHERE h.network = ? AND s.name = ? AND l.ts >= ?",
            (network, name, since),
        )
        samples = [
            Sample(network, host, name, parse_labels(lb), ts, value) for host, lb, ts, value in rows
        ]
        return network_aggregate(samples, since)

    async def aggregate(self, network: str, name: str, since: float) -> dict[str, Any]:
        return await self._on(self._reader, self._aggregate, network, name, since)

    def _hosts(self, network: str) -> dict[str, float]:
        rows = self._r.execute(
            "SELECT host, last_ts FROM hosts WHERE network = ? AND last_ts IS NOT NULL",
            (network,),
        )
        return {host: float(ts) for host, ts in rows}

    async def hosts(self, network: str) -> dict[str, float]:
        return await self._on(self._reader, self._hosts, network)

    def _stats(self) -> dict[str, int]:
        """Row counts (full scans: for tests and the bench, not for hot paths)."""
        return {
            table: int(self._r.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            for table in ("hosts", "series", "raw", "rollup", "latest")
        }

    async def stats(self) -> dict[str, int]:
        return await self._on(self._reader, self._stats)

    # ---- retention --------------------------------------------------------------------

    def _prune_hosts(self, hids: list[int], raw_cut: float, rollup_cut: float) -> None:
        def run() -> None:
            for hid in hids:
                self._w.execute("DELETE FROM raw WHERE hid = ? AND ts < ?", (hid, raw_cut))
                self._w.execute(
                    "DELETE FROM rollup WHERE hid = ? AND bucket <= ?",
                    (hid, rollup_cut - ROLLUP_STEP),
                )

        self._transaction(run)

    def _forget(self, raw_cut: float, rollup_cut: float) -> None:
        """Record the raw horizon; drop series (and hosts) with nothing left to show."""

        def run() -> int:
            db = self._w
            if raw_cut > self.raw_horizon:
                db.execute(
                    "INSERT INTO meta VALUES ('raw_horizon', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (raw_cut,),
                )
            gone = db.execute("SELECT sid FROM latest WHERE ts < ?", (rollup_cut,)).fetchall()
            db.executemany("DELETE FROM latest WHERE sid = ?", gone)
            db.executemany("DELETE FROM series WHERE id = ?", gone)
            hosts = db.execute(
                "DELETE FROM hosts WHERE last_ts < ?"
                " AND NOT EXISTS (SELECT 1 FROM series s WHERE s.hid = hosts.id)",
                (rollup_cut,),
            ).rowcount
            return len(gone) + max(0, hosts)

        forgotten = self._transaction(run)
        self.raw_horizon = max(self.raw_horizon, raw_cut)
        if forgotten:  # rebuild the id maps from the tables
            self._hids = {
                (n, h): i for i, n, h in self._w.execute("SELECT id, network, host FROM hosts")
            }
            self._sids = {
                (hid, name, parse_labels(lb)): sid
                for sid, hid, name, lb in self._w.execute(
                    "SELECT id, hid, name, labels FROM series"
                )
            }
            self._keys, self._columns = {}, {}

    async def prune(self, now: float) -> None:
        """Delete raw samples older than ``now - raw_retention`` and rollups older than
        ``now - rollup_retention``, a chunk of hosts per transaction."""
        raw_cut, rollup_cut = now - self.raw_retention, now - self.rollup_retention
        hids = sorted(
            await self._on(
                self._writer, lambda: [i for (i,) in self._w.execute("SELECT id FROM hosts")]
            )
        )
        for i in range(0, len(hids), PRUNE_CHUNK):
            # Each chunk is its own job, so queued ingest writes run in between.
            await self._on(
                self._writer, self._prune_hosts, hids[i : i + PRUNE_CHUNK], raw_cut, rollup_cut
            )
        await self._on(self._writer, self._forget, raw_cut, rollup_cut)

    async def compact(self, now: float) -> None:
        """Retention, then refresh the planner's statistics and checkpoint the WAL."""
        await self.prune(now)

        def housekeeping() -> None:
            self._w.execute("PRAGMA optimize")
            self._w.execute("PRAGMA wal_checkpoint(PASSIVE)")

        await self._on(self._writer, housekeeping)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # refuse new work; what is queued already runs first
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._reader, self._r.close)
        await loop.run_in_executor(self._writer, self._w.close)
        self._reader.shutdown(wait=False)
        self._writer.shutdown(wait=False)
