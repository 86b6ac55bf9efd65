"""Background jobs run on one controller replica at a time (etcd lease election)."""

from __future__ import annotations

import json
import signal
import time

import httpx

from lab.components import Controller, Etcd, wait_until


def _leading(ctl: Controller) -> bool | None:
    try:
        return httpx.get(f"{ctl.url}/readyz", timeout=2).json().get("leader")
    except httpx.HTTPError:
        return None


def test_one_replica_leads_and_another_takes_over(make_controller, etcd: Etcd) -> None:
    env = {"CLADNET_LEADER_TTL": "2", "CLADNET_JANITOR_INTERVAL": "0.3"}
    replicas = [make_controller(extra_env=env) for _ in range(3)]
    wait_until(lambda: sum(bool(_leading(c)) for c in replicas) == 1, 10, what="one leader")
    time.sleep(1.5)  # and it stays one
    assert sum(bool(_leading(c)) for c in replicas) == 1
    leader = next(c for c in replicas if _leading(c))
    others = [c for c in replicas if c is not leader]

    # The leader's janitor removes expired join tokens.
    expired = {
        "id": "t1",
        "network_id": "n-x",
        "hash": "x",
        "expires_at": time.time() - 1,
        "max_uses": None,
        "description": "",
        "created_at": time.time() - 100,
    }
    etcd.ctl("put", "/cladnet/tokens/t1", json.dumps(expired))
    wait_until(
        lambda: etcd.ctl("get", "/cladnet/tokens/t1") == "", 10, what="expired token removed"
    )

    killed_at = time.monotonic()
    leader.stop(signal.SIGKILL)  # no clean lease revoke: the lease must expire
    wait_until(lambda: sum(bool(_leading(c)) for c in others) == 1, 15, what="a new leader")
    print(f"takeover after {time.monotonic() - killed_at:.1f}s (lease TTL 2 s)")
