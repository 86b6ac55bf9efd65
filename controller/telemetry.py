"""The controller's own Prometheus metrics (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

# Label values come from this fixed set, never from the request: a client inventing
# methods (or paths: routes are labelled by template) must not create series.
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
UNMATCHED_ROUTE = "unmatched"


def method_label(method: str) -> str:
    """``method`` if it is a standard one, else ``"other"``."""
    return method if method in METHODS else "other"


HTTP_REQUESTS = Counter(
    "cladnet_controller_http_requests_total",
    "HTTP requests by method (or other), route template (or unmatched) and status code.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "cladnet_controller_http_request_seconds",
    "HTTP request latency by route template.",
    ["route"],
    registry=REGISTRY,
)
API_ERRORS = Counter(
    "cladnet_controller_api_errors_total",
    "Requests refused with an API error, by error code.",
    ["code"],
    registry=REGISTRY,
)
AUDIT_NOT_STORED = Counter(
    "cladnet_controller_audit_not_stored_total",
    "Audit entries of a host over its rate kept in the log only, not in etcd.",
    registry=REGISTRY,
)
JOINS = Counter("cladnet_controller_joins_total", "Successful joins.", registry=REGISTRY)
TXN_RETRIES = Counter(
    "cladnet_controller_txn_retries_total",
    "etcd transactions lost to a concurrent writer and retried.",
    ["operation"],
    registry=REGISTRY,
)
WATCHERS = Gauge("cladnet_controller_watchers", "Open peer watch streams.", registry=REGISTRY)
WATCH_EVENTS = Counter(
    "cladnet_controller_watch_events_total",
    "Peer events sent to watchers (one per watcher per event).",
    registry=REGISTRY,
)
ETCD_WATCH_RESTARTS = Counter(
    "cladnet_controller_etcd_watch_restarts_total",
    "etcd watches restarted after an error.",
    registry=REGISTRY,
)
GROUP_OPERATIONS = Counter(
    "cladnet_controller_vm_operations_total",
    "Driver operations on group VMs, by operation and outcome (ok, failed).",
    ["operation", "outcome"],
    registry=REGISTRY,
)
BROKER_USERS_REMOVED = Counter(
    "cladnet_controller_broker_users_removed_total",
    "Broker users of hosts that no longer exist, removed by the cleanup.",
    registry=REGISTRY,
)
BROKER_CLEANUP_FAILURES = Counter(
    "cladnet_controller_broker_cleanup_failures_total",
    "Broker user cleanups that failed (the broker away or refusing); retried later.",
    registry=REGISTRY,
)
