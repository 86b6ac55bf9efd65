"""VM groups on mock drivers: driver config, create, wait for a state."""

from __future__ import annotations

import json
from pathlib import Path

from lab.components import wait_until


def mock_drivers(tmp_path: Path, **mock: object) -> dict[str, str]:
    """Controller environment for a mock driver with ``mock`` options."""
    options = {"state_file": str(tmp_path / "mock-cloud.json"), **mock}
    path = tmp_path / "drivers.json"
    path.write_text(json.dumps({"mock": options}))
    return {"CLADNET_DRIVERS": str(path), "CLADNET_LEADER_TTL": "2"}


def mock_cloud(tmp_path: Path) -> dict[str, dict]:
    """What the mock cloud holds: VM name → record."""
    path = tmp_path / "mock-cloud.json"
    return json.loads(path.read_text()) if path.exists() else {}


def create_group(admin, name: str = "web", count: int = 3, **extra) -> dict:
    body = {"name": name, "members": [{"driver": "mock", "region": "mock-1", "count": count}]}
    r = admin.post("/v1/groups", json={**body, **extra})
    assert r.status_code == 202, r.text
    return r.json()


def wait_group_state(admin, name: str, state: str, timeout: float = 20) -> dict:
    def check():
        group = admin.get(f"/v1/groups/{name}").json()
        return group if group.get("state") == state else None

    return wait_until(check, timeout, what=f"group {name} to be {state}")
