"""The ``cladnet`` CLI against a real controller (real etcd) and collector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cladnet.cli import app
from cladnet.cli.status import pairs, summary
from cladnet.keys import generate_keypair
from tests.components import ADMIN_TOKEN, REPO, Controller, free_port


@pytest.fixture
def cli(tmp_path: Path, monkeypatch):
    """Run a command in-process with a private config dir; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("CLADNET_CONTROLLER", "CLADNET_COLLECTOR", "CLADNET_TOKEN", "CLADNET_CONTEXT"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()

    def run(*args: str):
        r = runner.invoke(app, list(args), catch_exceptions=True)
        return r.exit_code, r.stdout, r.stderr if r.stderr_bytes is not None else ""

    return run


def _login(cli, ctl: Controller, **extra: str) -> None:
    args = ["login", ctl.url, "--token", ADMIN_TOKEN]
    for k, v in extra.items():
        args += [f"--{k}", v]
    code, out, _ = cli(*args)
    assert code == 0, out


def test_login_writes_a_private_config_and_refuses_a_bad_token(
    cli, controller: Controller, tmp_path: Path
) -> None:
    code, _, _ = cli("login", controller.url, "--token", "cla_bad.bad")
    assert code != 0
    assert not (tmp_path / "config" / "cladnet" / "config.toml").exists()
    _login(cli, controller)
    path = tmp_path / "config" / "cladnet" / "config.toml"
    assert path.stat().st_mode & 0o777 == 0o600
    assert ADMIN_TOKEN in path.read_text() and "current" in path.read_text()


def test_networks_tokens_and_address_spaces(cli, controller: Controller) -> None:
    _login(cli, controller)
    code, out, _ = cli("net", "create", "prod", "--cidr", "10.60.0.0/24")
    assert code == 0 and "created prod" in out and "10.60.0.0/24" in out
    code, out, _ = cli("net", "list", "--json")
    nets = json.loads(out)
    assert [n["name"] for n in nets] == ["prod"]
    assert {"id", "name", "cidr", "mtu", "listen_port", "keepalive"} <= set(nets[0])
    code, out, _ = cli("net", "list")
    assert "prod" in out and "10.60.0.0/24" in out

    code, out, _ = cli("token", "create", "prod", "--max-uses", "2", "--json")
    tok = json.loads(out)
    assert tok["token"].startswith("clj_") and tok["max_uses"] == 2
    code, out, _ = cli("token", "list", "prod", "--json")
    assert [t["id"] for t in json.loads(out)] == [tok["id"]]
    assert tok["token"] not in out  # secrets are never listed
    code, out, _ = cli("token", "revoke", "prod", tok["id"])
    assert code == 0 and json.loads(cli("token", "list", "prod", "--json")[1]) == []

    code, out, _ = cli("address-spaces", "--hosts", "50", "--json")
    spaces = json.loads(out)
    assert spaces["recommended"] and {b["block"] for b in spaces["blocks"]} >= {"10.0.0.0/8"}
    code, out, _ = cli("address-spaces", "--hosts", "50")
    assert "recommended for 50 hosts" in out

    code, out, _ = cli("net", "delete", "prod")
    assert code == 0 and "deleted prod" in out


def _fake_host(ctl: Controller, token: str, name: str) -> dict:
    with httpx.Client(base_url=ctl.url, timeout=10) as c:
        r = c.post("/v1/join", json={"token": token, "hostname": name,
                                     "public_key": generate_keypair()[1]})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()


def _report(ctl: Controller, host: dict, peers: list[dict]) -> None:
    with ctl.client(token=host["credential"]) as c:
        assert c.post(f"/v1/hosts/{host['host_id']}/heartbeat", json={}).status_code == 200
        r = c.post(f"/v1/hosts/{host['host_id']}/status", json={"peers": peers})
        assert r.status_code == 204, r.text


def test_status_shows_a_healthy_and_a_broken_pair(cli, controller: Controller) -> None:
    _login(cli, controller)
    cli("net", "create", "mesh", "--cidr", "10.61.0.0/24")
    token = json.loads(cli("token", "create", "mesh", "--json")[1])["token"]
    a, b, c = (_fake_host(controller, token, n) for n in ("vm1", "vm2", "vm3"))
    ok = {"handshake_age_s": 5, "rx_bytes": 1, "tx_bytes": 1, "latency_ms": 0.8}
    _report(controller, a, [{"peer_id": b["host_id"], **ok},
                            {"peer_id": c["host_id"], "handshake_age_s": 400}])  # fmt: skip
    _report(controller, b, [{"peer_id": a["host_id"], **ok}, {"peer_id": c["host_id"], **ok}])
    _report(controller, c, [{"peer_id": a["host_id"], "handshake_age_s": 600},
                            {"peer_id": b["host_id"], **ok}])  # fmt: skip

    code, out, _ = cli("status", "mesh", "--json")
    assert code == 3  # unhealthy is its own exit code
    (view,) = json.loads(out)
    assert view["network"] == "mesh" and view["hosts_up"] == ["vm1", "vm2", "vm3"]
    assert view["broken_pairs"] == 2 and not view["healthy"]
    assert {(p["from"], p["to"]) for p in view["pairs"][:2]} == {("vm1", "vm3"), ("vm3", "vm1")}
    assert all(p["state"] == "ok" for p in view["pairs"][2:])
    code, out, _ = cli("status", "mesh")
    assert "mesh" in out and "broken" in out

    code, out, _ = cli("peers", a["host_id"], "--json")
    assert {p["name"] for p in json.loads(out)} == {"vm2", "vm3"}
    assert {p["dns_name"] for p in json.loads(out)} == {
        "vm2.mesh.cladnet.internal",
        "vm3.mesh.cladnet.internal",
    }
    assert view["domain"] == "mesh.cladnet.internal"
    assert view["names"]["vm1"] == "vm1.mesh.cladnet.internal"
    assert "NAMES" in cli("status", "mesh")[1]  # the table may wrap the domain
    code, out, _ = cli("resolve", "VM2.mesh.cladnet.internal.")
    assert code == 0 and out.strip() == b["overlay_ip"]
    assert cli("resolve", "nope.mesh.cladnet.internal")[0] == 1  # CliError: one line via main()
    code, out, _ = cli("hosts", "list", "mesh", "--json")
    assert [h["name"] for h in json.loads(out)] == ["vm1", "vm2", "vm3"]


def test_errors_are_one_line_with_a_nonzero_exit(tmp_path: Path, controller: Controller) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cladnet.cli", *args]
        return subprocess.run(
            command, cwd=REPO, env={**env, **extra}, capture_output=True, text=True, timeout=60
        )

    dead = run("net", "list", CLADNET_CONTROLLER=f"http://127.0.0.1:{free_port()}")
    assert dead.returncode == 1 and dead.stderr.startswith("cladnet: cannot reach controller")
    assert dead.stderr.count("\n") == 1
    unauth = run("net", "list", CLADNET_CONTROLLER=controller.url, CLADNET_TOKEN="cla_x.y")
    assert unauth.returncode == 1 and "unauthorized" in unauth.stderr
    assert unauth.stderr.count("\n") == 1
    env_ok = {"CLADNET_CONTROLLER": controller.url, "CLADNET_TOKEN": ADMIN_TOKEN}
    assert run("net", "create", "dup", "--cidr", "10.62.0.0/24", **env_ok).returncode == 0
    dup = run("net", "create", "dup", "--cidr", "10.63.0.0/24", **env_ok)
    assert dup.returncode == 1 and "already" in dup.stderr and dup.stderr.count("\n") == 1
    nothing = run("net", "list")
    assert nothing.returncode == 1 and "no controller URL" in nothing.stderr


def test_metrics_and_alarms_against_the_collector(
    cli, controller: Controller, make_collector
) -> None:
    collector = make_collector()
    _login(cli, controller, collector=collector.url)
    code, out, _ = cli("alarms", "create", "hot", "cpu_usage_ratio", ">", "90", "--network", "prod",
                       "--for", "1m", "--json")  # fmt: skip
    assert code == 0, out
    rule = json.loads(out)
    assert rule["for_s"] == 60 and rule["op"] == ">"
    code, out, _ = cli("alarms", "list", "--json")
    listed = json.loads(out)
    assert [r["id"] for r in listed["rules"]] == [rule["id"]] and listed["alarms"] == []
    assert cli("alarms", "delete", rule["id"])[0] == 0
    code, out, _ = cli("metrics", "top", "--json")
    assert code == 0 and json.loads(out) == {}
    code, out, _ = cli("metrics", "show", "vm1", "cpu_usage_ratio", "--since", "5m", "--json")
    assert code == 0 and json.loads(out)["points"] == []


def test_status_logic_without_io() -> None:
    now = 1000.0
    up = {"last_seen": now - 5}
    hosts = [
        {
            "id": "a",
            "name": "a",
            **up,
            "status": {"peers": [{"peer_id": "b", "handshake_age_s": 200}]},
        },
        {
            "id": "b",
            "name": "b",
            **up,
            "status": {"peers": [{"peer_id": "d", "handshake_age_s": None}]},
        },
        {"id": "d", "name": "d", **up, "created_at": now - 20, "status": {"peers": []}},
        {"id": "c", "name": "c", "last_seen": now - 100, "public_address_changed_at": now - 60},
    ]
    rows = {(r["from"], r["to"]): r["state"] for r in pairs(hosts, now)}
    assert rows[("a", "b")] == "broken"  # a handshake older than 3 minutes
    assert rows[("b", "a")] == "unknown"  # b has not reported a
    assert rows[("b", "d")] == "connecting"  # no handshake yet, but d joined 20 s ago
    assert rows[("a", "c")] == rows[("c", "a")] == "down"
    view = summary({"name": "n", "cidr": "10.0.0.0/24"}, hosts, now)
    assert view["hosts_down"] == ["c"] and view["endpoint_changed"] == ["c"]
    assert view["pairs"][0]["state"] == "broken" and not view["healthy"]
    assert time.time() > 0
