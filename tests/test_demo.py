"""``cladnet demo`` end to end as root: up (services, three clouds, six VMs, full mesh),
status, suspend/resume with a new public address, idempotent up, and down leaving
nothing behind. It uses the demo's fixed ports, so it skips if they are taken."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cladnet.cli import config as cli_config
from cladnet.cli import demo
from lab.components import REPO, wait_until
from lab.netns import sh
from tests.markdown import sh_blocks
from tests.support import need_root

CLI = [sys.executable, "-m", "cladnet.cli"]


def _cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _left(tag: str) -> dict[str, list[str]]:
    netns = [n for n in sh("ip", "netns", "list").stdout.split() if n.startswith(f"cl-{tag}")]
    links = [line for line in sh("ip", "-o", "link").stdout.splitlines() if f"cl{tag}" in line]
    return {"netns": netns, "links": links}


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init to reap it."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


@pytest.fixture
def demo_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    need_root()
    ports = (
        demo.ETCD_PORT,
        demo.MQTT_PORT,
        demo.MQTT_ADMIN_PORT,
        demo.COLLECTOR_PORT,
        demo.CONTROLLER_PORT,
    )
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use (a demo running?): the demo's ports are fixed")
    env = {
        **os.environ,
        "CLADNET_DEMO_DIR": str(tmp_path / "demo"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    try:
        yield env
    finally:
        _cli(env, "demo", "down", check=False)


def test_demo_up_status_suspend_resume_down(demo_env: dict[str, str], tmp_path: Path) -> None:
    r = _cli(demo_env, "demo", "up")
    assert "overlay ping" in r.stdout and "dashboard:" in r.stdout
    state = json.loads((tmp_path / "demo" / "demo.json").read_text())
    tag = demo.Demo(tmp_path / "demo").driver().tag
    # The VMs reach the controller over TLS; the CLI context pins the cluster CA.
    assert state["controller"].startswith("https://")
    config = (tmp_path / "config" / "cladnet" / "config.toml").read_text()
    assert "BEGIN CERTIFICATE" in config

    status = json.loads(_cli(demo_env, "demo", "status", "--json").stdout)
    assert status["group"]["state"] == "Running" and len(status["group"]["vms"]) == 6
    assert len(status["pairs"]) == 30 and all(p["ok"] for p in status["pairs"])
    clouds = {vm["details"]["cloud"] for vm in status["group"]["vms"]}
    assert clouds == {"a", "b", "c"}
    # The demo wrote a CLI context: plain `cladnet status` works and is healthy, and
    # every VM's metrics reach the collector through the broker (over the clouds' NAT).
    assert _cli(demo_env, "status", "--json").returncode == 0
    wait_until(
        lambda: len(json.loads(_cli(demo_env, "metrics", "top", "demo", "--json").stdout)) == 6,
        60,
        interval=1,
        what="metrics from the six VMs",
    )
    # The dashboard's monitoring: through the controller (its origin, its TLS, the
    # admin token), never the collector's loopback address.
    monkey = pytest.MonkeyPatch()
    monkey.setenv("XDG_CONFIG_HOME", demo_env["XDG_CONFIG_HOME"])
    try:
        ctx = cli_config.resolve()
    finally:
        monkey.undo()
    tls = ssl.create_default_context(cadata=ctx.ca_pem)
    with httpx.Client(base_url=state["controller"], verify=tls, timeout=15) as c:
        r = c.get(
            "/v1/monitoring/metrics/latest",
            params={"network": "demo"},
            headers={"Authorization": f"Bearer {state['secrets']['admin']}"},
        )
    assert r.status_code == 200 and len(r.json()["hosts"]) == 6, r.text

    # The README's walk-through continues the quick start: every block, in order, as written.
    script = "\n".join(sh_blocks(REPO / "README.md", "Walk-through"))
    venv = Path(sys.executable).parent
    walk = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(".venv/bin/", f"{venv}/")],
        cwd=REPO,
        env=demo_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert walk.returncode == 0, walk.stdout[-3000:] + walk.stderr[-3000:]
    assert "vm1 10." in walk.stdout and "prod" in walk.stdout  # the joined host, the network

    before = next(vm for vm in status["group"]["vms"] if vm["name"] == "demo-2")
    _cli(demo_env, "demo", "suspend", "demo-2")
    r = _cli(demo_env, "demo", "status", "--json", check=False)
    assert r.returncode == 3  # not every pair answers
    assert json.loads(r.stdout)["group"]["state"] == "Partial-Suspended"
    _cli(demo_env, "demo", "resume", "demo-2")
    vms = json.loads(_cli(demo_env, "demo", "status", "--json", check=False).stdout)["group"]
    after = next(vm for vm in vms["vms"] if vm["name"] == "demo-2")
    assert after["public_ip"] != before["public_ip"]
    wait_until(
        lambda: _cli(demo_env, "demo", "status", check=False).returncode == 0,
        60,
        interval=1,
        what="the mesh after resume",
    )

    _cli(demo_env, "demo", "up")  # idempotent: the same services, the same group
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["pids"] == state["pids"]

    _cli(demo_env, "demo", "down")
    assert _left(tag) == {"netns": [], "links": []}
    assert not (tmp_path / "demo").exists()
    for pid in state["pids"].values():
        assert _gone(pid), pid
