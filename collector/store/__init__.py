"""The collector's metrics storage: one interface, two backends.

- :class:`SqliteStore` — embedded, one file, raw samples plus 10-s rollups.
- :class:`VictoriaStore` — a VictoriaMetrics server, for scale and PromQL.

The contract (labels, buckets, aggregates, errors) is in :mod:`collector.store.base`.
"""

from __future__ import annotations

from pathlib import Path

from collector.store.base import (
    AGGS,
    ROLLUP_STEP,
    AmbiguousSeries,
    MetricsStore,
    StoreError,
    normalize_labels,
)
from collector.store.sqlite import SqliteStore
from collector.store.victoria import VictoriaStore

__all__ = [
    "AGGS",
    "ROLLUP_STEP",
    "AmbiguousSeries",
    "MetricsStore",
    "SqliteStore",
    "StoreError",
    "VictoriaStore",
    "normalize_labels",
    "open_store",
]


def open_store(
    spec: str,
    state_dir: Path,
    raw_retention: float = 6 * 3600,
    rollup_retention: float = 7 * 86400,
) -> MetricsStore:
    """``sqlite`` (``metrics.db`` in ``state_dir``), ``sqlite:PATH`` or ``victoria:URL``."""
    kind, _, where = spec.partition(":")
    if kind == "sqlite":
        path = Path(where) if where else state_dir / "metrics.db"
        return SqliteStore(path, raw_retention=raw_retention, rollup_retention=rollup_retention)
    if kind == "victoria" and where:
        return VictoriaStore(where)
    raise ValueError(f"unknown metrics store {spec!r}: use sqlite, sqlite:PATH or victoria:URL")
