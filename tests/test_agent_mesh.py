"""Real agents in network namespaces with wireguard-go, following a real controller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.components import (
    MQTT_ADMIN_PASSWORD,
    Collector,
    Controller,
    Mosquitto,
    free_port,
    wait_until,
)
from tests.netns import Lab, Namespaces, need_root
from tests.test_controller_api import make_network, make_token


@dataclass
class Agent:
    lab: Namespaces
    index: int
    ns: str
    state_dir: Path
    interface: str
    proc: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)
    log_level: str = "debug"  # the benchmarks run at the default, info
    python: str = sys.executable  # the footprint bench: a runtime-only venv

    def start(self, *args: str, token: str | None = None) -> None:
        """Run ``python -m agent.main ARGS``; a join token goes in its environment."""
        log = self.state_dir.parent / f"agent-{self.index}-{len(self.logs)}.log"
        env = {**os.environ, "CLADNET_JOIN_TOKEN": token} if token else None
        self.logs.append(log)
        self.proc = self.lab.popen(
            self.ns,
            [
                self.python,
                "-m",
                "agent.main",
                "--log-level",
                self.log_level,
                *args,
                "--state-dir",
                str(self.state_dir),
                "--backend",
                "userspace",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            env=env,
        )

    def join(self, controller_url: str, token: str, *extra: str) -> None:
        self.start(
            "join",
            "--controller",
            controller_url,
            "--hostname",
            f"vm{self.index}",
            "--interface",
            self.interface,
            *extra,
            token=token,
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def wg_peers(self) -> dict[str, dict[str, str]]:
        """``wg show <if> dump`` parsed: public key → endpoint / allowed ips / handshake."""
        r = self.lab.run(self.ns, "wg", "show", self.interface, "dump", check=False)
        if r.returncode != 0:
            return {}
        peers = {}
        for line in r.stdout.strip().splitlines()[1:]:
            pub, _psk, endpoint, allowed, handshake, rx, _tx, _ka = line.split("\t")
            peers[pub] = {
                "endpoint": endpoint,
                "allowed": allowed,
                "handshake": handshake,
                "rx": rx,
            }
        return peers

    def membership(self) -> dict | None:
        """The saved membership, or None until the join has written it."""
        files = list(self.state_dir.glob("networks/*/membership.json"))
        return json.loads(files[0].read_text()) if files else None

    def overlay_ip(self, timeout: float = 15) -> str:
        """The overlay address, once the join has saved it."""
        return wait_until(
            lambda: (self.membership() or {}).get("me", {}).get("overlay_ip"),
            timeout,
            what=f"{self.ns} to join",
        )

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in self.logs if p.exists())[-4000:]


@pytest.fixture
def lab() -> Iterator[Lab]:
    need_root()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


@pytest.fixture
def mesh_controller(lab: Lab, etcd, tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(
        etcd_url=etcd.url, state_dir=tmp_path / "controller", port=free_port(), host=lab.gateway
    )
    ctl.start()
    try:
        yield ctl
    finally:
        ctl.stop()


@pytest.fixture
def agents(lab: Lab, tmp_path: Path) -> Iterator[list[Agent]]:
    made: list[Agent] = []

    def make(n: int) -> list[Agent]:
        """Ensure hosts 1..n exist; return all of them."""
        for i in range(len(made) + 1, n + 1):
            ns = lab.add_host(i)
            made.append(Agent(lab, i, ns, tmp_path / f"agent{i}", f"cl-{lab.tag}w{i}"))
        return list(made)

    yield make  # type: ignore[misc]
    for a in made:
        a.stop(signal.SIGKILL)
    # Deleting the namespaces (lab fixture) deletes the tun devices, and wireguard-go
    # exits when its device goes; only its socket file may be left behind.
    for a in made:
        Path(f"/var/run/wireguard/{a.interface}.sock").unlink(missing_ok=True)


def _setup(mesh_controller: Controller, agents, n: int, **net) -> tuple[list[Agent], str]:
    with mesh_controller.client() as admin:
        make_network(admin, "mesh", cidr="10.213.0.0/24", keepalive=5, **net)
        token = make_token(admin, "mesh")
    hosts = agents(n)
    for a in hosts:
        a.join(mesh_controller.url, token)
    return hosts, token


def _full_mesh(hosts: list[Agent], timeout: float = 20) -> None:
    ips = {a.index: a.overlay_ip() for a in hosts}
    for a in hosts:
        wait_until(
            lambda a=a: len(a.wg_peers()) == len(hosts) - 1, timeout, what=f"peers on vm{a.index}"
        )
    for a in hosts:
        for b in hosts:
            if a is not b:
                assert wait_until(
                    lambda a=a, b=b: a.lab.ping(a.ns, ips[b.index]),
                    timeout,
                    what=f"ping vm{a.index} -> vm{b.index}",
                ), a.log_text()


def test_agents_build_a_full_mesh_and_follow_changes(mesh_controller, agents, lab) -> None:
    hosts, token = _setup(mesh_controller, agents, 3)
    _full_mesh(hosts)
    # Same site (same underlay subnet and observed address): private endpoints are used.
    peers = hosts[0].wg_peers()
    assert all(p["endpoint"].startswith(f"{lab.subnet_prefix}.") for p in peers.values()), peers

    # A fourth host joins: the others add exactly one peer; existing sessions stay.
    before = {pub: p["handshake"] for pub, p in hosts[0].wg_peers().items()}
    new = agents(4)[-1]
    new.join(mesh_controller.url, token)
    _full_mesh([*hosts, new])
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
    hosts, _ = _setup(mesh_controller, agents, 2)
    _full_mesh(hosts)
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
    hosts, _ = _setup(mesh_controller, agents, 2)
    _full_mesh(hosts)
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
    _full_mesh([a, b, c], timeout=40)


def test_join_with_a_bad_token_prints_one_line(mesh_controller, agents, lab) -> None:
    a = agents(1)[0]
    r = subprocess.run(
        ["ip", "netns", "exec", a.ns, sys.executable, "-m", "agent.main", "join",
         "--controller", mesh_controller.url, "--state-dir", str(a.state_dir)],
        env={**os.environ, "CLADNET_JOIN_TOKEN": "clj_nope.nope"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
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
        _full_mesh(hosts)

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
