"""The metrics wire format: one batch per host per interval, and its samples.

Pure data and validation, shared by the agent (producer) and the collector
(consumer). Deliberately free of pydantic: it sits in the agent's import path.

A batch on MQTT topic ``cladnet/metrics/<network>/<host>`` is a JSON object::

    {"v": 1, "network": "prod", "host": "vm1", "host_id": "h-…", "seq": 42,
     "ts": 1795400000.0, "sent": 1795400000.1, "interval": 2.0,
     "samples": [["cpu_usage_ratio", {}, 0.125],
                 ["cpu_usage_ratio", {"cpu": "0"}, 0.2],
                 ["wireguard_peer_latency_seconds", {"peer": "vm2"}, 0.00041], …]}

Names follow Prometheus conventions (base units, ``_ratio``, ``_total`` for counters)
and are the same in batches, the pull endpoint and the collector's API:
cpu_usage_ratio{cpu}, memory_total_bytes, memory_used_bytes, memory_usage_ratio,
swap_used_bytes, swap_usage_ratio, filesystem_size_bytes / filesystem_used_bytes /
filesystem_usage_ratio {mountpoint}, disk_read_bytes_total / disk_written_bytes_total
{device}, network_receive_bytes_total / network_transmit_bytes_total /
network_receive_drop_total {interface}, load1, load5, load15, processes,
uptime_seconds, wireguard_peer_handshake_age_seconds / wireguard_peer_receive_bytes_total
/ wireguard_peer_transmit_bytes_total / wireguard_peer_latency_seconds {peer},
agent_spool_batches, agent_spool_dropped_batches_total, agent_metric_errors_total.

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

VERSION = 1
TOPIC_ROOT = "cladnet/metrics"
ACK_ROOT = "cladnet/acks"
# Prometheus-compatible names, so the same names work in VictoriaMetrics/PromQL.
NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,127}$")
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")
TOPIC_PART_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_SAMPLES = 20_000
MAX_LABEL_VALUE = 256


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

    def add(self, name: str, value: float, **labels: str) -> None:
        self.samples.append((name, labels, float(value)))

    def encode(self) -> bytes:
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
                "samples": [[n, lb, v] for n, lb, v in self.samples],
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


def decode(payload: bytes, topic_name: str | None = None) -> Batch:
    """Parse and validate a batch; ``topic_name`` must match its network/host if given.

    Raises BatchError with a short reason; never anything else for bad input.
    """
    try:
        raw: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BatchError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        raise BatchError("not a version-1 batch object")
    try:
        network, host = str(raw["network"]), str(raw["host"])
        seq, ts = raw["seq"], float(raw["ts"])
        interval = float(raw.get("interval", 0))
        samples_raw = raw["samples"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BatchError(f"missing or bad field: {exc}") from None
    if not (TOPIC_PART_RE.match(network) and TOPIC_PART_RE.match(host)):
        raise BatchError("bad network or host name")
    if topic_name is not None and topic_name != topic(network, host):
        raise BatchError(f"batch for {network}/{host} published on {topic_name}")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise BatchError("seq must be a non-negative integer")
    if not math.isfinite(ts) or not isinstance(samples_raw, list):
        raise BatchError("bad ts or samples")
    if len(samples_raw) > MAX_SAMPLES:
        raise BatchError(f"more than {MAX_SAMPLES} samples")
    samples = []
    for item in samples_raw:
        if not (isinstance(item, list) and len(item) == 3):
            raise BatchError("a sample must be [name, labels, value]")
        name, labels, value = item
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise BatchError(f"bad metric name {name!r}")
        if not isinstance(labels, dict) or not all(
            isinstance(k, str)
            and LABEL_RE.match(k)
            and isinstance(v, str)
            and len(v) <= MAX_LABEL_VALUE
            for k, v in labels.items()
        ):
            raise BatchError(f"bad labels on {name}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BatchError(f"value of {name} is not a number")
        if not math.isfinite(value):
            continue  # NaN/inf (e.g. no RTT yet) carry no information
        samples.append((name, labels, float(value)))
    return Batch(
        network=network,
        host=host,
        seq=seq,
        ts=ts,
        interval=interval,
        samples=samples,
        host_id=str(raw.get("host_id", "")),
        sent=float(raw.get("sent", ts) or ts),
    )
