"""Remote commands on a group: a real controller and etcd (``mock`` driver VMs), hosts
joined with real join tokens, and the agent daemon's command loop run in-process
against the controller's HTTP API with each host's own credential."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.commands import OUTPUT_LIMIT, run_shell
from agent.daemon import NetworkAgent, Timing
from agent.main import build_parser
from agent.state import Membership, StateDir
from lab.api import join, make_token
from lab.components import Controller
from lab.groups import create_group, mock_drivers, wait_group_state


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is dead too (its parent has not reaped it yet).
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    return True


@contextlib.asynccontextmanager
async def _agents(ctl: Controller, hosts: list[dict]) -> AsyncIterator[None]:
    """The command loop of each host's agent: the daemon's own, minus the mesh."""
    agents, tasks = [], []
    for host in hosts:
        membership = Membership(
            controller=ctl.url,
            host_id=host["host_id"],
            interface="cl-web",
            network=host["network"],
            me={"name": host["name"], "overlay_ip": host["overlay_ip"]},
            allow_commands=True,
        )
        # No device is touched by the command loop: no WireGuard backend needed.
        agent = NetworkAgent(
            StateDir(Path("/nonexistent")),
            membership,
            host["credential"],
            "unused",
            backend=None,  # type: ignore[arg-type]
            timing=Timing(commands=0.1),
        )
        agents.append(agent)
        await agent.client.pending_commands(host["host_id"])  # the first poll: "I accept"
        tasks.append(asyncio.create_task(agent.commands_loop()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for agent in agents:
            await agent.client.close()


async def _finished(admin: httpx.AsyncClient, group: str, cid: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        run = (await admin.get(f"/v1/groups/{group}/commands/{cid}")).json()
        if all(vm["state"] not in ("pending", "running") for vm in run["vms"].values()):
            return run
        await asyncio.sleep(0.1)
    raise AssertionError(f"command {cid} still running: {run}")


def _group_with_hosts(ctl: Controller, count: int) -> list[dict]:
    """A running group ``web`` whose VMs joined its network under their names."""
    with ctl.client() as admin:
        create_group(admin, "web", count=count, allow_commands=True)
        wait_group_state(admin, "web", "Running")
        token = make_token(admin, "web")
    hosts = []
    for i in range(1, count + 1):
        r = join(ctl, token, f"web-{i}")
        assert r.status_code == 200, r.text
        hosts.append({**r.json(), "name": f"web-{i}"})
    return hosts


async def test_command_runs_on_every_accepting_vm_and_is_audited(
    make_controller, tmp_path: Path
) -> None:
    ctl = make_controller(extra_env=mock_drivers(tmp_path))
    web1, web2, _web3 = _group_with_hosts(ctl, 3)
    command = 'echo "$CLADNET_HOST says hi"; echo "o""ops" >&2; exit 3'
    async with ctl.aclient() as admin, _agents(ctl, [web1, web2]):  # web-3: no opt-in
        r = await admin.post("/v1/groups/web/commands", json={"command": command, "timeout": 10})
        assert r.status_code == 202, r.text
        queued = r.json()
        assert {n: vm["state"] for n, vm in queued["vms"].items()} == {
            "web-1": "pending",
            "web-2": "pending",
            "web-3": "refused",
        }
        assert queued["vms"]["web-3"]["error"] == "agent does not accept commands"
        run = await _finished(admin, "web", queued["id"])
        for host in (web1, web2):
            vm = run["vms"][host["name"]]
            assert vm["state"] == "done" and vm["exit_code"] == 3, vm
            assert vm["stdout"] == f"{host['name']} says hi\n" and vm["stderr"] == "oops\n"
            assert vm["started_at"] <= vm["finished_at"]
        assert run["vms"]["web-3"]["state"] == "refused"
        assert run["command"] == command and run["by"].startswith("admin")

        # The admin's call is audited with the command; no output reaches the log.
        entries = (await admin.get("/v1/audit")).json()["entries"]
        mine = [e for e in entries if e["path"] == "/v1/groups/web/commands"]
        assert mine and mine[0]["detail"]["command"] == command and mine[0]["status"] == 202
        logged = json.dumps(entries)
        assert "web-1 says hi" not in logged and "oops" not in logged

        # Reports are taken once: a second "done" for a finished command is refused.
        async with ctl.aclient(web1["credential"]) as agent1:
            path = f"/v1/hosts/{web1['host_id']}/commands/{queued['id']}"
            r = await agent1.post(path, json={"state": "done", "exit_code": 0})
            assert r.status_code == 409

            # A host sees and reports its own commands only, not another host's.
            other = f"/v1/hosts/{web2['host_id']}/commands"
            assert (await agent1.get(other)).status_code == 403
            r = await agent1.post(f"{other}/{queued['id']}", json={"state": "running"})
            assert r.status_code == 403
        # Not even the admin fetches or forges an agent's commands.
        assert (await admin.get(f"/v1/hosts/{web1['host_id']}/commands")).status_code == 403

        viewer_token = (await admin.post("/v1/admin-tokens", json={"role": "viewer"})).json()
        async with ctl.aclient(viewer_token["token"]) as viewer:
            r = await viewer.post("/v1/groups/web/commands", json={"command": "true"})
            assert r.status_code == 403
            r = await viewer.get(f"/v1/groups/web/commands/{queued['id']}")
            assert r.status_code == 403
        assert (await admin.get(f"/v1/groups/other/commands/{queued['id']}")).status_code == 404


async def test_timeout_kills_the_whole_process_group(make_controller, tmp_path: Path) -> None:
    ctl = make_controller(extra_env=mock_drivers(tmp_path))
    (web1,) = _group_with_hosts(ctl, 1)
    pids = tmp_path / "pids"
    # The shell and a background child: both must die at the timeout.
    command = f"sleep 60 & echo $$ $! > {pids}; echo started; wait"
    async with ctl.aclient() as admin, _agents(ctl, [web1]):
        began = time.monotonic()
        r = await admin.post("/v1/groups/web/commands", json={"command": command, "timeout": 1})
        assert r.status_code == 202, r.text
        run = await _finished(admin, "web", r.json()["id"])
        assert time.monotonic() - began < 10
    vm = run["vms"]["web-1"]
    assert vm["state"] == "timeout" and vm["exit_code"] is None, vm
    assert vm["stdout"] == "started\n"  # what it wrote before the kill is kept
    for pid in map(int, pids.read_text().split()):
        assert _gone(pid), f"process {pid} survived the timeout"


async def test_output_is_bounded_and_cancel_kills_the_command(tmp_path: Path) -> None:
    report = await run_shell("head -c 300000 /dev/zero | tr '\\0' x; echo err >&2", 10)
    assert report["state"] == "done" and report["exit_code"] == 0
    assert len(report["stdout"]) == OUTPUT_LIMIT and report["truncated"]
    assert report["stderr"] == "err\n"

    # The agent stopping mid-command leaves nothing running.
    pid_file = tmp_path / "pid"
    task = asyncio.create_task(run_shell(f"echo $$ > {pid_file}; sleep 60", 60))
    for _ in range(200):  # the shell writes its pid first thing
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(int(pid_file.read_text()))


def test_allow_commands_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    assert not parser.parse_args(["run"]).allow_commands
    assert parser.parse_args(["run", "--allow-commands"]).allow_commands
    monkeypatch.setenv("CLADNET_ALLOW_COMMANDS", "1")
    assert build_parser().parse_args(["join", "--controller", "c"]).allow_commands
