"""The ``local`` driver end to end, as root: a group of VMs over three clouds (two with
the same private subnet) made by a real controller, full mesh over real wireguard-go,
suspend/resume with a new public address, partial states, and nothing left after."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.drivers.local import Driver
from lab.components import Controller, free_port, wait_until
from lab.groups import wait_group_state
from lab.netns import sh
from tests.support import need_root

CLOUDS = {
    "a": {"regions": {"a-west": "192.168.1.0/24"}},
    "b": {"regions": {"b-east": "192.168.1.0/24"}},
    "c": {"regions": {"c-north": "10.77.0.0/24"}},
}


def _free_internet() -> str:
    used = sh("ip", "-4", "-o", "addr", "show").stdout
    second = next(n for n in range(20, 32) if f" 172.{n}." not in used)
    return f"172.{second}"


@pytest.fixture
def local_cloud(etcd, tmp_path: Path) -> Iterator[tuple[Driver, Controller]]:
    need_root()
    inet = _free_internet()
    clouds = {
        name: {**spec, "public": f"{inet}.{i + 1}.0/24"}
        for i, (name, spec) in enumerate(CLOUDS.items())
    }
    options = {"state_dir": str(tmp_path / "cloud"), "clouds": clouds, "internet": f"{inet}.0.0/16"}
    driver = Driver(**options)  # type: ignore[arg-type]
    (tmp_path / "drivers.json").write_text(json.dumps({"local": options}))
    asyncio.run(driver.prepare())
    port = free_port()
    ctl = Controller(
        etcd_url=etcd.url,
        state_dir=tmp_path / "controller",
        port=port,
        host=driver.gateway,
        extra_env={
            "CLADNET_DRIVERS": str(tmp_path / "drivers.json"),
            "CLADNET_ADVERTISE_URL": f"http://{driver.gateway}:{port}",
        },
    )
    try:
        ctl.start()
        yield driver, ctl
    finally:
        ctl.stop()
        asyncio.run(driver.teardown())


def _group(admin, name: str) -> dict:
    return admin.get(f"/v1/groups/{name}").json()


def _ping(namespace: str, address: str) -> bool:
    r = subprocess.run(
        ["ip", "netns", "exec", namespace, "ping", "-c1", "-W1", address],
        capture_output=True,
        timeout=10,
    )
    return r.returncode == 0


def _full_mesh(admin, name: str, timeout: float = 60) -> dict:
    def joined() -> dict | None:
        group = _group(admin, name)
        return group if all(vm["overlay_ip"] for vm in group["vms"]) else None

    group = wait_until(joined, timeout, what="overlay addresses")
    for a in group["vms"]:
        for b in group["vms"]:
            if a is not b:
                wait_until(
                    lambda a=a, b=b: _ping(a["details"]["namespace"], b["overlay_ip"]),
                    timeout,
                    interval=0.2,
                    what=f"{a['name']} -> {b['name']}",
                )
    return group


def _exec(ctl: Controller, group: str, command: str) -> dict:
    """``cladnet group exec --json`` against the controller (exit 1: a VM exited non-zero)."""
    env = {**os.environ, "CLADNET_CONTROLLER": ctl.url, "CLADNET_TOKEN": ctl.admin_token or ""}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cladnet.cli",
            "group",
            "exec",
            group,
            command,
            "--json",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=200,
    )
    assert r.returncode == 1, r.stderr
    return json.loads(r.stdout)


def _ours(driver: Driver) -> dict[str, list[str]]:
    """Everything on this machine carrying the driver's tag."""
    netns = [
        n for n in sh("ip", "netns", "list").stdout.split() if n.startswith(f"cl-{driver.tag}")
    ]
    links = [
        line.split(":")[1].strip().split("@")[0]
        for line in sh("ip", "-o", "link", "show").stdout.splitlines()
        if f"cl{driver.tag}" in line
    ]
    procs = [
        line for line in sh("ps", "-eo", "args").stdout.splitlines() if f"cl{driver.tag}g" in line
    ]
    return {"netns": netns, "links": links, "procs": procs}


def test_group_over_three_clouds_meshes_survives_suspend_and_leaves_nothing(local_cloud) -> None:
    driver, ctl = local_cloud
    members = [
        {"driver": "local", "region": r, "count": 2} for r in ("a-west", "b-east", "c-north")
    ]
    with ctl.client() as admin:
        body = {"name": "demo", "members": members, "keepalive": 2, "allow_commands": True}
        r = admin.post("/v1/groups", json=body)
        assert r.status_code == 202, r.text
        group = wait_group_state(admin, "demo", "Running", 60)
        # Clouds a and b hand out the same private addresses: that is the point.
        private = {
            r: {vm["private_ip"] for vm in group["vms"] if vm["region"] == r}
            for r in ("a-west", "b-east")
        }
        assert private["a-west"] == private["b-east"] == {"192.168.1.10", "192.168.1.11"}
        publics = {vm["public_ip"] for vm in group["vms"]}
        assert len(publics) == 6
        group = _full_mesh(admin, "demo")

        # Every VM's agent names every VM, in the VM's own hosts file (never this machine's).
        ips = {vm["overlay_ip"] for vm in group["vms"]}

        def named(vm: dict) -> set[str]:
            hosts = driver._vm_dir(vm["name"]) / "hosts"
            text = hosts.read_text() if hosts.exists() else ""
            return {line.split()[0] for line in text.splitlines() if ".cladnet.internal" in line}

        for vm in group["vms"]:
            wait_until(lambda vm=vm: named(vm) == ips, 30, what=f"names on {vm['name']}")

        # A command on every VM through the real agents (the group accepts commands).
        run = _exec(ctl, "demo", "ip -4 -o addr show dev eth0; exit 3")
        assert set(run["vms"]) == {vm["name"] for vm in group["vms"]}
        for vm in group["vms"]:
            result = run["vms"][vm["name"]]
            assert result["state"] == "done" and result["exit_code"] == 3, result
            assert f" {vm['private_ip']}/24" in result["stdout"]

        victim = group["vms"][0]
        r = admin.post("/v1/groups/demo/vms/demo-1/actions", json={"action": "suspend"})
        assert r.status_code == 202
        group = wait_group_state(admin, "demo", "Partial-Suspended", 60)
        assert group["counts"] == {"Running": 5, "Suspended": 1}
        assert not _ping(group["vms"][1]["details"]["namespace"], victim["overlay_ip"])

        admin.post("/v1/groups/demo/vms/demo-1/actions", json={"action": "resume"})
        group = wait_group_state(admin, "demo", "Running", 60)
        resumed = group["vms"][0]
        assert resumed["public_ip"] and resumed["public_ip"] != victim["public_ip"]
        started = time.monotonic()
        _full_mesh(admin, "demo")
        print(f"mesh back {time.monotonic() - started:.1f}s after resume")

        assert _ours(driver)["netns"]  # VMs and routers exist while the group does
        assert admin.delete("/v1/groups/demo").status_code == 202
        wait_until(lambda: admin.get("/v1/groups/demo").status_code == 404, 60, what="removal")
    assert _ours(driver) == {"netns": [], "links": [f"cl{driver.tag}net"], "procs": []}
    asyncio.run(driver.teardown())
    assert _ours(driver) == {"netns": [], "links": [], "procs": []}


def test_driver_refuses_bad_config_with_a_clear_message(tmp_path: Path) -> None:
    from controller.drivers.base import DriverError

    with pytest.raises(DriverError, match="not inside"):
        Driver(state_dir=str(tmp_path), clouds={"a": {"public": "10.0.0.0/24", "regions": {}}})
    with pytest.raises(DriverError, match="two clouds"):
        Driver(
            state_dir=str(tmp_path),
            clouds={
                "a": {"public": "172.29.1.0/24", "regions": {"r": "192.168.1.0/24"}},
                "b": {"public": "172.29.2.0/24", "regions": {"r": "192.168.2.0/24"}},
            },
        )
