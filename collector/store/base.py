"""The metrics store interface, and the semantics both backends share.

Every backend stores :class:`cladnet.metrics.Sample` values and answers five
questions; the definitions below are the contract, and the helpers in this
module are used by both backends so that they cannot drift apart.

Labels
    A series is ``(network, host, name, labels)``. Labels are normalised on
    write, the Prometheus way: an empty value means "no such label" (so
    ``{"mount": ""}`` is the unlabelled series), and the reserved names
    ``network``, ``host`` and any name starting with ``__`` are renamed
    ``exported_<name>`` (so they can't clobber the series' own network/host in
    VictoriaMetrics). The same normalisation applies to the ``labels`` argument
    of :meth:`MetricsStore.series`.

Picking a series (``series(host, name, labels, …)``)
    ``labels`` is an *exact* label set: ``{}`` is the unlabelled series,
    ``{"core": "0"}`` exactly that one (not ``{"core": "0", "x": "y"}``).
    ``labels=None`` means "the obvious one": the unlabelled series if the host
    has it (``cpu_percent`` rather than one of its ``{core}`` siblings), else
    the only label set if there is exactly one; otherwise the request is
    ambiguous and raises :class:`AmbiguousSeries` (a ``ValueError``) whose
    message and ``.label_sets`` list the choices. Averaging ``disk_percent``
    over mounts or ``net_rx_bytes`` over interfaces would answer a question
    nobody asked, so that is never done silently. A host name that exists in
    more than one network is ambiguous in the same way unless ``network=`` is
    given. No matching series (unknown host, metric or label set) is ``[]``.

Buckets
    ``series`` buckets time in intervals of ``step`` seconds aligned to the
    epoch (``floor(ts / step) * step``), so a chart that refreshes keeps the same
    buckets, and steps that are multiples of 10 s line up with the 10-s rollups.
    Each point is ``(bucket_start, value)`` for every *non-empty* bucket that
    overlaps ``[start, end]``, aggregated over the whole bucket ``[b, b + step)``
    (the first bucket may begin before ``start``); empty buckets are omitted, not
    filled. ``agg`` is ``avg`` (mean of the samples), ``min``, ``max`` or
    ``last`` (the sample with the largest timestamp).

Latest and aggregates
    ``latest`` is the newest sample of every series (a sample that arrives late
    with an older timestamp never replaces a newer one). SQLite keeps it for as long
    as the series has rollups; VictoriaMetrics looks back ``lookback`` seconds. ``aggregate`` takes,
    per host of the network, the latest value of the metric, if it is at least
    as new as ``since``: the unlabelled series if the host has one, else the mean
    over its label sets (``peer_rtt_ms`` → the host's mean RTT to its peers);
    then it reports ``{"hosts", "avg", "min", "max", "max_host"}`` over those
    per-host values (``None`` figures when no host qualifies).

Bad values
    Samples whose value or timestamp is NaN/±inf, or whose timestamp is negative,
    carry no information and are skipped on write (counted in ``skipped``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cladnet.metrics import Batch, Sample, SeriesColumn

AGGS = ("avg", "min", "max", "last")
# Width of the rollup buckets (SQLite) — and the step from which rollups answer.
ROLLUP_STEP = 10
RESERVED_LABELS = frozenset({"network", "host"})

Labels = tuple[tuple[str, str], ...]
#: One host's samples taken at one time, the unit the backends write:
#: ``(network, host, ts, [(name, labels, value), …])``, labels a dict or ``Labels``.
SampleGroup = tuple[str, str, float, Sequence[tuple[str, dict[str, str] | Labels, float]]]
#: A decoded version-2 batch as its columns: ``(network, host, ts, column, values)``,
#: every value finite (see :attr:`cladnet.metrics.Batch.column`).
ColumnGroup = tuple[str, str, float, SeriesColumn, list[float]]


def split_batches(batches: Sequence[Batch]) -> tuple[list[SampleGroup], list[ColumnGroup]]:
    """Batches that carry their columns as column groups, the others as sample groups."""
    groups: list[SampleGroup] = []
    columns: list[ColumnGroup] = []
    for b in batches:
        if b.column is not None and b.values is not None:
            columns.append((b.network, b.host, b.ts, b.column, b.values))
        else:
            groups.append((b.network, b.host, b.ts, b.samples))
    return groups, columns


class StoreError(RuntimeError):
    """The backend failed or could not be reached (not the caller's fault)."""


class AmbiguousSeries(ValueError):
    """``series(labels=None)`` matched several label sets (or networks): pick one."""

    def __init__(self, host: str, name: str, choices: Sequence[tuple[str, Labels]]) -> None:
        self.host, self.name = host, name
        self.choices = sorted(choices)
        self.label_sets = [dict(labels) for _, labels in self.choices]
        networks = {network for network, _ in self.choices}
        if len(networks) > 1:
            what = f"host {host!r} is in networks {sorted(networks)}: pass network="
        else:
            shown = ", ".join(_format_labels(lb) for _, lb in self.choices)
            what = f"{name} of {host!r} has several label sets, pass labels= one of: {shown}"
        super().__init__(what)


def _format_labels(labels: Labels) -> str:
    inner = ",".join(f"{k}={v!r}" for k, v in labels)
    return "{" + inner + "}"


def normalize_labels(labels: Iterable[tuple[str, str]] | Mapping[str, str]) -> Labels:
    """Sorted ``(key, value)`` pairs: empty values dropped, reserved keys renamed."""
    items = labels.items() if isinstance(labels, Mapping) else labels
    out = []
    for key, value in items:
        if value == "":
            continue
        if key in RESERVED_LABELS or key.startswith("__"):
            key = f"exported_{key}"
        out.append((key, value))
    out.sort()
    return tuple(out)


def usable_time(ts: float) -> bool:
    """Whether samples taken at ``ts`` can be stored (a finite, non-negative time)."""
    return math.isfinite(ts) and ts >= 0


def check_query(start: float, end: float, step: float, agg: str) -> None:
    """Raise ``ValueError`` with a clear message for a malformed range query."""
    if agg not in AGGS:
        raise ValueError(f"unknown agg {agg!r}: must be one of {', '.join(AGGS)}")
    for label, value in (("start", start), ("end", end), ("step", step)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number of seconds, got {value!r}")
    if start > end:
        raise ValueError(f"start ({start}) is after end ({end})")
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")


def bucket_bounds(start: float, end: float, step: float) -> tuple[int, int]:
    """Indexes of the first and last ``step`` bucket that overlap ``[start, end]``."""
    return math.floor(start / step), math.floor(end / step)


def pick_series(
    host: str,
    name: str,
    wanted: Mapping[str, str] | None,
    candidates: Iterable[tuple[str, Labels]],
) -> tuple[str, Labels] | None:
    """Choose among ``(network, labels)`` candidates per the rules in this module's doc."""
    found = sorted(set(candidates))
    if not found:
        return None
    networks = {network for network, _ in found}
    if len(networks) > 1:
        raise AmbiguousSeries(host, name, found)
    if wanted is not None:
        labels = normalize_labels(wanted)
        return next((c for c in found if c[1] == labels), None)
    unlabelled = [c for c in found if not c[1]]
    if unlabelled:
        return unlabelled[0]
    if len(found) == 1:
        return found[0]
    raise AmbiguousSeries(host, name, found)


def network_aggregate(samples: Iterable[Sample], since: float) -> dict[str, Any]:
    """Avg/min/max over hosts of their latest value (see this module's doc)."""
    plain: dict[str, float] = {}
    labelled: dict[str, list[float]] = {}
    for s in samples:
        if s.ts < since:
            continue
        if s.labels:
            labelled.setdefault(s.host, []).append(s.value)
        else:
            plain[s.host] = s.value
    per_host = dict(plain)
    for host, values in labelled.items():
        if host not in per_host:
            per_host[host] = sum(values) / len(values)
    if not per_host:
        return {"hosts": 0, "avg": None, "min": None, "max": None, "max_host": None}
    max_host = max(sorted(per_host), key=per_host.__getitem__)
    values = list(per_host.values())
    return {
        "hosts": len(values),
        "avg": sum(values) / len(values),
        "min": min(values),
        "max": per_host[max_host],
        "max_host": max_host,
    }


class MetricsStore(ABC):
    """What the collector needs from a metrics backend. All methods are coroutines.

    Semantics (labels, buckets, aggregates) are in this module's docstring.
    """

    #: Samples skipped on write because they carried no information (NaN, inf, ts < 0).
    skipped: int = 0

    async def write(self, samples: Sequence[Sample]) -> None:
        """Store many samples at once (one transaction / one request).

        Idempotent: a sample already stored for the same series and timestamp is
        not counted twice (VictoriaMetrics: with ``-dedup.minScrapeInterval``).
        """
        groups: list[SampleGroup] = []
        items: list[tuple[str, dict[str, str] | Labels, float]] = []
        last: tuple[str, str, float] | None = None
        for s in samples:  # a run of one host's samples at one time is one group
            if (s.network, s.host, s.ts) != last:
                last, items = (s.network, s.host, s.ts), []
                groups.append((s.network, s.host, s.ts, items))
            items.append((s.name, s.labels, s.value))
        await self.write_groups(groups)

    async def write_batches(self, batches: Sequence[Batch]) -> None:
        """Store decoded batches as they are (the collector's path: no ``Sample`` each)."""
        await self.write_groups([(b.network, b.host, b.ts, b.samples) for b in batches])

    @abstractmethod
    async def write_groups(self, groups: Sequence[SampleGroup]) -> None:
        """What :meth:`write` and :meth:`write_batches` do, on groups (same contract)."""

    @abstractmethod
    async def latest(self, network: str | None = None, host: str | None = None) -> list[Sample]:
        """The newest sample of every series, optionally of one network and/or host."""

    @abstractmethod
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
        """One series of one host, bucketed by ``step`` over ``[start, end]``.

        Raises ``ValueError`` for a bad range/agg and :class:`AmbiguousSeries`
        (a ``ValueError``) when ``labels=None`` does not single out a series.
        """

    @abstractmethod
    async def aggregate(self, network: str, name: str, since: float) -> dict[str, Any]:
        """``{"hosts", "avg", "min", "max", "max_host"}`` over the network's hosts."""

    @abstractmethod
    async def hosts(self, network: str) -> dict[str, float]:
        """Every host of the network that has data, with the time of its newest sample."""

    @abstractmethod
    async def prune(self, now: float) -> None:
        """Apply retention as of ``now`` (the collector calls this periodically)."""

    async def compact(self, now: float) -> None:
        """Retention plus whatever housekeeping the backend wants; defaults to prune."""
        await self.prune(now)

    async def flush(self) -> None:  # noqa: B027 - optional hook, default is a no-op
        """Make everything written so far visible to queries (a no-op where it already is)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
