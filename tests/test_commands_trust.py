"""Remote commands and broker users as trust boundaries (issue 12, finding 8), against a
real controller and etcd, the real ``cladnet-agent commands`` process and a real
Mosquitto with dynamic security:

- commands are off unless the group asks for them (``allow_commands``), both in what
  its VMs boot with and in what the controller agrees to queue;
- under systemd they run in their own unit, outside the agent's sandbox;
- a host's broker user goes with the host, its network and its group.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import httpx
import pytest

from agent import main as agent_main
from agent.state import Membership, StateDir
from lab.api import join, make_network, make_token
from lab.components import (
    MQTT_ADMIN_PASSWORD,
    MQTT_COLLECTOR_PASSWORD,
    Controller,
    Mosquitto,
    wait_until,
)
from lab.groups import create_group, mock_cloud, mock_drivers, wait_group_state
from lab.monitoring import host_credentials, publish
from tests.support import needs_systemd_analyze, unit_settings, verify_unit, with_real_binaries

REPO = Path(__file__).resolve().parent.parent

# --- commands: the group opts in, or nothing runs ----------------------------------------


def test_commands_are_off_unless_the_group_asks_for_them(make_controller, tmp_path: Path) -> None:
    ctl = make_controller(extra_env=mock_drivers(tmp_path))
    with ctl.client() as admin:
        assert create_group(admin, "web", count=1)["allow_commands"] is False
        assert create_group(admin, "ops", count=1, allow_commands=True)["allow_commands"] is True
        wait_group_state(admin, "web", "Running")
        wait_group_state(admin, "ops", "Running")
        assert admin.get("/v1/groups/web").json()["allow_commands"] is False
        token = make_token(admin, "web")

    # What each VM boots with: only the opted-in group's VMs join with --allow-commands
    # and, under systemd, enable the commands unit.
    boot = {name: vm["user_data"] for name, vm in mock_cloud(tmp_path).items()}
    assert "--allow-commands" not in boot["web-1"]
    assert "cladnet-agent-commands" not in boot["web-1"]
    assert "--allow-commands" in boot["ops-1"]
    assert "systemctl enable --now cladnet-agent-commands.service" in boot["ops-1"]

    # A VM of the plain group whose agent asks for commands anyway (a hand-started
    # --allow-commands agent) still gets none: the controller queues nothing.
    host = join(ctl, token, "web-1").json()
    with ctl.client(token=host["credential"]) as agent:
        assert agent.get(f"/v1/hosts/{host['host_id']}/commands").json() == {"commands": []}
    with ctl.client() as admin:
        r = admin.post("/v1/groups/web/commands", json={"command": "id"})
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "commands_disabled" and "allow_commands" in r.json()["message"]
        with ctl.client(token=host["credential"]) as agent:
            assert agent.get(f"/v1/hosts/{host['host_id']}/commands").json() == {"commands": []}
        r = admin.post("/v1/groups/ops/commands", json={"command": "id"})
        assert r.status_code == 202, r.text


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace needs root")
@pytest.mark.parametrize("allow", [False, True])
def test_user_data_under_systemd_enables_the_commands_unit_only_when_asked(
    tmp_path: Path, allow: bool
) -> None:
    """The VM's first-boot script, run where systemd runs (a private /run with
    /run/systemd/system, fake systemctl and agent that log their arguments)."""
    from cladnet import groups as lifecycle

    calls = tmp_path / "calls"
    for tool in ("systemctl", "cladnet-agent"):
        fake = tmp_path / tool
        fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        fake.chmod(0o755)
    script = tmp_path / "user-data"
    opt_in = {"allow_commands": True} if allow else {}  # off by default
    script.write_text(lifecycle.user_data("http://c", "t", "vm-1", {}, **opt_in))
    boot = f"mount -t tmpfs cl-run /run && mkdir -p /run/systemd/system && sh {script}"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "CLADNET_AGENT": str(tmp_path / "cladnet-agent")}
    subprocess.run(["unshare", "-m", "sh", "-c", boot], env=env, check=True, timeout=30)
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("cladnet-agent join --no-run")
    assert ("--allow-commands" in lines[0]) is allow
    expected = ["systemctl enable --now cladnet-agent.service"]  # the mesh first
    if allow:
        expected.append("systemctl enable --now cladnet-agent-commands.service")
    assert lines[1:] == expected


def test_the_cli_opts_a_group_in_only_when_told(
    make_controller, tmp_path: Path, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from cladnet.cli import app

    ctl = make_controller(extra_env=mock_drivers(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("CLADNET_CONTROLLER", ctl.url)
    monkeypatch.setenv("CLADNET_TOKEN", ctl.admin_token or "")
    runner = CliRunner()
    for name, extra, allowed in (("plain", [], False), ("ops", ["--allow-commands"], True)):
        r = runner.invoke(
            app, ["group", "create", name, "--member", "mock:mock-1", *extra, "--json"]
        )
        assert r.exit_code == 0, r.stdout
        assert json.loads(r.stdout)["allow_commands"] is allowed


# --- commands: their own process and unit, outside the agent's sandbox --------------------


def _state_dir(ctl: Controller, root: Path, host: dict, name: str, allow: bool) -> StateDir:
    """What ``cladnet-agent join`` leaves behind, for a host joined through the API."""
    states = StateDir(root)
    membership = Membership(
        controller=ctl.url,
        host_id=host["host_id"],
        interface="cl-unused",
        network=host["network"],
        me={"name": name, "overlay_ip": host["overlay_ip"]},
        allow_commands=allow,
    )
    states.save_secrets(host["network"]["id"], host["credential"], "unused-private-key")
    states.save(membership)
    return states


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.main", *args]


def test_the_commands_process_runs_only_opted_in_networks(make_controller, tmp_path: Path) -> None:
    ctl = make_controller(extra_env=mock_drivers(tmp_path))
    with ctl.client() as admin:
        create_group(admin, "ops", count=1, allow_commands=True)
        wait_group_state(admin, "ops", "Running")
        token = make_token(admin, "ops")
    host = join(ctl, token, "ops-1").json()
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    # Joined without --allow-commands: the runner refuses to serve it, with a reason.
    refused = _state_dir(ctl, tmp_path / "refused", host, "ops-1", allow=False)
    r = subprocess.run(
        _agent("commands", "--state-dir", str(refused.root)),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 2, r.stderr
    assert "accepts remote commands" in r.stderr and "--allow-commands" in r.stderr

    states = _state_dir(ctl, tmp_path / "state", host, "ops-1", allow=True)
    log = (tmp_path / "runner.log").open("w")
    proc = subprocess.Popen(
        _agent("commands", "--state-dir", str(states.root)),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    try:
        with ctl.client() as admin:

            def queued() -> dict | None:
                r = admin.post(
                    "/v1/groups/ops/commands", json={"command": 'echo "$CLADNET_HOST"; id -u'}
                )
                assert r.status_code == 202, r.text
                run = r.json()
                return run if run["vms"]["ops-1"]["state"] == "pending" else None

            run = wait_until(queued, 30, 0.5, what="the runner's first poll")

            def finished() -> dict | None:
                got = admin.get(f"/v1/groups/ops/commands/{run['id']}").json()
                return got if got["vms"]["ops-1"]["state"] not in ("pending", "running") else None

            result = wait_until(finished, 30, 0.2, what="the command")["vms"]["ops-1"]
        assert result["state"] == "done" and result["exit_code"] == 0, result
        assert result["stdout"] == f"ops-1\n{os.geteuid()}\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_units_run_commands_outside_the_agents_sandbox() -> None:
    """The agent's unit leaves commands alone; the commands unit runs them unsandboxed
    (apt-get writes /usr and needs every capability), and both command lines parse."""
    agent = unit_settings("cladnet-agent.service")
    commands = unit_settings("cladnet-agent-commands.service")
    assert (
        agent["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_NET_BIND_SERVICE"
        and agent["ProtectSystem"] == "strict"
    )
    for key in ("CapabilityBoundingSet", "ProtectSystem", "NoNewPrivileges", "User", "PrivateTmp"):
        assert key not in commands, key
    assert commands["WantedBy"] == "cladnet-agent.service"  # when enabled, with the agent
    assert "cladnet-agent.service" in commands["After"]

    parsed = {}
    for name, unit in (("agent", agent), ("commands", commands)):
        argv = shlex.split(unit["ExecStart"])
        assert argv[0] == "/opt/cladnet/venv/bin/cladnet-agent"
        parsed[name] = agent_main.build_parser().parse_args(argv[1:])
        assert parsed[name].state_dir == "/var/lib/cladnet"
    assert parsed["agent"].func is agent_main.cmd_run and parsed["agent"].no_commands
    assert parsed["commands"].func is agent_main.cmd_commands
    # Not opted in: exit 2, which the unit does not restart on.
    assert commands["RestartPreventExitStatus"] == "2"


@needs_systemd_analyze
def test_commands_unit_verifies(tmp_path: Path) -> None:
    unit = REPO / "deploy" / "systemd" / "cladnet-agent-commands.service"
    ok, text = verify_unit(with_real_binaries(unit, tmp_path))
    assert ok, text


# --- broker users go with their host, network and group ----------------------------------


async def _refused(broker: Mosquitto, creds: dict) -> bool:
    try:
        await publish(broker, creds, creds["topic"], b"after deletion")
    except aiomqtt.MqttError:
        return True
    return False


async def _wait_refused(broker: Mosquitto, creds: dict) -> None:
    deadline = time.monotonic() + 20
    while not await _refused(broker, creds):
        assert time.monotonic() < deadline, "deleted host still publishes"
        await asyncio.sleep(0.2)


async def _connected(broker: Mosquitto, creds: dict) -> aiomqtt.Client:
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        username=creds["username"],
        password=creds["password"],
        protocol=aiomqtt.ProtocolVersion.V5,
    )
    await client.__aenter__()
    return client


async def _kicked(client: aiomqtt.Client, creds: dict) -> bool:
    """True once the broker dropped the session (publishing on it fails)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            await client.publish(creds["topic"], b"still here?", qos=1, timeout=2)
        except aiomqtt.MqttError:
            return True
        await asyncio.sleep(0.2)
    return False


async def test_network_deletion_removes_its_hosts_broker_users(
    metrics_controller: Controller, mosquitto: Mosquitto
) -> None:
    with metrics_controller.client() as admin:
        make_network(admin, "mon", cidr="10.230.0.0/24")
        make_network(admin, "other", cidr="10.231.0.0/24")
    _, creds1 = host_credentials(metrics_controller, "mon", "vm1")
    _, creds2 = host_credentials(metrics_controller, "mon", "vm2")
    _, survivor = host_credentials(metrics_controller, "other", "vm1")
    for creds in (creds1, creds2, survivor):
        await publish(mosquitto, creds, creds["topic"], b"before")
    live = await _connected(mosquitto, creds1)  # an agent that stays connected
    try:
        async with metrics_controller.aclient() as admin:
            r = await admin.delete("/v1/networks/mon", params={"force": "true"})
            assert r.status_code == 200, r.text
        # At once, by the request itself: no new session, and the open one is dropped.
        assert await _refused(mosquitto, creds1) and await _refused(mosquitto, creds2)
        assert await _kicked(live, creds1)
    finally:
        try:
            await live.__aexit__(None, None, None)
        except aiomqtt.MqttError:
            pass
    # Another network's host and the collector are untouched.
    await publish(mosquitto, survivor, survivor["topic"], b"after")
    async with aiomqtt.Client(
        mosquitto.host,
        mosquitto.port,
        username="cladnet-collector",
        password=MQTT_COLLECTOR_PASSWORD,
    ) as collector:
        await collector.subscribe("cladnet/metrics/#", qos=1)


async def test_group_deletion_removes_its_hosts_broker_users(
    make_controller, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    ctl = make_controller(
        extra_env={
            **mock_drivers(tmp_path),
            "CLADNET_MQTT_URL": mosquitto.url,
            "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
        }
    )
    with ctl.client() as admin:
        create_group(admin, "web", count=1)
        wait_group_state(admin, "web", "Running")
    _, creds = host_credentials(ctl, "web", "web-1")
    await publish(mosquitto, creds, creds["topic"], b"before")
    with ctl.client() as admin:
        assert admin.delete("/v1/groups/web").status_code == 202
        wait_until(lambda: admin.get("/v1/groups/web").status_code == 404, 30, what="removal")
    await _wait_refused(mosquitto, creds)


async def test_leftover_broker_users_of_gone_hosts_are_pruned(
    make_controller, mosquitto: Mosquitto
) -> None:
    """Users left behind before this fix (or while the broker was away) go too."""
    from controller.broker import BrokerAdmin

    broker = BrokerAdmin(mosquitto.url, mosquitto.url, "admin", MQTT_ADMIN_PASSWORD)
    orphan = await broker.register("h-00000000deadbeef", "gone", "vm9")  # no such host
    await publish(mosquitto, orphan, orphan["topic"], b"before")
    ctl = make_controller(
        extra_env={
            "CLADNET_MQTT_URL": mosquitto.url,
            "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
            "CLADNET_JANITOR_INTERVAL": "1",
        }
    )
    with ctl.client() as admin:
        make_network(admin, "mon", cidr="10.232.0.0/24")
    _, alive = host_credentials(ctl, "mon", "vm1")
    await _wait_refused(mosquitto, orphan)
    await publish(mosquitto, alive, alive["topic"], b"a live host keeps its user")
    assert "h-00000000deadbeef" not in await broker.host_users()
    async with httpx.AsyncClient(base_url=ctl.url, timeout=10) as anyone:
        text = (await anyone.get("/metrics")).text
    assert "cladnet_controller_broker_users_removed_total 1.0" in text
