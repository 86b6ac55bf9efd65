"""Real agents in network namespaces with wireguard-go, following a real controller."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lab.agents import full_mesh, setup_mesh
from lab.api import make_network, make_token
from lab.components import (
    MQTT_ADMIN_PASSWORD,
    Collector,
    Controller,
    Mosquitto,
    free_port,
    wait_until,
)


def test_agents_build_a_full_mesh_and_follow_changes(mesh_controller, agents, lab) -> None:
    hosts, token = setup_mesh(mesh_controller, agents, 3)
    full_mesh(hosts)
    # Same site (same underlay subnet and observed address): private endpoints are used.
    peers = hosts[0].wg_peers()
    assert all(p["endpoint"].startswith(f"{lab.subnet_prefix}.") for p in peers.values()), peers

    # A fourth host joins: the others add exactly one peer; existing sessions stay.
    before = {pub: p["handshake"] for pub, p in hosts[0].wg_peers().items()}
    new = agents(4)[-1]
    new.join(mesh_controller.url, token)
    full_mesh([*hosts, new])
    after = hosts[0].wg_peers()
    for pub, handshake in before.items():
        assert after[pub]["handshake"] == handshake or int(after[pub]["handshake"]) >= int(
            handshake
        )

    # It leaves: its peer disappears everywhere, its interface goes, its IP is released.
    ip = new.overlay_ip()
    new.stop()
    r = new.lab.run(
        new.ns,
        sys.executable,
        "-m",
        "agent.main",
        "leave",
        "--state-dir",
        str(new.state_dir),
        "--backend",
        "userspace",
        check=False,
    )
    assert r.returncode == 0, r.stderr
    for a in hosts:
        wait_until(lambda a=a: len(a.wg_peers()) == 2, what=f"vm{a.index} to drop the leaver")
    assert new.lab.run(new.ns, "ip", "link", "show", new.interface, check=False).returncode != 0
    with mesh_controller.client() as admin:
        assert ip not in [
            p["overlay_ip"] for p in admin.get("/v1/networks/mesh/peers").json()["peers"]
        ]


def test_underlay_address_change_recovers_without_restarts(mesh_controller, agents, lab) -> None:
    hosts, _ = setup_mesh(mesh_controller, agents, 2)
    full_mesh(hosts)
    a, b = hosts
    ip_a = a.overlay_ip()
    # vm2's address changes (suspend/resume in a cloud): nobody is restarted.
    old, new = lab.address(2), lab.address(2, generation=1)
    # (Deleting the old primary address first: deleting it second would take the
    # new, secondary one with it.)
    lab.run(b.ns, "ip", "addr", "del", f"{old}/24", "dev", "eth0")
    lab.run(b.ns, "ip", "addr", "add", f"{new}/24", "dev", "eth0")
    started = time.monotonic()
    wait_until(
        lambda: any(p["endpoint"].startswith(new + ":") for p in a.wg_peers().values()),
        30,
        what="vm1 to learn vm2's new endpoint",
    )
    assert wait_until(lambda: lab.ping(b.ns, ip_a), 30, what="ping after the move"), b.log_text()
    recovered = time.monotonic() - started
    print(f"recovered {recovered:.2f}s after the address change")

    def vm2_moved() -> dict | None:
        with mesh_controller.client() as admin:
            hosts = admin.get("/v1/networks/mesh/hosts").json()
        host = next(h for h in hosts if h["name"] == "vm2")
        return host if f"{new}/24" in host["addresses"] else None

    # The controller's record follows (the last heartbeat may still be on its way).
    host = wait_until(vm2_moved, 10, what="the controller to see vm2's new address")
    assert host["public_address"] == new and host["public_address_changed_at"] is not None


def test_restart_restores_tunnels_while_controller_is_down(mesh_controller, agents, lab) -> None:
    hosts, _ = setup_mesh(mesh_controller, agents, 2)
    full_mesh(hosts)
    a, b = hosts
    ip_b = b.overlay_ip()
    # The controller goes away: tunnels stay up.
    mesh_controller.stop()
    assert lab.ping(a.ns, ip_b, count=3)
    # The agent restarts (its device is removed too, as after a reboot) …
    a.stop()
    lab.run(a.ns, "ip", "link", "del", a.interface, check=False)
    a.start("run")
    # … and restores the mesh from its saved state, with no controller.
    assert wait_until(lambda: lab.ping(a.ns, ip_b), 30, what="restored tunnel"), a.log_text()
    # The controller returns and the agent resyncs (a change made now reaches it).
    mesh_controller.start()
    with mesh_controller.client() as admin:
        token = make_token(admin, "mesh")
    c = agents(3)[-1]
    c.join(mesh_controller.url, token)
    full_mesh([a, b, c], timeout=40)


def test_join_with_a_bad_token_prints_one_line(mesh_controller, agents, lab) -> None:
    a = agents(1)[0]
    r = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            a.ns,
            sys.executable,
            "-m",
            "agent.main",
            "join",
            "--controller",
            mesh_controller.url,
            "--state-dir",
            str(a.state_dir),
        ],
        env={**os.environ, "CLADNET_JOIN_TOKEN": "clj_nope.nope"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "invalid_token" in r.stderr, r.stderr
    assert not (a.state_dir / "networks").exists()


def test_agents_push_host_and_overlay_metrics(lab, etcd, agents, tmp_path: Path) -> None:
    """Real agents → Mosquitto (per-host users) → collector: the latency matrix fills."""
    broker = Mosquitto(data_dir=tmp_path / "mosquitto", port=free_port(), host=lab.gateway)
    broker.start()
    ctl = Controller(
        etcd_url=etcd.url,
        state_dir=tmp_path / "controller",
        port=free_port(),
        host=lab.gateway,
        extra_env={
            "CLADNET_MQTT_URL": broker.url,
            "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
        },
    )
    collector = Collector(broker, tmp_path / "collector", free_port())
    try:
        ctl.start()
        collector.start()
        with ctl.client() as admin:
            make_network(admin, "mesh", cidr="10.214.0.0/24", metrics_interval=1)
            token = make_token(admin, "mesh")
        hosts = agents(3)
        for a in hosts:
            a.join(ctl.url, token)
        full_mesh(hosts)

        def matrix() -> dict | None:
            with collector.client() as c:
                m = c.get("/v1/networks/mesh/latency").json()["matrix"]
            pairs = [(a, b) for a in m for b in m[a]]
            return m if len(pairs) == 6 else None

        m = wait_until(matrix, 40, what="a full latency matrix")
        assert set(m) == {"vm1", "vm2", "vm3"}
        assert all(0 < rtt < 1 for row in m.values() for rtt in row.values()), m  # seconds
        with collector.client() as c:
            vm1 = c.get("/v1/metrics/latest", params={"host": "vm1"}).json()["hosts"]["vm1"]
            stats = c.get("/v1/ingest").json()
        assert vm1["up"] and 'wireguard_peer_handshake_age_seconds{peer="vm2"}' in vm1["metrics"]
        assert stats["counters"].get("rejected", 0) == 0

        # Per-pair health (what `cladnet status` shows) comes from the collector.
        def reported() -> dict | None:
            with collector.client() as c:
                hs = c.get("/v1/networks/mesh/pairs").json()["hosts"]
            complete = len(hs) == 3 and all(
                len(h["peers"]) == 2
                and all(p["handshake_age_s"] is not None for p in h["peers"].values())
                for h in hs.values()
            )
            return hs if complete else None

        for h in wait_until(reported, 45, what="pair health with handshakes").values():
            assert all(p["latency_ms"] is None or p["latency_ms"] > 0 for p in h["peers"].values())
    finally:
        collector.stop()
        ctl.stop()
        broker.stop()
