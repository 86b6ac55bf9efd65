"""Groups of VMs through a real controller and etcd, with the ``mock`` driver (its
"cloud" is a JSON file, so the test and several controller processes see the same).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from cladnet import groups as lifecycle
from lab.components import wait_until
from lab.groups import create_group, mock_cloud, mock_drivers, wait_group_state


def test_group_lifecycle_with_partial_states(make_controller, tmp_path: Path) -> None:
    ctl = make_controller(extra_env=mock_drivers(tmp_path))
    with ctl.client() as admin:
        created = create_group(admin, count=3)
        assert created["state"] == lifecycle.CREATING
        assert [vm["name"] for vm in created["vms"]] == ["web-1", "web-2", "web-3"]
        group = wait_group_state(admin, "web", lifecycle.RUNNING)
        assert group["counts"] == {"Running": 3}
        assert all(vm["private_ip"] and vm["public_ip"] for vm in group["vms"])
        assert set(mock_cloud(tmp_path)) == {"web-1", "web-2", "web-3"}

        # The group got its own network, with a recommended private CIDR.
        net = admin.get("/v1/networks/web").json()
        assert net["cidr"].startswith(("10.", "172.", "192.168."))
        assert group["network_id"] == net["id"]

        r = admin.post("/v1/groups/web/vms/web-2/actions", json={"action": "suspend"})
        assert r.status_code == 202, r.text
        group = wait_group_state(admin, "web", "Partial-Suspended")
        assert group["counts"] == {"Running": 2, "Suspended": 1}
        assert mock_cloud(tmp_path)["web-2"]["power"] == "suspended"

        # Suspending again is refused for that VM (clear 409), and nothing changes.
        r = admin.post("/v1/groups/web/vms/web-2/actions", json={"action": "suspend"})
        assert r.status_code == 409 and "Suspended" in r.json()["message"]

        # A group-wide resume applies to the suspended VM only.
        admin.post("/v1/groups/web/actions", json={"action": "resume"})
        wait_group_state(admin, "web", lifecycle.RUNNING)
        assert mock_cloud(tmp_path)["web-2"] == {
            **mock_cloud(tmp_path)["web-2"],
            "power": "running",
        }

        admin.post("/v1/groups/web/actions", json={"action": "reboot"})
        group = wait_group_state(admin, "web", lifecycle.RUNNING)
        assert all(int(vm["details"]["boots"]) >= 2 for vm in group["vms"])

        r = admin.delete("/v1/groups/web")
        assert r.status_code == 202
        wait_until(lambda: admin.get("/v1/groups/web").status_code == 404, 20, what="removal")
        assert mock_cloud(tmp_path) == {}
        assert admin.get("/v1/networks/web").status_code == 404
        audited = {(e["method"], e["path"]) for e in admin.get("/v1/audit").json()["entries"]}
        assert {("POST", "/v1/groups"), ("DELETE", "/v1/groups/web")} <= audited


def test_a_failing_vm_does_not_stop_the_others_and_can_be_retried(
    make_controller, tmp_path: Path
) -> None:
    ctl = make_controller(extra_env=mock_drivers(tmp_path, failures={"db-2": ["create"]}))
    with ctl.client() as admin:
        create_group(admin, "db", count=3)
        group = wait_group_state(admin, "db", "Partial-Failed")
        assert group["counts"] == {"Running": 2, "Failed": 1}
        failed = next(vm for vm in group["vms"] if vm["state"] == "Failed")
        assert failed["name"] == "db-2"
        assert failed["failed_op"] == "create" and "failed" in failed["error"]
        assert set(mock_cloud(tmp_path)) == {"db-1", "db-3"}

    # The provider recovers (a controller with a healthy driver config): retry works.
    ctl.stop()
    ctl.extra_env = mock_drivers(tmp_path)
    ctl.start()
    with ctl.client() as admin:
        r = admin.post("/v1/groups/db/actions", json={"action": "retry"})
        assert r.status_code == 202, r.text
        wait_group_state(admin, "db", lifecycle.RUNNING)
        assert set(mock_cloud(tmp_path)) == {"db-1", "db-2", "db-3"}


def test_bad_requests_get_clear_errors_and_write_nothing(make_controller, tmp_path) -> None:
    ctl = make_controller(extra_env=mock_drivers(tmp_path))
    with ctl.client() as admin:
        cases = [
            # Well-formed, naming what this controller does not have: 404.
            ({"name": "x", "members": [{"driver": "nope", "region": "r", "count": 1}]}, 404),
            ({"name": "x", "members": [{"driver": "mock", "region": "nowhere"}]}, 404),
            ({"name": "x", "members": [{"driver": "mock", "region": "mock-1", "count": 0}]}, 422),
            ({"name": "Bad Name", "members": [{"driver": "mock", "region": "mock-1"}]}, 422),
            ({"name": "x", "members": []}, 422),
        ]
        for body, status in cases:
            r = admin.post("/v1/groups", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["message"], r.text
        assert admin.get("/v1/groups").json() == []
        assert admin.get("/v1/networks").json() == []

        admin.post("/v1/networks", json={"name": "taken"})
        r = admin.post(
            "/v1/groups",
            json={"name": "taken", "members": [{"driver": "mock", "region": "mock-1"}]},
        )
        assert r.status_code == 409 and r.json()["error"] == "network_exists"
        create_group(admin, "once", count=1)
        r = admin.post(
            "/v1/groups", json={"name": "once", "members": [{"driver": "mock", "region": "mock-1"}]}
        )
        assert r.status_code == 409
        r = admin.post("/v1/groups/once/actions", json={"action": "explode"})
        assert r.status_code == 422
        assert admin.post("/v1/groups/none/actions", json={"action": "suspend"}).status_code == 404

        viewer = admin.post("/v1/admin-tokens", json={"role": "viewer"}).json()["token"]
    with ctl.client(viewer) as v:
        assert v.get("/v1/groups").status_code == 200
        assert v.post("/v1/groups/once/actions", json={"action": "suspend"}).status_code == 403
        assert v.delete("/v1/groups/once").status_code == 403
    with ctl.client(None) as anonymous:
        assert anonymous.get("/v1/groups").status_code == 401


@pytest.mark.parametrize("sig", [signal.SIGKILL])
def test_killing_the_leader_mid_creation_leaves_nothing_untracked(
    make_controller, tmp_path: Path, sig: int
) -> None:
    """Two replicas; the one running the reconciler is killed after the cloud made the
    VMs but before their create calls returned: the other takes over, adopts them
    (create is idempotent by name) and the cloud holds exactly the group's VMs."""
    env = mock_drivers(tmp_path, delay=2)
    replicas = [make_controller(extra_env=env), make_controller(extra_env=env)]

    def leader():
        leading = [c for c in replicas if httpx.get(f"{c.url}/readyz").json()["leader"]]
        return leading[0] if leading else None

    first = wait_until(leader, 10, what="a leader")
    second = next(c for c in replicas if c is not first)
    with second.client() as admin:  # asked of the follower, done by the leader
        create_group(admin, "big", count=8)
        wait_until(lambda: len(mock_cloud(tmp_path)) >= 1, 20, what="the first VM")
        assert admin.get("/v1/groups/big").json()["counts"] == {"Creating": 8}
    first.stop(sig)
    with second.client() as admin:
        group = wait_group_state(admin, "big", lifecycle.RUNNING, timeout=60)
    assert set(mock_cloud(tmp_path)) == {vm["name"] for vm in group["vms"]}
    assert len(group["vms"]) == 8


def test_group_commands_of_the_cli(make_controller, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from cladnet.cli import app

    ctl = make_controller(extra_env=mock_drivers(tmp_path, failures={"app-3": ["create"]}))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("CLADNET_CONTROLLER", ctl.url)
    monkeypatch.setenv("CLADNET_TOKEN", ctl.admin_token or "")
    runner = CliRunner()

    def cli(*args: str) -> tuple[int, str]:
        r = runner.invoke(app, list(args))
        return r.exit_code, r.stdout

    code, out = cli(
        "group",
        "create",
        "app",
        "--member",
        "mock:mock-1:2",
        "--member",
        "mock:mock-2",
        "--wait",
        "--json",
    )
    assert code == 0, out
    group = json.loads(out)
    assert group["state"] == "Partial-Failed" and group["counts"] == {"Running": 2, "Failed": 1}
    assert [vm["region"] for vm in group["vms"]] == ["mock-1", "mock-1", "mock-2"]

    code, out = cli("group", "show", "app")
    assert code == 0 and "app-3" in out and "Partial-Failed" in out
    code, out = cli("group", "show", "app", "--json")
    assert "as configured" in json.loads(out)["vms"][2]["error"]
    code, out = cli("group", "suspend", "app", "--vm", "app-1", "--wait", "--json")
    assert code == 0 and json.loads(out)["counts"] == {"Suspended": 1, "Running": 1, "Failed": 1}
    code, out = cli("group", "suspend", "app", "--vm", "app-1")
    assert code != 0  # already suspended: refused with the API's message

    code, out = cli("group", "create", "bad", "--member", "mock")
    assert code != 0
    code, out = cli("group", "list", "--json")
    assert code == 0 and [g["name"] for g in json.loads(out)] == ["app"]
    code, out = cli("group", "delete", "app", "--wait")
    assert code == 0, out
    assert mock_cloud(tmp_path) == {}
