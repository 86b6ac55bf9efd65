"""Is my overlay healthy? Pure functions over the controller's host list (liveness) and
the collector's pair health (no I/O)."""

from __future__ import annotations

from typing import Any

from cladnet import policy as acl

DOWN_AFTER = 30.0  # 3 heartbeats
BROKEN_AFTER = 180.0  # a WireGuard session rekeys every 2 min: 3 min without = broken
MOVED_WITHIN = 600.0


def host_up(host: dict[str, Any], now: float) -> bool:
    return bool(host.get("last_seen")) and now - float(host["last_seen"]) <= DOWN_AFTER


def with_health(hosts: list[dict[str, Any]], health: dict[str, Any]) -> list[dict[str, Any]]:
    """The controller's hosts, each with ``status.peers`` from the collector's pair health
    (``GET /v1/networks/{name}/pairs``: reporter name → peer name → figures)."""
    ids = {h["name"]: h["id"] for h in hosts}
    out = []
    for h in hosts:
        reported = (health.get(h["name"]) or {}).get("peers") or {}
        peers = [{"peer_id": ids[name], **fig} for name, fig in reported.items() if name in ids]
        out.append({**h, "status": {"peers": peers}})
    return out


def _joined(a: dict[str, Any], b: dict[str, Any]) -> float:
    """When the younger of two hosts joined (0 when unknown: old enough)."""
    return max(float(a.get("created_at") or 0), float(b.get("created_at") or 0))


def _policy_says(policy: acl.Policy | None, a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Which rule lets ``a`` open connections to ``b``; ``reverse only`` when only ``b``
    may reach ``a``; ``blocked`` when neither (the two are not each other's peers)."""
    if policy is None:
        return None
    rule = acl.first_rule(policy, a, b)
    if rule is not None:
        return f"rule {rule}"
    return "reverse only" if acl.has_flow(policy, b, a) else "blocked"


def pairs(
    hosts: list[dict[str, Any]], now: float, policy: acl.Policy | None = None
) -> list[dict[str, Any]]:
    """One row per ordered pair (reporter → peer), worst first.

    ``state``: ``ok``, ``broken`` (no handshake within 3 min, or none at all while
    both are up), ``connecting`` (no handshake yet, but one of the two joined less
    than 3 min ago), ``down`` (one of the two is down), ``unknown`` (no report yet),
    ``blocked`` (the policy allows no flow either way: no tunnel is expected). With a
    ``policy``, ``policy`` says which rule allows the pair (see ``_policy_says``).
    """
    by_id = {h["id"]: h for h in hosts}
    rows = []
    for h in hosts:
        reported = {p["peer_id"]: p for p in ((h.get("status") or {}).get("peers") or [])}
        for other in hosts:
            if other["id"] == h["id"]:
                continue
            p = reported.get(other["id"])
            says = _policy_says(policy, h, by_id[other["id"]])
            both_up = host_up(h, now) and host_up(by_id[other["id"]], now)
            age = p.get("handshake_age_s") if p else None
            if says == "blocked":
                state = "blocked"
            elif not both_up:
                state = "down"
            elif p is None:
                state = "unknown"
            elif age is None and now - _joined(h, by_id[other["id"]]) < BROKEN_AFTER:
                state = "connecting"
            elif age is None or age > BROKEN_AFTER:
                state = "broken"
            else:
                state = "ok"
            rows.append(
                {
                    "from": h["name"],
                    "to": other["name"],
                    "state": state,
                    "handshake_age_s": age,
                    "latency_ms": p.get("latency_ms") if p else None,
                    "policy": says,
                }
            )
    rank = {"broken": 0, "down": 1, "connecting": 2, "unknown": 3, "ok": 4, "blocked": 5}
    return sorted(
        rows, key=lambda r: (rank[r["state"]], -(r["latency_ms"] or 0), r["from"], r["to"])
    )


def summary(
    network: dict[str, Any],
    hosts: list[dict[str, Any]],
    now: float,
    policy: acl.Policy | None = None,
) -> dict[str, Any]:
    """The ``cladnet status`` view of one network (also its ``--json`` schema)."""
    rows = pairs(hosts, now, policy)
    return {
        "network": network["name"],
        "cidr": network["cidr"],
        "hosts_up": sorted(h["name"] for h in hosts if host_up(h, now)),
        "hosts_down": sorted(h["name"] for h in hosts if not host_up(h, now)),
        "endpoint_changed": sorted(
            h["name"]
            for h in hosts
            if h.get("public_address_changed_at")
            and now - float(h["public_address_changed_at"]) <= MOVED_WITHIN
        ),
        "pairs": rows,
        "broken_pairs": sum(r["state"] == "broken" for r in rows),
        "healthy": all(r["state"] in ("ok", "blocked") for r in rows)
        and all(host_up(h, now) for h in hosts),
    }
