"""Alarm rules and their evaluation: pure, so every transition is unit-testable.

A rule fires once per episode: when its condition has held for ``for_s`` seconds
(by the samples' own timestamps) it emits one FIRING event, and one RESOLVED
event when the condition stops holding — not one per sample.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from cladnet.metrics import NAME_RE, Sample

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
HOST_DOWN = "host_down"


class RuleError(ValueError):
    """A rule that cannot be evaluated (unknown operator, bad metric name…)."""


# What every agent publishes (documented in cladnet/metrics.py); a rule on any other
# name can only fire if some publisher sends it (the collector adds the names it saw).
# tests/test_cli.py checks the agent's sources name no metric missing here.
AGENT_METRICS = frozenset(
    {
        "agent_controller_unreachable",
        "agent_controller_unrecognised",
        "agent_metric_errors_total",
        "agent_metrics_collector_ack",
        "agent_spool_batches",
        "agent_spool_bytes",
        "agent_spool_dropped_batches_total",
        "cpu_usage_ratio",
        "disk_read_bytes_total",
        "disk_written_bytes_total",
        "filesystem_size_bytes",
        "filesystem_usage_ratio",
        "filesystem_used_bytes",
        "load1",
        "load15",
        "load5",
        "memory_total_bytes",
        "memory_usage_ratio",
        "memory_used_bytes",
        "network_receive_bytes_total",
        "network_receive_drop_total",
        "network_transmit_bytes_total",
        "processes",
        "swap_usage_ratio",
        "swap_used_bytes",
        "uptime_seconds",
        "wireguard_peer_handshake_age_seconds",
        "wireguard_peer_latency_seconds",
        "wireguard_peer_receive_bytes_total",
        "wireguard_peer_transmit_bytes_total",
    }
)


def closest_metrics(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` known names most like ``name``: sharing a word (``cpu_percent`` →
    ``cpu_usage_ratio``) first, then by spelling (``cpu_usage_ration``)."""
    words = set(name.lower().split("_"))
    scored = []
    for candidate in known:
        shared = len(words & set(candidate.split("_")))
        ratio = difflib.SequenceMatcher(None, name.lower(), candidate).ratio()
        if shared or ratio >= 0.6:
            scored.append((-shared, -ratio, candidate))
    return [c for _, _, c in sorted(scored)[:n]]


def check_metric(name: str, known: Iterable[str]) -> None:
    """``RuleError`` naming the closest known metrics when ``name`` is not known."""
    names = set(known)
    if name in names:
        return
    close = closest_metrics(name, names)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise RuleError(f"no metric named {name!r} is published{hint}")


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    metric: str
    op: str
    threshold: float
    network: str
    host: str | None = None  # None: every host of the network
    labels: dict[str, str] = field(default_factory=dict)  # must all match
    for_s: float = 0.0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise RuleError(f"op must be one of {' '.join(OPS)}, got {self.op!r}")
        if not NAME_RE.match(self.metric):
            raise RuleError(f"not a metric name: {self.metric!r}")
        if self.for_s < 0:
            raise RuleError("for_s must be >= 0")

    def matches(self, s: Sample) -> bool:
        if s.name != self.metric or s.network != self.network:
            return False
        if self.host is not None and s.host != self.host:
            return False
        labels = dict(s.labels)
        return all(labels.get(k) == v for k, v in self.labels.items())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    """A transition of one alarm (one rule, host and series)."""

    state: str  # "firing" | "resolved"
    rule_id: str
    rule_name: str
    network: str
    host: str
    series: str
    value: float | None
    threshold: float | None
    op: str | None
    ts: float

    def text(self) -> str:
        head = "FIRING" if self.state == "firing" else "RESOLVED"
        if self.rule_id == HOST_DOWN:
            return f"[{head}] {self.network}/{self.host}: host down (no metrics)"
        return (
            f"[{head}] {self.rule_name} on {self.network}/{self.host}: {self.series} = "
            f"{self.value:g} ({self.op} {self.threshold:g})"
        )


@dataclass
class _State:
    pending_since: float | None = None
    firing: bool = False
    value: float | None = None
    since: float | None = None


class AlarmEngine:
    """Holds rules and per-alarm state; feed it samples, get transitions back."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: dict[str, Rule] = {r.id: r for r in rules}
        self._state: dict[tuple[str, str, str, str], _State] = {}

    def set_rule(self, rule: Rule) -> None:
        self.rules[rule.id] = rule
        self._forget(rule.id)

    def remove_rule(self, rule_id: str) -> bool:
        self._forget(rule_id)
        return self.rules.pop(rule_id, None) is not None

    def _forget(self, rule_id: str) -> None:
        for key in [k for k in self._state if k[0] == rule_id]:
            del self._state[key]

    def observe(self, samples: Iterable[Sample]) -> list[Event]:
        """Evaluate every rule against new samples; return the transitions."""
        events = []
        rules = list(self.rules.values())
        for s in samples:
            for rule in rules:
                if not rule.matches(s):
                    continue
                key = (rule.id, s.network, s.host, s.series)
                st = self._state.setdefault(key, _State())
                st.value = s.value
                if OPS[rule.op](s.value, rule.threshold):
                    if st.pending_since is None:
                        st.pending_since = s.ts
                    if not st.firing and s.ts - st.pending_since >= rule.for_s:
                        st.firing, st.since = True, s.ts
                        events.append(self._event("firing", rule, s.network, s.host, s.series, s))
                else:
                    st.pending_since = None
                    if st.firing:
                        st.firing, st.since = False, None
                        events.append(self._event("resolved", rule, s.network, s.host, s.series, s))
        return events

    @staticmethod
    def _event(state: str, rule: Rule, network: str, host: str, series: str, s: Sample) -> Event:
        return Event(
            state, rule.id, rule.name, network, host, series, s.value, rule.threshold, rule.op, s.ts
        )

    def check_down(
        self, last_seen: dict[tuple[str, str], tuple[float, float]], now: float, missed: int = 3
    ) -> list[Event]:
        """Built-in host-down alarm: no batch for ``missed`` intervals.

        ``last_seen`` maps (network, host) to (last batch time, its interval).
        """
        events = []
        for (network, host), (ts, interval) in last_seen.items():
            key = (HOST_DOWN, network, host, "")
            st = self._state.setdefault(key, _State())
            down = now - ts > missed * max(interval, 1.0)
            if down and not st.firing:
                st.firing, st.since = True, now
                events.append(
                    Event("firing", HOST_DOWN, HOST_DOWN, network, host, "", None, None, None, now)
                )
            elif not down and st.firing:
                st.firing, st.since = False, None
                events.append(
                    Event(
                        "resolved", HOST_DOWN, HOST_DOWN, network, host, "", None, None, None, now
                    )
                )
        return events

    def active(self) -> list[dict[str, Any]]:
        """Alarms firing now."""
        out = []
        for (rule_id, network, host, series), st in self._state.items():
            if st.firing:
                rule = self.rules.get(rule_id)
                out.append(
                    {
                        "rule_id": rule_id,
                        "rule_name": rule.name if rule else rule_id,
                        "network": network,
                        "host": host,
                        "series": series,
                        "value": st.value,
                        "since": st.since,
                    }
                )
        return sorted(out, key=lambda a: (a["network"], a["host"], a["rule_name"]))
