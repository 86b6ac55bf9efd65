"""The metrics wire format: one batch per host per interval, and its samples.

Pure data and validation, shared by the agent (producer) and the collector
(consumer). Deliberately free of pydantic: it sits in the agent's import path.

A batch on MQTT topic ``cladnet/metrics/<network>/<host>`` is a JSON object::

    {"v": 1, "network": "prod", "host": "vm1", "host_id": "h-…", "seq": 42,
     "ts": 1795400000.0, "sent": 1795400000.1, "interval": 2.0,
     "samples": [["cpu_usage_ratio", {}, 0.125],
                 ["cpu_usage_ratio", {"cpu": "0"}, 0.2],
                 ["wireguard_peer_latency_seconds", {"peer": "vm2"}, 0.00041], …]}

Version 2 (what :meth:`Batch.encode` writes) has the same header fields and the
samples in two columns: ``"series"``, the JSON text of ``[[name, labels], …]`` as one
string, and ``"values"``, the numbers in the same order::

    {"v": 2, "network": "prod", …, "series": "[[\\"cpu_usage_ratio\\",{}],…]",
     "values": [0.125, 0.2, …]}

A host sends the same series every interval, so ``series`` is byte-identical from
batch to batch: the collector parses and validates it once and afterwards only looks
it up (a string hash), which leaves one JSON float per sample to parse. Collectors
read both versions (version-1 batches may wait in an agent's spool across an
upgrade); upgrade collectors before agents.

Names follow Prometheus conventions (base units, ``_ratio``, ``_total`` for counters)
and are the same in batches, the pull endpoint and the collector's API:
cpu_usage_ratio{cpu}, memory_total_bytes, memory_used_bytes, memory_usage_ratio,
swap_used_bytes, swap_usage_ratio, filesystem_size_bytes / filesystem_used_bytes /
filesystem_usage_ratio {mountpoint}, disk_read_bytes_total / disk_written_bytes_total
{device}, network_receive_bytes_total / network_transmit_bytes_total /
network_receive_drop_total {interface}, load1, load5, load15, processes,
uptime_seconds, wireguard_peer_handshake_age_seconds / wireguard_peer_receive_bytes_total
/ wireguard_peer_transmit_bytes_total / wireguard_peer_latency_seconds {peer},
agent_spool_batches, agent_spool_dropped_batches_total, agent_metric_errors_total,
agent_controller_unrecognised, agent_controller_unreachable (1 while the controller
does not know this host / cannot be reached, agent.standing).

``seq`` increases by one per batch for the life of the host's state directory
(it survives agent restarts), so the collector can de-duplicate by
(host, seq) and count gaps. ``ts`` is when the values were taken; ``sent`` when
the batch left (later than ``ts`` for a batch that waited in the buffer).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

VERSION = 2  # what encode() writes; decode() also reads version 1
TOPIC_ROOT = "cladnet/metrics"
ACK_ROOT = "cladnet/acks"
# Prometheus-compatible names, so the same names work in VictoriaMetrics/PromQL.
NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,127}$")
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")
TOPIC_PART_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_SAMPLES = 20_000
MAX_LABEL_VALUE = 256
MAX_SERIES_TEXT = 4_000_000  # bytes of a version-2 "series" column
SERIES_CACHE = 8192  # distinct version-2 "series" columns kept parsed (about one per host)

#: One validated series column: names and label dicts, in the batch's order.
SeriesColumn = tuple[tuple[str, ...], tuple[dict[str, str], ...]]


class BatchError(ValueError):
    """A batch that cannot be accepted (malformed, wrong topic, out of range)."""


@dataclass(frozen=True)
class Sample:
    """One value of one metric of one host at one time."""

    network: str
    host: str
    name: str
    labels: tuple[tuple[str, str], ...]
    ts: float
    value: float

    @property
    def series(self) -> str:
        """``name{k="v",…}`` — the series key, the way Prometheus writes it."""
        if not self.labels:
            return self.name
        inner = ",".join(f'{k}="{v}"' for k, v in self.labels)
        return f"{self.name}{{{inner}}}"


@dataclass
class Batch:
    """One host's samples of one interval, with its sequence number."""

    network: str
    host: str
    seq: int
    ts: float
    interval: float
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    host_id: str = ""
    sent: float = 0.0
    #: Set by :func:`decode` for a version-2 batch whose values were all finite: the
    #: parsed series column (shared, read-only: the same object for every batch with the
    #: same series text) and the values in its order, so a store can map the column to
    #: its series once and then take the values as they are, with no work per sample.
    #: Another form of ``samples``, so left out of comparisons and repr.
    column: SeriesColumn | None = field(default=None, compare=False, repr=False)
    values: list[float] | None = field(default=None, compare=False, repr=False)

    def add(self, name: str, value: float, **labels: str) -> None:
        self.samples.append((name, labels, float(value)))

    def encode(self) -> bytes:
        """The version-2 wire form (see the module doc): series text plus a value column."""
        series = json.dumps([[n, lb] for n, lb, _ in self.samples], separators=(",", ":"))
        return json.dumps(
            {
                "v": VERSION,
                "network": self.network,
                "host": self.host,
                "host_id": self.host_id,
                "seq": self.seq,
                "ts": self.ts,
                "sent": self.sent,
                "interval": self.interval,
                "series": series,
                "values": [v for _, _, v in self.samples],
            },
            separators=(",", ":"),
        ).encode()

    def flat(self) -> list[Sample]:
        """The samples with the batch's network, host and time filled in."""
        return [
            Sample(self.network, self.host, n, tuple(sorted(lb.items())), self.ts, v)
            for n, lb, v in self.samples
        ]


def topic(network: str, host: str) -> str:
    """The topic a host publishes its batches to."""
    return f"{TOPIC_ROOT}/{network}/{host}"


def ack_topic(network: str, host: str) -> str:
    """Where collectors confirm a host's stored batches: ``{"seqs": [...]}``."""
    return f"{ACK_ROOT}/{network}/{host}"


def _labels_ok(labels: Any) -> bool:
    return isinstance(labels, dict) and all(
        isinstance(k, str)
        and LABEL_RE.match(k)
        and isinstance(v, str)
        and len(v) <= MAX_LABEL_VALUE
        for k, v in labels.items()
    )


def _check_series(name: Any, labels: Any) -> None:
    """Raise BatchError unless ``name`` and ``labels`` make a valid series."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BatchError(f"bad metric name {name!r}")
    if not _labels_ok(labels):
        raise BatchError(f"bad labels on {name}")


def _finite_floats(values: list[Any]) -> list[float] | None:
    """The values as floats if every one is a finite number; None if some is not finite.

    Checked per column, in C: the element types as a set, then the sum (finite only if
    every term is; a sum that overflows just takes the slow path).
    """
    if not set(map(type, values)) <= {int, float}:  # bool is its own type: refused too
        raise BatchError("a value is not a number")
    try:
        if math.isfinite(sum(values)):
            return list(map(float, values))
    except OverflowError:  # an int too large for a float
        pass
    return None


def _number(value: Any) -> float | None:
    """One value as a finite float, None for NaN/inf (no information), BatchError if no number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BatchError("a value is not a number")
    try:
        number = float(value)
    except OverflowError:
        return None  # an integer beyond float range: as unusable as inf
    return number if math.isfinite(number) else None


_series_cache: dict[str, SeriesColumn] = {}


def _series_column(text: Any) -> SeriesColumn:
    """A version-2 ``series`` string parsed and validated, from the cache when seen before.

    The label dicts are shared by every batch with the same series text: read-only.
    """
    column = _series_cache.get(text) if isinstance(text, str) else None
    if column is not None:
        return column
    if not isinstance(text, str) or len(text) > MAX_SERIES_TEXT:
        raise BatchError("series must be a JSON string")
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise BatchError(f"series is not JSON: {exc}") from None
    if not isinstance(raw, list) or len(raw) > MAX_SAMPLES:
        raise BatchError(f"series must be a list of at most {MAX_SAMPLES} entries")
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2):
            raise BatchError("a series must be [name, labels]")
        _check_series(*item)
    column = (tuple(n for n, _ in raw), tuple(lb for _, lb in raw))
    if len(_series_cache) >= SERIES_CACHE:  # bounded; re-parsing is the fallback
        _series_cache.clear()
    _series_cache[text] = column
    return column


def _samples_v1(samples_raw: Any) -> list[tuple[str, dict[str, str], float]]:
    if not isinstance(samples_raw, list):
        raise BatchError("bad ts or samples")
    if len(samples_raw) > MAX_SAMPLES:
        raise BatchError(f"more than {MAX_SAMPLES} samples")
    samples = []
    for item in samples_raw:
        if not (isinstance(item, list) and len(item) == 3):
            raise BatchError("a sample must be [name, labels, value]")
        name, labels, value = item
        _check_series(name, labels)
        try:
            number = _number(value)
        except BatchError:
            raise BatchError(f"value of {name} is not a number") from None
        if number is not None:  # NaN/inf (e.g. no RTT yet) carry no information
            samples.append((name, labels, number))
    return samples


def _samples_v2(
    series: Any, values: Any
) -> tuple[list[tuple[str, dict[str, str], float]], SeriesColumn | None, list[float] | None]:
    """The samples, and the column and values when they are the samples (all finite)."""
    column = _series_column(series)
    names, labels = column
    if not isinstance(values, list) or len(values) != len(names):
        raise BatchError("values must be a list as long as series")
    floats = _finite_floats(values)
    if floats is not None:  # the usual case: no per-sample Python code at all
        return list(zip(names, labels, floats, strict=True)), column, floats
    samples = [
        (n, lb, f)
        for n, lb, v in zip(names, labels, values, strict=True)
        if (f := _number(v)) is not None
    ]
    return samples, None, None


# The collector's fast path for version-2 batches: msgspec, when installed (the
# collector's extra), imported on the first decode() — the agent never decodes, so it
# never loads it. None: not tried yet; False: not installed.
_fast: Any = None
_fast_errors: tuple[type[Exception], ...] = ()
_raw_series_cache: dict[bytes, SeriesColumn] = {}  # by the series' JSON token, unescaped never


def _fast_decoder() -> Any:
    global _fast, _fast_errors
    if _fast is None:
        try:
            import msgspec
        except ImportError:
            _fast = False
            return _fast

        # defstruct, not a class: this module's annotations are strings (no msgspec in
        # its namespace to resolve them with).
        v2 = msgspec.defstruct(
            "V2",
            [
                ("v", int),
                ("network", str),
                ("host", str),
                ("seq", int),
                ("ts", float),
                ("series", msgspec.Raw),
                ("values", list[float]),
                ("host_id", str, ""),
                ("sent", float | None, None),
                ("interval", float, 0.0),
            ],
        )
        # UnicodeDecodeError: see _decode_fast.
        _fast, _fast_errors = msgspec.json.Decoder(v2), (msgspec.DecodeError, UnicodeDecodeError)
    return _fast


def _decode_fast(payload: bytes, topic_name: str | None) -> Batch | None:
    """A version-2 batch decoded in C (msgspec: 10x less than json.loads, and the series
    string is looked up by its raw token, never unescaped); None for anything unusual
    (not installed, version 1, non-finite values, any error): :func:`decode` then takes
    the reference path, so what is accepted and every error are exactly the same."""
    decoder = _fast_decoder()
    if not decoder:
        return None
    try:
        payload.decode()  # what json.loads checks and msgspec skips in ignored fields
        raw = decoder.decode(payload)
    except _fast_errors:
        return None
    values, token = raw.values, bytes(raw.series)
    column = _raw_series_cache.get(token)
    try:
        if column is None:
            column = _series_column(json.loads(token))
            if len(_raw_series_cache) >= SERIES_CACHE:  # bounded; re-parsing is the fallback
                _raw_series_cache.clear()
            _raw_series_cache[token] = column
        network, host, seq, ts = raw.network, raw.host, raw.seq, raw.ts
        _check_header(network, host, seq, ts, topic_name)
    except (BatchError, ValueError):
        return None
    if raw.v != 2 or len(values) != len(column[0]) or not math.isfinite(sum(values)):
        return None
    return Batch(
        network=network,
        host=host,
        seq=seq,
        ts=ts,
        interval=raw.interval,
        samples=list(zip(*column, values, strict=True)),
        host_id=raw.host_id,
        sent=raw.sent or ts,
        column=column,
        values=values,
    )


def _check_header(network: str, host: str, seq: Any, ts: float, topic_name: str | None) -> None:
    if not (TOPIC_PART_RE.match(network) and TOPIC_PART_RE.match(host)):
        raise BatchError("bad network or host name")
    if topic_name is not None and topic_name != topic(network, host):
        raise BatchError(f"batch for {network}/{host} published on {topic_name}")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise BatchError("seq must be a non-negative integer")
    if not math.isfinite(ts):
        raise BatchError("bad ts or samples")


def decode(payload: bytes, topic_name: str | None = None) -> Batch:
    """Parse and validate a batch (version 1 or 2); ``topic_name`` must match its
    network/host if given.

    Raises BatchError with a short reason; never anything else for bad input.
    """
    batch = _decode_fast(payload, topic_name)
    if batch is not None:
        return batch
    try:
        raw: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BatchError(f"not JSON: {exc}") from None
    version = raw.get("v") if isinstance(raw, dict) else None
    if type(version) is not int or version not in (1, 2):
        raise BatchError("not a version-1 or version-2 batch object")
    try:
        network, host = str(raw["network"]), str(raw["host"])
        seq, ts = raw["seq"], float(raw["ts"])
        interval = float(raw.get("interval", 0))
        sent = float(raw.get("sent", ts) or ts)
        columns = (raw["samples"],) if version == 1 else (raw["series"], raw["values"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BatchError(f"missing or bad field: {exc}") from None
    _check_header(network, host, seq, ts, topic_name)
    column, floats = None, None
    if version == 1:
        samples = _samples_v1(*columns)
    else:
        samples, column, floats = _samples_v2(*columns)
    return Batch(
        network=network,
        host=host,
        seq=seq,
        ts=ts,
        interval=interval,
        samples=samples,
        host_id=str(raw.get("host_id", "")),
        sent=sent,
        column=column,
        values=floats,
    )
