"""Real agents in network namespaces (wireguard-go), following a real controller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.state import StateDir
from lab.api import make_network, make_token
from lab.components import Controller, wait_until
from lab.netns import Namespaces


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
        """The saved membership (snapshot and journal, as a restart would read them),
        or None until the join has written it."""
        state = StateDir(self.state_dir)
        ids = state.network_ids()
        return asdict(state.membership(ids[0])) if ids else None

    def overlay_ip(self, timeout: float = 15) -> str:
        """The overlay address, once the join has saved it."""
        return wait_until(
            lambda: (self.membership() or {}).get("me", {}).get("overlay_ip"),
            timeout,
            what=f"{self.ns} to join",
        )

    def log_text(self) -> str:
        return "\n".join(p.read_text() for p in self.logs if p.exists())[-4000:]


def setup_mesh(mesh_controller: Controller, agents, n: int, **net) -> tuple[list[Agent], str]:
    with mesh_controller.client() as admin:
        make_network(admin, "mesh", cidr="10.213.0.0/24", keepalive=5, **net)
        token = make_token(admin, "mesh")
    hosts = agents(n)
    for a in hosts:
        a.join(mesh_controller.url, token)
    return hosts, token


def full_mesh(hosts: list[Agent], timeout: float = 20) -> None:
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
