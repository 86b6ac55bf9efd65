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
from cladnet.cli.status import pairs, summary, with_health
from cladnet.keys import generate_keypair
from lab.components import ADMIN_TOKEN, REPO, Controller, Mosquitto, free_port, wait_until
from lab.monitoring import publish_health


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
        r = c.post(
            "/v1/join", json={"token": token, "hostname": name, "public_key": generate_keypair()[1]}
        )
        assert r.status_code == 200, r.text
        return r.json()


def _report(
    ctl: Controller, broker: Mosquitto, host: dict, name: str, peers: dict, network: str = "mesh"
) -> None:
    """A heartbeat to the controller, per-peer health to the collector (as an agent)."""
    with ctl.client(token=host["credential"]) as c:
        assert c.post(f"/v1/hosts/{host['host_id']}/heartbeat", json={}).status_code == 200
    publish_health(ctl, broker, network, host, name, peers)


def test_status_shows_a_healthy_and_a_broken_pair(
    cli, metrics_controller: Controller, mosquitto: Mosquitto, make_collector
) -> None:
    controller, collector = metrics_controller, make_collector()
    _login(cli, controller, collector=collector.url)
    cli("net", "create", "mesh", "--cidr", "10.61.0.0/24")
    token = json.loads(cli("token", "create", "mesh", "--json")[1])["token"]
    a, b, c = (_fake_host(controller, token, n) for n in ("vm1", "vm2", "vm3"))
    ok = {"handshake_age_s": 5, "latency_ms": 0.8}
    _report(controller, mosquitto, a, "vm1", {"vm2": ok, "vm3": {"handshake_age_s": 400}})
    _report(controller, mosquitto, b, "vm2", {"vm1": ok, "vm3": ok})
    _report(controller, mosquitto, c, "vm3", {"vm1": {"handshake_age_s": 600}, "vm2": ok})
    with collector.client() as col:
        wait_until(lambda: len(col.get("/v1/networks/mesh/pairs").json()["hosts"]) == 3)

    code, out, _ = cli("status", "mesh", "--json")
    assert code == 3  # unhealthy is its own exit code
    (view,) = json.loads(out)
    assert view["network"] == "mesh" and view["hosts_up"] == ["vm1", "vm2", "vm3"]
    assert view["broken_pairs"] == 2 and not view["healthy"]
    assert {(p["from"], p["to"]) for p in view["pairs"][:2]} == {("vm1", "vm3"), ("vm3", "vm1")}
    assert all(p["state"] == "ok" for p in view["pairs"][2:])
    code, out, _ = cli("status", "mesh")
    assert "mesh" in out and "broken" in out
    # Which rule lets each pair talk: the new network's allow-all one.
    assert all(p["policy"] == "rule 0" for p in view["pairs"])
    assert "(rule 0)" in " ".join(out.split()), out

    code, out, _ = cli("peers", a["host_id"], "--json")
    assert {p["name"] for p in json.loads(out)} == {"vm2", "vm3"}
    assert {p["dns_name"] for p in json.loads(out)} == {
        "vm2.mesh.cladnet.internal",
        "vm3.mesh.cladnet.internal",
    }
    assert view["domain"] == "mesh.cladnet.internal"
    assert view["names"]["vm1"] == "vm1.mesh.cladnet.internal"
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
    code, out, _ = cli(
        "alarms",
        "create",
        "hot",
        "cpu_usage_ratio",
        ">",
        "90",
        "--network",
        "prod",
        "--for",
        "1m",
        "--json",
    )
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
    # The collector's pair health (by host name) becomes each host's status, by id;
    # a peer the controller does not know (it left) is dropped.
    health = {"a": {"peers": {"b": {"handshake_age_s": 200}, "gone": {"handshake_age_s": 1}}}}
    merged = with_health([{"id": "a", "name": "a"}, {"id": "b", "name": "b"}], health)
    assert merged[0]["status"] == {"peers": [{"peer_id": "b", "handshake_age_s": 200}]}
    assert merged[1]["status"] == {"peers": []}
    assert time.time() > 0


def _run_cli(tmp_path: Path, ctl: Controller, *args: str, **extra: str):
    """The installed entry point (``main``), as a user runs it: one line on stderr."""
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path),
        "CLADNET_CONTROLLER": ctl.url,
        "CLADNET_TOKEN": ADMIN_TOKEN,
        **extra,
    }
    command = [sys.executable, "-m", "cladnet.cli", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_hosts_by_name_with_rounded_rtts_and_clear_errors(
    cli, metrics_controller: Controller, mosquitto: Mosquitto, make_collector, tmp_path: Path
) -> None:
    controller, collector = metrics_controller, make_collector()
    _login(cli, controller, collector=collector.url)
    tokens = {}
    for net, cidr in (("east", "10.64.0.0/24"), ("west", "10.65.0.0/24")):
        cli("net", "create", net, "--cidr", cidr)
        tokens[net] = json.loads(cli("token", "create", net, "--json")[1])["token"]
    a, b = (_fake_host(controller, tokens["east"], n) for n in ("demo-1", "demo-2"))
    twin = _fake_host(controller, tokens["west"], "demo-2")  # the same name elsewhere
    latency = 0.812345678901234
    health = {"demo-2": {"handshake_age_s": 5, "latency_ms": latency}}
    _report(controller, mosquitto, a, "demo-1", health, network="east")
    with collector.client() as col:
        wait_until(lambda: "demo-1" in col.get("/v1/networks/east/pairs").json()["hosts"])

    code, out, _ = cli("peers", "demo-1")  # a name, not only an id
    assert code == 0, out
    row = next(line for line in out.splitlines() if "demo-2" in line)
    assert "0.8" in row and "0.81" not in row
    code, out, _ = cli("peers", "demo-1", "--json")  # exact for machines
    assert json.loads(out)[0]["latency_ms"] == pytest.approx(latency, rel=1e-9)
    assert json.loads(cli("peers", a["host_id"], "--json")[1])[0]["name"] == "demo-2"
    code, out, _ = cli("hosts", "show", "demo-2", "--network", "east", "--json")
    assert code == 0 and json.loads(out)["id"] == b["host_id"]

    ambiguous = _run_cli(tmp_path, controller, "peers", "demo-2")
    assert ambiguous.returncode == 1 and ambiguous.stderr.count("\n") == 1
    assert "several networks (east, west): add --network NAME" in ambiguous.stderr
    assert f"{b['host_id']} (east), {twin['host_id']} (west)" in ambiguous.stderr  # candidates
    unknown = _run_cli(tmp_path, controller, "peers", "demo-3")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "no host named 'demo-3'" in unknown.stderr and "demo-1" in unknown.stderr
    elsewhere = _run_cli(tmp_path, controller, "hosts", "show", "demo-1", "--network", "west")
    assert "no host named 'demo-1' in network west" in elsewhere.stderr


def _lines(run: subprocess.CompletedProcess[str]) -> list[str]:
    assert run.returncode in (0, 3), run.stderr
    return run.stdout.splitlines()


def test_tables_fit_80_columns_and_watch_refreshes(
    cli, metrics_controller: Controller, mosquitto: Mosquitto, make_collector, tmp_path: Path
) -> None:
    controller, collector = metrics_controller, make_collector()
    _login(cli, controller, collector=collector.url)
    cli("net", "create", "east", "--cidr", "10.66.0.0/24")
    token = json.loads(cli("token", "create", "east", "--json")[1])["token"]
    a = _fake_host(controller, token, "demo-1")
    labels = {"role": "database-primary", "zone": "eu-west-1a", "team": "payments"}
    with httpx.Client(base_url=controller.url, timeout=10) as c:
        body = {
            "token": token,
            "hostname": "demo-2",
            "public_key": generate_keypair()[1],
            "labels": labels,
        }
        assert c.post("/v1/join", json=body).status_code == 200
    latency = 1.23456789
    _report(
        controller,
        mosquitto,
        a,
        "demo-1",
        {"demo-2": {"handshake_age_s": 5, "latency_ms": latency}},
        network="east",
    )
    with collector.client() as col:
        wait_until(lambda: "demo-1" in col.get("/v1/networks/east/pairs").json()["hosts"])
    env = {"CLADNET_COLLECTOR": collector.url}

    # 80 columns: every line fits; the columns read first stay, the caption names the rest.
    narrow = _lines(_run_cli(tmp_path, controller, "hosts", "list", "east", COLUMNS="80", **env))
    assert max(len(line) for line in narrow) <= 80
    header = next(line for line in narrow if "NAME" in line)
    assert all(c in header for c in ("NAME", "OVERLAY", "SEEN")) and "LABELS" not in header
    assert any("LABELS" in line and "hidden" in line for line in narrow)
    wide = _lines(_run_cli(tmp_path, controller, "hosts", "list", "east", COLUMNS="200", **env))
    assert any("role=database-primary" in line for line in wide)
    assert not any("hidden" in line for line in wide)
    for command in (["peers", "demo-1"], ["status", "east"]):
        lines = _lines(_run_cli(tmp_path, controller, *command, COLUMNS="80", **env))
        assert lines and max(len(line) for line in lines) <= 80, "\n".join(lines)
    peers_table = "\n".join(
        _lines(_run_cli(tmp_path, controller, "peers", "demo-1", COLUMNS="80", **env))
    )
    assert "demo-2" in peers_table and "1.2" in peers_table and "1.23" not in peers_table

    # --watch --json: one exact document per refresh, until interrupted.
    cmd = [
        sys.executable,
        "-m",
        "cladnet.cli",
        "peers",
        "demo-1",
        "--watch",
        "--interval",
        "0.2",
        "--json",
    ]
    environ = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path),
        "CLADNET_CONTROLLER": controller.url,
        "CLADNET_TOKEN": ADMIN_TOKEN,
        **env,
    }
    with subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, text=True) as w:
        try:
            assert w.stdout is not None
            documents = [json.loads(w.stdout.readline()) for _ in range(2)]
        finally:
            w.terminate()
    assert [[p["latency_ms"] for p in d] for d in documents] == [[latency], [latency]]


def test_alarm_rules_need_a_metric_the_collector_knows(
    cli, controller: Controller, make_collector, tmp_path: Path
) -> None:
    collector = make_collector()
    _login(cli, controller, collector=collector.url)
    env = {"CLADNET_COLLECTOR": collector.url}
    # The old help's own example: no metric of that name exists, so it could never fire.
    bad = _run_cli(
        tmp_path,
        controller,
        "alarms",
        "create",
        "hot",
        "cpu_percent",
        ">",
        "90",
        "--network",
        "prod",
        **env,
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "no metric named 'cpu_percent'" in bad.stderr and "cpu_usage_ratio" in bad.stderr
    typo = _run_cli(
        tmp_path,
        controller,
        "alarms",
        "create",
        "m",
        "memory_usage_ration",
        ">",
        "0.9",
        "--network",
        "prod",
        **env,
    )
    assert "did you mean memory_usage_ratio" in typo.stderr
    assert json.loads(cli("alarms", "list", "--json")[1])["rules"] == []
    # The help's example is a real metric, and it is accepted.
    help_text = _run_cli(tmp_path, controller, "alarms", "create", "--help").stdout
    assert "cpu_percent" not in help_text and "cpu_usage_ratio" in help_text
    code, out, _ = cli(
        "alarms", "create", "hot", "cpu_usage_ratio", ">", "0.9", "--network", "prod", "--json"
    )
    assert code == 0, out
    code, out, _ = cli("metrics", "names", "--json")
    assert "cpu_usage_ratio" in json.loads(out)["names"]
    with collector.client() as c:
        r = c.post(
            "/v1/alarms",
            json={
                "name": "x",
                "metric": "nope_total",
                "network": "prod",
                "op": ">",
                "threshold": 1,
            },
        )
    assert r.status_code == 400 and r.json()["error"] == "unknown_metric"


def test_close_metric_names_and_the_catalogue_matches_the_agent() -> None:
    import re

    from agent.standing import Standing
    from cladnet.alarms import AGENT_METRICS, RuleError, check_metric, closest_metrics

    assert closest_metrics("cpu_percent", AGENT_METRICS)[0] == "cpu_usage_ratio"
    assert closest_metrics("zzz", AGENT_METRICS) == []
    check_metric("load1", AGENT_METRICS)
    with pytest.raises(RuleError, match="did you mean load1"):
        check_metric("laod1", AGENT_METRICS)
    # Every name the agent's code adds to a batch is in the catalogue.
    added = set()
    for path in (REPO / "agent").rglob("*.py"):
        added |= set(re.findall(r'\.add\(\s*"([a-z_0-9]+)"', path.read_text()))
    assert added and added <= AGENT_METRICS, added - AGENT_METRICS
    assert set(Standing(lambda *_: None).gauges()) <= AGENT_METRICS
