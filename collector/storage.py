"""Metric storage behind one interface; SQLite embedded (WAL, batched, 10-s rollups).

Raw samples go to ``raw`` (series id, ts, value); every write also folds into
``rollup`` buckets of 10 s (min, sum, count, max, last) so range queries with a step
of 10 s or more read the rollups. Raw data is kept ``raw_retention`` seconds,
rollups ``rollup_retention``.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from cladnet.metrics import Sample

ROLLUP = 10.0
AGGS = ("avg", "min", "max", "last")


class MetricsStore(Protocol):
    async def write(self, samples: Sequence[Sample]) -> None: ...

    async def latest(self, network: str | None = None, host: str | None = None) -> list[Sample]:
        """The last value of every series (of a network / host)."""
        ...

    async def series(
        self,
        host: str,
        name: str,
        labels: dict[str, str] | None,
        start: float,
        end: float,
        step: float,
        agg: str = "avg",
    ) -> list[tuple[float, float]]:
        """One metric of one host bucketed by ``step``; several label sets are averaged
        together unless ``labels`` picks one (e.g. ``{"core": "0"}``; ``{}`` = unlabelled)."""
        ...

    async def aggregate(self, network: str, name: str, since: float) -> dict[str, Any]:
        """Average and maximum over the hosts of a network of their latest values."""
        ...

    async def prune(self, now: float) -> None: ...

    async def close(self) -> None: ...


def _check_range(start: float, end: float, step: float, agg: str) -> None:
    if agg not in AGGS:
        raise ValueError(f"agg must be one of {', '.join(AGGS)}, got {agg!r}")
    if not (math.isfinite(start) and math.isfinite(end)) or start > end:
        raise ValueError("start must not be after end")
    if step <= 0:
        raise ValueError("step must be positive")


SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, network TEXT NOT NULL, host TEXT NOT NULL, name TEXT NOT NULL,
    labels TEXT NOT NULL, last_ts REAL, last_value REAL,
    UNIQUE (network, host, name, labels));
CREATE INDEX IF NOT EXISTS series_host ON series (host, name);
CREATE TABLE IF NOT EXISTS raw (series INTEGER NOT NULL, ts REAL NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS raw_series_ts ON raw (series, ts);
CREATE TABLE IF NOT EXISTS rollup (
    series INTEGER NOT NULL, bucket REAL NOT NULL, min REAL, max REAL, sum REAL, count INTEGER,
    last REAL, last_ts REAL, PRIMARY KEY (series, bucket)) WITHOUT ROWID;
"""


class SqliteStore:
    """One writer connection on a dedicated thread (SQLite serialises writers anyway)."""

    def __init__(
        self, path: Path, raw_retention: float = 6 * 3600, rollup_retention: float = 30 * 86400
    ) -> None:
        self.path = path
        self.raw_retention, self.rollup_retention = raw_retention, rollup_retention
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._ids: dict[tuple[str, str, str, str], int] = {
            (n, h, m, lb): i
            for i, n, h, m, lb in self._db.execute(
                "SELECT id, network, host, name, labels FROM series"
            )
        }

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(*args)

        return await asyncio.to_thread(locked)

    def _series_id(self, s: Sample) -> int:
        key = (s.network, s.host, s.name, json.dumps(dict(s.labels), sort_keys=True))
        sid = self._ids.get(key)
        if sid is None:
            cur = self._db.execute(
                "INSERT INTO series (network, host, name, labels) VALUES (?, ?, ?, ?)", key
            )
            sid = self._ids[key] = int(cur.lastrowid or 0)
        return sid

    def _write(self, samples: Sequence[Sample]) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            rows = [(self._series_id(s), s.ts, s.value) for s in samples]
            db.executemany("INSERT INTO raw (series, ts, value) VALUES (?, ?, ?)", rows)
            db.executemany(
                """INSERT INTO rollup VALUES (?, ?, ?, ?, ?, 1, ?, ?)
                   ON CONFLICT (series, bucket) DO UPDATE SET
                     min = MIN(min, excluded.min), max = MAX(max, excluded.max),
                     sum = sum + excluded.sum, count = count + 1,
                     last = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last ELSE last END,
                     last_ts = MAX(last_ts, excluded.last_ts)""",
                [(sid, ts - ts % ROLLUP, v, v, v, v, ts) for sid, ts, v in rows],
            )
            db.executemany(
                """UPDATE series SET last_ts = ?, last_value = ?
                   WHERE id = ? AND (last_ts IS NULL OR last_ts <= ?)""",
                [(ts, v, sid, ts) for sid, ts, v in rows],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def write(self, samples: Sequence[Sample]) -> None:
        if samples:
            await self._run(self._write, samples)

    def _latest(self, network: str | None, host: str | None) -> list[Sample]:
        sql = (
            "SELECT network, host, name, labels, last_ts, last_value FROM series"
            " WHERE last_ts IS NOT NULL"
        )
        args: list[Any] = []
        if network is not None:
            sql += " AND network = ?"
            args.append(network)
        if host is not None:
            sql += " AND host = ?"
            args.append(host)
        return [
            Sample(n, h, m, tuple(sorted(json.loads(lb).items())), ts, v)
            for n, h, m, lb, ts, v in self._db.execute(sql, args)
        ]

    async def latest(self, network: str | None = None, host: str | None = None) -> list[Sample]:
        return await self._run(self._latest, network, host)

    def _series(
        self, host: str, name: str, labels: dict[str, str] | None, start: float, end: float,
        step: float, agg: str,
    ) -> list[tuple[float, float]]:  # fmt: skip
        ids = [
            sid
            for sid, lb in self._db.execute(
                "SELECT id, labels FROM series WHERE host = ? AND name = ?", (host, name)
            )
            if labels is None or json.loads(lb) == labels
        ]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        if step >= ROLLUP:
            expr = {"avg": "SUM(sum) / SUM(count)", "min": "MIN(min)", "max": "MAX(max)",
                    "last": "last"}[agg]  # fmt: skip
            sql = (
                f"SELECT CAST((bucket - ?) / ? AS INTEGER) AS b, {expr}, MAX(last_ts) FROM rollup"
                f" WHERE series IN ({marks}) AND bucket >= ? AND bucket <= ? GROUP BY b ORDER BY b"
            )
            lo = start - start % ROLLUP
        else:
            expr = {"avg": "AVG(value)", "min": "MIN(value)", "max": "MAX(value)",
                    "last": "value"}[agg]  # fmt: skip
            sql = (
                f"SELECT CAST((ts - ?) / ? AS INTEGER) AS b, {expr}, MAX(ts) FROM raw"
                f" WHERE series IN ({marks}) AND ts >= ? AND ts <= ? GROUP BY b ORDER BY b"
            )
            lo = start
        rows = self._db.execute(sql, (start, step, *ids, lo, end)).fetchall()
        return [(start + b * step, float(v)) for b, v, _ in rows if v is not None]

    async def series(
        self,
        host: str,
        name: str,
        labels: dict[str, str] | None,
        start: float,
        end: float,
        step: float,
        agg: str = "avg",
    ) -> list[tuple[float, float]]:
        _check_range(start, end, step, agg)
        return await self._run(self._series, host, name, labels, start, end, step, agg)

    async def aggregate(self, network: str, name: str, since: float) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            rows = self._db.execute(
                "SELECT host, AVG(last_value) FROM series WHERE network = ? AND name = ?"
                " AND labels = '{}' AND last_ts >= ? GROUP BY host",
                (network, name, since),
            ).fetchall()
            values = [v for _, v in rows if v is not None]
            if not values:
                return {"hosts": 0, "avg": None, "max": None}
            return {"hosts": len(values), "avg": sum(values) / len(values), "max": max(values)}

        return await self._run(run)

    async def prune(self, now: float) -> None:
        def run() -> None:
            self._db.execute("DELETE FROM raw WHERE ts < ?", (now - self.raw_retention,))
            self._db.execute("DELETE FROM rollup WHERE bucket < ?", (now - self.rollup_retention,))

        await self._run(run)

    async def close(self) -> None:
        await self._run(self._db.close)


AGG_FUNCTIONS = {"avg": "avg_over_time", "min": "min_over_time", "max": "max_over_time",
                 "last": "last_over_time"}  # fmt: skip


def _selector(matchers: dict[str, str]) -> str:
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return "{" + ",".join(f"{k}={quote(v)}" for k, v in sorted(matchers.items())) + "}"


class VictoriaStore:
    """VictoriaMetrics (a real server) for scale: writes through ``/api/v1/import``,
    reads through its Prometheus query API. Retention is the server's
    (``-retentionPeriod``); run it with ``-search.latencyOffset=1s`` for live views.
    ``labels={}`` selects like ``None`` here: PromQL cannot say "no other labels".
    """

    def __init__(self, url: str, lookback: float = 600.0) -> None:
        import httpx

        self.url, self.lookback = url.rstrip("/"), lookback
        self._http = httpx.AsyncClient(base_url=self.url, timeout=30.0)

    async def write(self, samples: Sequence[Sample]) -> None:
        if not samples:
            return
        series: dict[tuple[Any, ...], tuple[list[float], list[int]]] = {}
        for s in samples:
            key = (s.network, s.host, s.name, s.labels)
            values, stamps = series.setdefault(key, ([], []))
            values.append(s.value)
            stamps.append(int(s.ts * 1000))
        lines = [
            json.dumps(
                {
                    "metric": {"__name__": name, **dict(labels), "network": net, "host": host},
                    "values": values,
                    "timestamps": stamps,
                }
            )
            for (net, host, name, labels), (values, stamps) in series.items()
        ]
        response = await self._http.post("/api/v1/import", content="\n".join(lines).encode())
        response.raise_for_status()

    async def _query(self, path: str, **params: Any) -> list[dict[str, Any]]:
        response = await self._http.get(path, params=params)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"VictoriaMetrics: {body.get('error', body)}")
        return list(body["data"]["result"])

    async def latest(self, network: str | None = None, host: str | None = None) -> list[Sample]:
        matchers = {k: v for k, v in (("network", network), ("host", host)) if v is not None}
        selector = _selector(matchers) if matchers else '{host!=""}'
        rows = await self._query(
            "/api/v1/query", query=f"last_over_time({selector}[{int(self.lookback)}s])"
        )
        out = []
        for row in rows:
            labels = dict(row["metric"])
            name = labels.pop("__name__", "")
            net, hst = labels.pop("network", ""), labels.pop("host", "")
            ts, value = row["value"]
            out.append(
                Sample(net, hst, name, tuple(sorted(labels.items())), float(ts), float(value))
            )
        return out

    async def series(
        self,
        host: str,
        name: str,
        labels: dict[str, str] | None,
        start: float,
        end: float,
        step: float,
        agg: str = "avg",
    ) -> list[tuple[float, float]]:
        _check_range(start, end, step, agg)
        selector = _selector({"__name__": name, "host": host, **(labels or {})})
        inner = f"{AGG_FUNCTIONS[agg]}({selector}[{int(max(step, 1))}s])"
        combine = {"avg": "avg", "min": "min", "max": "max", "last": "max"}[agg]
        rows = await self._query(
            "/api/v1/query_range",
            query=f"{combine}({inner})",
            start=f"{start:.3f}",
            end=f"{end:.3f}",
            step=f"{int(max(step, 1))}s",
        )
        return [(float(t), float(v)) for t, v in rows[0]["values"]] if rows else []

    async def aggregate(self, network: str, name: str, since: float) -> dict[str, Any]:
        latest = [s for s in await self.latest(network=network) if s.name == name]
        per_host: dict[str, list[float]] = {}
        for s in latest:
            if s.ts >= since and not s.labels:
                per_host.setdefault(s.host, []).append(s.value)
        values = [sum(v) / len(v) for v in per_host.values()]
        if not values:
            return {"hosts": 0, "avg": None, "max": None}
        return {"hosts": len(values), "avg": sum(values) / len(values), "max": max(values)}

    async def prune(self, now: float) -> None:
        """Nothing to do: VictoriaMetrics applies its own ``-retentionPeriod``."""

    async def flush(self) -> None:
        """Make written samples searchable now (tests, and before a query right after write)."""
        response = await self._http.get("/internal/force_flush")
        response.raise_for_status()

    async def close(self) -> None:
        await self._http.aclose()
