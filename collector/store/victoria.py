"""The scale-out backend: a VictoriaMetrics server (single-node, tested with 1.79).

Writes go to ``/api/v1/import`` (JSON lines, one line per series with all its
values of the write); reads use the Prometheus query API with MetricsQL.
``network`` and ``host`` become VM labels next to the sample's own labels
(reserved names in those are renamed, see :mod:`collector.store.base`).

Running VictoriaMetrics for the collector — the flags matter:

- ``-search.latencyOffset=1s`` (default 30 s): VM otherwise treats the newest
  30 s as incomplete and pads range-query points near "now" with older values.
- ``-dedup.minScrapeInterval=1ms``: keeps one sample per series and millisecond,
  which makes re-delivered batches idempotent as the interface promises.
- ``-retentionPeriod``: retention is VM's own (``prune``/``compact`` are no-ops here;
  VM keeps full resolution for the whole period and downsamples nothing).

Visibility: VM buffers ingested rows in memory and makes them searchable about a
second later. :meth:`VictoriaStore.flush` calls ``/internal/force_flush`` (present in
1.79; protected by ``-forceFlushAuthKey`` if set) to make them searchable at once —
tests use it; the collector does not need to.

Queries pass ``nocache=1``: instant queries are then really evaluated at "now"
(otherwise VM moves them back by ``-search.latencyOffset``), and range queries never
come from the rollup-result cache. VM 1.79 resets that cache itself when a sample
older than ``-search.cacheTimestampOffset`` arrives (a host's spool replayed after an
outage), but a query in the second before those samples are searchable would cache
the gap again; reading without the cache is correct and cheap at these sizes.

How each query maps to MetricsQL:

- ``latest``: ``last_over_time(sel[lookback])`` for the values and
  ``tlast_over_time(sel[lookback]) keep_metric_names`` for the sample times; only
  series with a sample in the last ``lookback`` seconds are returned.
- ``series``: ``<agg>_over_time(sel[step] offset 1ms)`` over a ``query_range`` whose
  points sit at each bucket's *end*: at ``t = b + step`` the window is
  ``(b - 1ms, b + step - 1ms]``, i.e. exactly ``[b, b + step)`` at VM's millisecond
  resolution — the same buckets as the SQLite store.
- ``hosts``: ``max by (host) (tlast_over_time({network=…}[lookback]))``, then, for
  hosts VM's index knows over ``hosts_lookback`` but which sent nothing in
  ``lookback``, the same over ``hosts_lookback`` restricted to just those hosts.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from cladnet.metrics import Batch, Sample, SeriesColumn
from collector.store.base import (
    ColumnGroup,
    Labels,
    MetricsStore,
    SampleGroup,
    StoreError,
    bucket_bounds,
    check_query,
    network_aggregate,
    normalize_labels,
    pick_series,
    split_batches,
    usable_time,
)

OVER_TIME = {
    "avg": "avg_over_time",
    "min": "min_over_time",
    "max": "max_over_time",
    "last": "last_over_time",
}
OWN_LABELS = ("__name__", "network", "host")
RE2_SPECIAL = set("\\.+*?()|[]{}^$")
METRIC_CACHE = 1 << 20  # series whose "metric" JSON is kept
COLUMN_CACHE = 65536  # (network, host, series column) whose line heads are kept


def quote(value: str) -> str:
    """A MetricsQL string literal for any label value (quotes, backslashes, newlines)."""
    return json.dumps(value, ensure_ascii=False)


def selector(matchers: Mapping[str, str], extra: str = "") -> str:
    parts = [f"{k}={quote(v)}" for k, v in sorted(matchers.items())]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


def _split(metric: Mapping[str, str]) -> tuple[str, str, str, Labels]:
    labels = dict(metric)
    name = labels.pop("__name__", "")
    network = labels.pop("network", "")
    host = labels.pop("host", "")
    return network, host, name, tuple(sorted(labels.items()))


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class VictoriaStore(MetricsStore):
    """Metrics in a VictoriaMetrics server at ``url`` (``http://127.0.0.1:8428``)."""

    def __init__(
        self,
        url: str,
        *,
        lookback: float = 600.0,
        hosts_lookback: float = 86400.0,
        timeout: float = 30.0,
        max_import_samples: int = 100_000,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.lookback, self.hosts_lookback = lookback, hosts_lookback
        self.max_import_samples = max_import_samples
        self.skipped = 0
        self._metrics: dict[tuple[str, str, str, Labels], str] = {}
        # (network, host, id(column)) → the column (kept so its id is not reused while
        # cached) and each entry's line head, ``{"metric":{…},"values":[``.
        self._heads: dict[tuple[str, str, int], tuple[SeriesColumn, list[str]]] = {}
        self._http = client or httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise StoreError(f"VictoriaMetrics at {self.url}: {exc!r}") from exc
        if response.status_code >= 500:
            raise StoreError(
                f"VictoriaMetrics at {self.url}: {method} {path} answered "
                f"{response.status_code}: {response.text[:500]}"
            )
        return response

    # ---- writes -----------------------------------------------------------------------

    def _metric(self, key: tuple[str, str, str, Labels]) -> str:
        """The ``"metric"`` JSON of a series, cached: most series come back every flush."""
        text = self._metrics.get(key)
        if text is None:
            network, host, name, given = key
            metric = {**dict(normalize_labels(given)), "__name__": name}
            metric.update(network=network, host=host)
            text = json.dumps(metric, ensure_ascii=False)
            if len(self._metrics) >= METRIC_CACHE:  # bounded; rebuilding is cheap
                self._metrics.clear()
            self._metrics[key] = text
        return text

    def _column_heads(self, network: str, host: str, column: SeriesColumn) -> list[str]:
        """Each entry's line head for one host's series column, cached."""
        key = (network, host, id(column))
        cached = self._heads.get(key)
        if cached is not None and cached[0] is column:
            return cached[1]
        heads = [
            f'{{"metric":{self._metric((network, host, name, tuple(labels.items())))},"values":['
            for name, labels in zip(*column, strict=True)
        ]
        if len(self._heads) >= COLUMN_CACHE:  # bounded; rebuilding is one pass
            self._heads.clear()
        self._heads[key] = (column, heads)
        return heads

    def _column_lines(self, columns: Sequence[ColumnGroup]) -> list[tuple[int, bytes]]:
        """Import lines for column groups: one per series and run of a host's batches
        with the same column, built per series (the values were checked finite)."""
        runs: dict[tuple[str, str, int], tuple[SeriesColumn, list[int], list[list[float]]]] = {}
        for network, host, ts, column, values in columns:
            if not usable_time(ts):
                self.skipped += len(values)
                continue
            run = runs.get((network, host, id(column)))
            if run is None:
                run = runs[(network, host, id(column))] = (column, [], [])
            run[1].append(round(ts * 1000))
            run[2].append(values)
        lines = []
        for (network, host, _), (column, stamps, rows) in runs.items():
            tail = f'],"timestamps":[{",".join(map(str, stamps))}]}}'
            heads = self._column_heads(network, host, column)
            # zip(*rows): each series' values across the run's batches, in C.
            for head, series in zip(heads, zip(*rows, strict=True), strict=True):
                lines.append((len(series), f"{head}{','.join(map(repr, series))}{tail}".encode()))
        return lines

    def _lines(self, groups: Sequence[SampleGroup]) -> list[tuple[int, bytes]]:
        series: dict[tuple[str, str, str, Labels], tuple[list[float], list[int]]] = {}
        isfinite = math.isfinite
        for network, host, ts, items in groups:
            if not usable_time(ts):
                self.skipped += len(items)
                continue
            ms = round(ts * 1000)
            for name, labels, value in items:
                if not isfinite(value):
                    self.skipped += 1
                    continue
                lb = tuple(labels.items()) if isinstance(labels, dict) else labels
                key = (network, host, name, lb)
                entry = series.get(key)
                if entry is None:
                    entry = series[key] = ([], [])
                entry[0].append(value)
                entry[1].append(ms)
        # Formatted by hand (json.dumps per list costs more than the line): finite
        # floats' repr is exactly what json.dumps writes, the shortest round trip.
        return [
            (
                len(values),
                (
                    f'{{"metric":{self._metric(key)},"values":[{",".join(map(repr, values))}],'
                    f'"timestamps":[{",".join(map(str, stamps))}]}}'
                ).encode(),
            )
            for key, (values, stamps) in series.items()
        ]

    async def write_groups(self, groups: Sequence[SampleGroup]) -> None:
        await self._write_lines(self._lines(groups))

    async def write_batches(self, batches: Sequence[Batch]) -> None:
        """Decoded version-2 batches by their columns: the lines built per series."""
        groups, columns = split_batches(batches)
        await self._write_lines(self._column_lines(columns) + self._lines(groups))

    async def _write_lines(self, lines: list[tuple[int, bytes]]) -> None:
        chunk: list[bytes] = []
        size = 0
        for count, line in lines:
            chunk.append(line)
            size += count
            if size >= self.max_import_samples:
                await self._import(chunk)
                chunk, size = [], 0
        if chunk:
            await self._import(chunk)

    async def _import(self, lines: list[bytes]) -> None:
        response = await self._request("POST", "/api/v1/import", content=b"\n".join(lines))
        if response.status_code >= 300:
            raise StoreError(f"VictoriaMetrics refused an import: {response.text[:500]}")

    async def flush(self) -> None:
        """Make everything imported so far searchable now (``/internal/force_flush``)."""
        response = await self._request("GET", "/internal/force_flush")
        if response.status_code >= 300:
            raise StoreError(f"force_flush: {response.status_code} {response.text[:200]}")

    # ---- reads ------------------------------------------------------------------------

    async def _query(self, path: str, **params: Any) -> list[dict[str, Any]]:
        params["nocache"] = "1"
        response = await self._request("GET", path, params=params)
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 300 or body.get("status") != "success":
            error = body.get("error") or response.text[:500]
            raise ValueError(f"VictoriaMetrics rejected the query {params['query']!r}: {error}")
        return list(body["data"]["result"])

    async def _latest(self, sel: str, window: float, at: float | None = None) -> list[Sample]:
        at = time.time() if at is None else at
        rng = f"[{_duration(window)}]"
        values, stamps = await asyncio.gather(
            self._query("/api/v1/query", query=f"last_over_time({sel}{rng})", time=at),
            self._query(
                "/api/v1/query", query=f"tlast_over_time({sel}{rng}) keep_metric_names", time=at
            ),
        )
        when = {_split(row["metric"]): float(row["value"][1]) for row in stamps}
        out = []
        for row in values:
            key = _split(row["metric"])
            ts = when.get(key)
            if ts is not None:
                out.append(Sample(*key, ts, float(row["value"][1])))
        return out

    async def latest(self, network: str | None = None, host: str | None = None) -> list[Sample]:
        matchers = {k: v for k, v in (("network", network), ("host", host)) if v is not None}
        sel = selector(matchers) if matchers else '{network!=""}'
        return await self._latest(sel, self.lookback)

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
    ) -> list[tuple[float, float]]:
        check_query(start, end, step, agg)
        if step < 0.001:
            raise ValueError(f"step must be at least 1 ms for VictoriaMetrics, got {step}")
        matchers = {"__name__": name, "host": host}
        if network is not None:
            matchers["network"] = network
        if labels is not None:
            matchers.update(normalize_labels(labels))
        first, last = bucket_bounds(start, end, step)
        step_ms = _duration(step)
        rows = await self._query(
            "/api/v1/query_range",
            query=f"{OVER_TIME[agg]}({selector(matchers)}[{step_ms}] offset 1ms)",
            start=f"{(first + 1) * step:.3f}",
            end=f"{(last + 1) * step:.3f}",
            step=step_ms,
        )
        by_key = {}
        for row in rows:
            net, _, _, lbs = _split(row["metric"])
            by_key[(net, lbs)] = row["values"]
        chosen = pick_series(host, name, labels, by_key)
        if chosen is None:
            return []
        return [(round(float(t) - step, 3), float(v)) for t, v in by_key[chosen]]

    async def aggregate(self, network: str, name: str, since: float) -> dict[str, Any]:
        now = time.time()
        sel = selector({"__name__": name, "network": network})
        samples = await self._latest(sel, max(1.0, now - since), now)
        return network_aggregate(samples, since)

    async def hosts(self, network: str) -> dict[str, float]:
        now = time.time()

        async def newest(sel: str, window: float) -> dict[str, float]:
            rows = await self._query(
                "/api/v1/query",
                query=f"max by (host) (tlast_over_time({sel}[{_duration(window)}]))",
                time=now,
            )
            return {row["metric"].get("host", ""): float(row["value"][1]) for row in rows}

        found = await newest(selector({"network": network}), self.lookback)
        response = await self._request(
            "GET",
            "/api/v1/label/host/values",
            params={
                "match[]": selector({"network": network}),
                "start": f"{now - self.hosts_lookback:.3f}",
                "end": f"{now:.3f}",
            },
        )
        known = set(response.json().get("data") or []) if response.status_code < 300 else set()
        quiet = sorted(known - set(found))
        for i in range(0, len(quiet), 100):
            pattern = "|".join(
                "".join("\\" + c if c in RE2_SPECIAL else c for c in h) for h in quiet[i : i + 100]
            )
            sel = selector({"network": network}, f"host=~{quote(pattern)}")
            found.update(await newest(sel, self.hosts_lookback))
        return {h: ts for h, ts in found.items() if h}

    async def prune(self, now: float) -> None:
        """Nothing to do: VictoriaMetrics applies its own ``-retentionPeriod``."""

    async def close(self) -> None:
        await self._http.aclose()
