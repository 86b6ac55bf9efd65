"""A lab with every NAT kind of issue 14, for tests and benchmarks: real agents in
namespaces behind nftables NATs, a public host running an agent and ``cladnet-relay``,
a real controller and etcd.

Hosts (name → kind):

- ``p``, ``q``: public, an address of their own on the internet (``p`` runs the relay);
- ``o1``: behind a 1:1 NAT (masquerade out, everything to the public address DNATed in:
  a cloud VM's "public IP");
- ``e1``: behind plain ``masquerade`` (port-preserving, endpoint-independent mapping),
  its router dropping unsolicited UDP as a NAT gateway does;
- ``s1``: behind ``masquerade fully-random`` (a new port per destination: symmetric);
- ``g1``: behind two stacked NATs with a 100.64.0.0/10 link between them (carrier-grade
  NAT), both plain masquerade dropping unsolicited UDP;
- ``n1``, ``n2``: two hosts behind ONE NAT (plain masquerade) on two subnets of its
  router with no route between them and no hairpinning: a packet from one to the NAT's
  public address ends at the router itself. They listen on different ports (51820,
  51821): with one port the NAT would give the second host another port towards
  destinations the first already uses, which makes its mapping vary per destination.

:func:`udp_probe` checks what a NAT really does (the two-observer probe).
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab.agents import Agent
from lab.api import make_network, make_token
from lab.components import Controller, Etcd, free_port
from lab.multicloud import MultiCloud
from lab.relays import Relay

PUBLIC_P, PUBLIC_Q = 20, 21


@dataclass(frozen=True)
class Spot:
    """Where a lab host sits: its kind, cloud (one letter), index, listen port."""

    kind: str
    cloud: str
    index: int = 1
    port: int = 51820


HOSTS: dict[str, Spot] = {
    "p": Spot("public", "p"),
    "q": Spot("public", "q"),
    "o1": Spot("one_to_one", "o"),
    "e1": Spot("eim", "e"),
    "s1": Spot("symmetric", "s"),
    "g1": Spot("cgnat", "g"),
    "n1": Spot("same_nat", "n", 1, 51820),
    "n2": Spot("same_nat", "n", 2, 51821),
}
# cloud → (private subnet, public host number)
CLOUDS = {
    "o": ("10.31.0", 31),
    "e": ("10.32.0", 32),
    "s": ("10.33.0", 33),
    "g": ("10.34.0", 34),
    "n": ("10.35.1", 35),
}
SECOND_LAN = ("lan2", "10.35.2")  # n2's subnet on the same router as n1's


# One socket, two destinations (ports P and P+1 of the server): the server prints the
# source ip:port each of its two sockets saw. Same port twice: the NAT maps
# independently of the destination.
PROBE_SERVER = textwrap.dedent("""
    import socket, sys
    socks = []
    for port in (int(sys.argv[1]), int(sys.argv[1]) + 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port)); s.settimeout(10); socks.append(s)
    print("ready", flush=True)
    print(" ".join("%s:%d" % s.recvfrom(64)[1] for s in socks), flush=True)
""")
# Three rounds: a datagram lost while the lab's agents start must not fail the probe
# (one socket all along, so every round shows the same mapping).
PROBE_CLIENT = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[3])))
    for _ in range(3):
        for port in (int(sys.argv[2]), int(sys.argv[2]) + 1):
            s.sendto(b"probe", (sys.argv[1], port))
        time.sleep(0.3)
""")
# Bound to a port, sends one datagram to ARGV[1]:ARGV[2] (opening its NAT towards it),
# then prints the source of whatever arrives within ARGV[4] seconds, or "nothing".
LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[3]))); s.settimeout(float(sys.argv[4]))
    s.sendto(b"open", (sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    try:
        print("%s:%d" % s.recvfrom(64)[1], flush=True)
    except TimeoutError:
        print("nothing", flush=True)
""")
SENDER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[3])))
    for _ in range(3):
        s.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
        time.sleep(0.3)
""")


def udp_probe(
    net: MultiCloud, client_ns: str, server_ns: str, server_ip: str, port: int, source: int
) -> tuple[str, str]:
    """The ``ip:port`` the server saw for one client socket (bound to ``source``) sending
    to its ports ``port`` and ``port + 1``: two observers of one NAT mapping."""
    server = net.popen(
        server_ns,
        [sys.executable, "-c", PROBE_SERVER, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        args = [sys.executable, "-c", PROBE_CLIENT, server_ip, str(port), str(source)]
        net.run(client_ns, *args)
        out, _ = server.communicate(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    first, second = out.split()
    return first, second


def reaches(
    net: MultiCloud,
    listener_ns: str,
    opened_to: tuple[str, int],
    port: int,
    sender_ns: str,
    target: tuple[str, int],
    sender_port: int,
) -> str:
    """Whether a datagram from ``sender_ns`` to ``target`` arrives at a socket in
    ``listener_ns`` (bound to ``port``) that first sent to ``opened_to``: the source it
    arrived from, or ``"nothing"`` within 3 s."""
    listener = net.popen(
        listener_ns,
        [sys.executable, "-c", LISTENER, opened_to[0], str(opened_to[1]), str(port), "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        net.run(
            sender_ns,
            sys.executable,
            "-c",
            SENDER,
            target[0],
            str(target[1]),
            str(sender_port),
        )
        out, _ = listener.communicate(timeout=15)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    return out.strip()


@dataclass
class NatLab:
    """etcd, a controller, a relay on ``p``; NATs and hosts on demand (:meth:`add`),
    their agents on :meth:`join`. :meth:`close` removes all of it, also after a failure
    half-way."""

    tmp: Path
    keepalive: int = 2
    log_level: str = "debug"
    net: MultiCloud = field(default_factory=MultiCloud)
    agents: dict[str, Agent] = field(default_factory=dict)
    namespaces: dict[str, str] = field(default_factory=dict)  # host name → namespace
    relay: Relay | None = None
    token: str = ""

    def __post_init__(self) -> None:
        # etcd on our internet address: the relay, in p's namespace, reads it there.
        self.etcd = Etcd.serving(self.tmp / "etcd", host=self.net.gateway)
        self.ctl = Controller(
            etcd_url=self.etcd.url,
            state_dir=self.tmp / "controller",
            port=free_port(),
            host=self.net.gateway,
        )

    def start(self) -> None:
        """etcd, the controller, the network ``nats``, and p's namespace with the relay."""
        self.etcd.start()
        self.ctl.start()
        with self.ctl.client() as admin:
            make_network(admin, "nats", cidr="10.218.0.0/24", keepalive=self.keepalive)
            self.token = make_token(admin, "nats")
        ns = self.add("p")
        self.relay = Relay(self.net, ns, "r1", PUBLIC_P, self.etcd.url, self.tmp / "r1.log")

    def add(self, name: str) -> str:
        """The namespace of host ``name`` (see :data:`HOSTS`), with its NAT built first."""
        if name in self.namespaces:
            return self.namespaces[name]
        spot = HOSTS[name]
        if spot.kind == "public":
            ns = self.net.add_public_host(name, PUBLIC_P if name == "p" else PUBLIC_Q)
        else:
            if spot.cloud not in self.net.clouds:
                self._nat(spot)
            if name == "n2":
                ns = self.net.add_host("n", 2, lan=SECOND_LAN[0], subnet=SECOND_LAN[1])
            else:
                ns = self.net.add_host(spot.cloud, spot.index)
            if spot.kind == "one_to_one":
                self.net.one_to_one(spot.cloud, self.net.host_address(spot.cloud, spot.index))
        self.namespaces[name] = ns
        return ns

    def _nat(self, spot: Spot) -> None:
        subnet, public = CLOUDS[spot.cloud]
        if spot.kind == "cgnat":
            self.net.add_cgnat(spot.cloud, subnet, public)
            return
        nat = "masquerade fully-random" if spot.kind == "symmetric" else "masquerade"
        self.net.add_cloud(spot.cloud, subnet, public, nat=nat)
        if spot.kind in ("eim", "same_nat"):
            self.net.drop_unsolicited(spot.cloud)
        if spot.kind == "same_nat":
            self.net.add_lan(spot.cloud, *SECOND_LAN)

    def join(self, name: str) -> Agent:
        """Start ``cladnet-agent join`` on host ``name`` (added first if need be)."""
        ns = self.namespaces.get(name) or self.add(name)
        agent = Agent(
            self.net,
            len(self.agents) + 1,
            ns,
            self.tmp / f"agent-{name}",
            f"cl-{self.net.tag}{name}",
            log_level=self.log_level,
        )
        self.agents[name] = agent
        agent.start(
            "join",
            "--controller",
            self.ctl.url,
            "--hostname",
            name,
            "--interface",
            agent.interface,
            "--listen-port",
            str(HOSTS[name].port),
            token=self.token,
        )
        return agent

    def public_ip(self, name: str) -> str:
        """The address the internet sees host ``name`` at (its NAT's, or its own)."""
        spot = HOSTS[name]
        if spot.kind == "public":
            return f"{self.net.inet}.{PUBLIC_P if name == 'p' else PUBLIC_Q}"
        return self.net.clouds[spot.cloud].public

    def paths(self, name: str) -> dict[str, str]:
        """The agent's own view: peer name → path (``cladnet-agent status``)."""
        agent = self.agents[name]
        shown = self.net.run(
            agent.ns,
            sys.executable,
            "-m",
            "agent.main",
            "status",
            "--state-dir",
            str(agent.state_dir),
            check=False,
        ).stdout
        try:
            return dict(json.loads(shown)[0]["paths"])
        except (ValueError, LookupError, TypeError):
            return {}

    def hosts(self) -> dict[str, dict]:
        """The controller's host records by name."""
        with self.ctl.client() as admin:
            return {h["name"]: h for h in admin.get("/v1/networks/nats/hosts").json()}

    def ping_all(self, name: str, others: list[str], started: float, limit: float) -> dict:
        """Seconds from ``started`` to the first reply from each of ``others`` (pinged
        from ``name`` in parallel, one try per 0.2 s each); None for those that never
        answered within ``limit``."""
        src = self.agents[name]
        ips = {o: self.agents[o].overlay_ip(30) for o in others}

        def first(other: str) -> float | None:
            while time.monotonic() - started < limit:
                if self.net.ping(src.ns, ips[other], wait=0.2):
                    return time.monotonic() - started
                time.sleep(0.02)
            return None

        if not others:
            return {}
        with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:
            return dict(zip(others, pool.map(first, others), strict=True))

    def close(self) -> None:
        """Stop agents, relay, controller and etcd; remove every namespace and link."""
        for agent in self.agents.values():
            agent.stop(signal.SIGKILL)
        if self.relay is not None:
            self.relay.stop()
        self.ctl.stop()
        self.etcd.stop()
        # The agents' wireguard-go runs in a session of its own: stop ours, by PID.
        devices = {a.interface for a in self.agents.values()}
        for pid, interface in _wireguard_go().items():
            if interface in devices:
                subprocess.run(["kill", str(pid)], check=False)
        self.net.cleanup()
        for agent in self.agents.values():
            Path(f"/var/run/wireguard/{agent.interface}.sock").unlink(missing_ok=True)


def _wireguard_go() -> dict[int, str]:
    """Running wireguard-go processes: PID → interface (their last argument)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = [c.decode(errors="replace") for c in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        cmd = [c for c in cmd if c]
        if len(cmd) > 1 and Path(cmd[0]).name == "wireguard-go":
            found[int(proc.name)] = cmd[-1]
    return found
