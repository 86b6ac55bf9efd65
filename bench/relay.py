#!/usr/bin/env python3
"""Relay throughput and failover: TCP over a WireGuard tunnel relayed by
``cladnet-relay``'s pair forwarder (kernel flows, and Python only) against the same
tunnel direct, between the same two namespaces in the same run; then the time from
killing a relay to pings across its pair again, with real agents, relays and NATs
(root; wireguard-go; iperf3; etcd).

    python -m bench.relay            # 3 rounds, 5 s iperf3 runs, 1 and 4 streams; 3 kills
    python -m bench.relay --smoke    # 1 round, 1 s runs; 1 kill

Throughput: three namespaces on one bridge (tests/netns.Lab): A, B and R. Three
hand-configured wireguard-go tunnels between A and B (MTU 1420, the network default):
"direct" (each end's endpoint is the other's underlay address), "relayed" (through R's
pair forwarder with its kernel flows, what ``cladnet-relay --kernel auto`` does as root)
and "relayed_python" (another pair forwarder on other ports, Python only: ``--kernel
off``). Each relay runs in a session of its own like any daemon. iperf3 from A to B over
each, alternating the order every round; figures are medians; each relay process's CPU
seconds over its runs give CPU per Gbit (the kernel's forwarding work is softirq time,
not the relay's: the kernel variant's figure is the Python side only).

Failover: two clouds behind ``masquerade fully-random`` NATs with one agent each (the
pair must be relayed), two relays (``--ttl 3``) on internet hosts, the network's default
keepalive (25 s). The relay serving the pair is killed (SIGKILL: no lease revoke), and
a1 pings b1 every 0.2 s until a reply: that time is the failover. The killed relay is
started again between rounds. Targets (0.8 of direct, failover under 5 s) are reported,
not asserted.

One JSON object on stdout, then a one-line summary; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.common import clean_up_on_sigterm, cpu_seconds, machine_facts
from bench.dataplane import _daemon, _first_ping, _iperf, _uapi_answers, _wait
from cladnet.keys import generate_keypair
from cladnet.mesh import DEFAULT_MTU
from lab.netns import Lab, Namespaces

TARGET_RELAYED_VS_DIRECT = 0.8
TARGET_FAILOVER_S = 5.0
STREAMS = (1, 4)
RELAY_PORTS = {"relayed": (40000, 40001), "relayed_python": (40002, 40003)}
IPERF_PORT = 5201

# The relay's forwarder for one pair, with no etcd: what ``cladnet-relay`` runs per pair;
# "kernel": its flows synced each second as the relay's pass does.
RELAY_SCRIPT = textwrap.dedent("""
    import asyncio, signal, sys
    from agent.relay import PairForwarder, Side
    from agent.relay_kernel import KernelFlows

    async def main():
        ports = (int(sys.argv[1]), int(sys.argv[2]))
        pair = PairForwarder((Side("a", None), Side("b", None)), lambda side, addr: None)
        await pair.open("0.0.0.0", ports)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        kernel = KernelFlows(f"bench{ports[0]}", ports, None) if sys.argv[3] == "kernel" else None
        if kernel:
            await kernel.start()
        while not stop.is_set():
            if kernel:
                await kernel.sync({ports: pair})
            try:
                await asyncio.wait_for(stop.wait(), 1)
            except TimeoutError:
                pass
        if kernel:
            await kernel.stop()

    asyncio.run(main())
""")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tunnel(
    lab: Lab,
    ends: dict[str, str],
    name: str,
    net: str,
    port: int,
    endpoints: dict[str, str],
    tmp: Path,
    procs: list[subprocess.Popen[bytes]],
) -> str:
    """A wireguard-go tunnel between the two namespaces of ``ends``; ``endpoints`` says
    where each sends; returns the B end's tunnel address."""
    a, b = ends
    keys = {ns: generate_keypair() for ns in ends}
    tunnel = {a: f"{net}.1", b: f"{net}.2"}
    for ns, other in ((a, b), (b, a)):
        dev = f"cl-{lab.tag}{name}{'a' if ns == a else 'b'}"
        procs.append(_daemon(lab, ns, ["wireguard-go", "-f", dev], tmp / f"{dev}.log"))
        _wait(f"wireguard-go {dev}", lambda dev=dev: _uapi_answers(dev))
        key_file = tmp / f"{dev}.key"
        key_file.write_text(keys[ns][0])
        key_file.chmod(0o600)
        lab.run(
            ns,
            "wg",
            "set",
            dev,
            "listen-port",
            str(port),
            "private-key",
            str(key_file),
            "peer",
            keys[other][1],
            "allowed-ips",
            f"{tunnel[other]}/32",
            "endpoint",
            endpoints[ns],
            "persistent-keepalive",
            "5",
        )
        lab.run(ns, "ip", "addr", "add", f"{tunnel[ns]}/24", "dev", dev)
        lab.run(ns, "ip", "link", "set", dev, "mtu", str(DEFAULT_MTU), "up")
    _first_ping(lab, a, tunnel[b], time.monotonic())
    return tunnel[b]


def throughput(rounds: int, seconds: int) -> dict[str, Any]:
    """Direct vs relayed (kernel, Python) iperf3 between the same namespaces."""
    lab = Lab()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cl-relay-bench-") as tmp_dir:
            tmp = Path(tmp_dir)
            a, b, r = lab.add_host(1), lab.add_host(2), lab.add_host(3)
            lab.run(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")  # for the kernel flows
            ends = {a: lab.address(1), b: lab.address(2)}
            relay_ip = lab.address(3)
            relays = {}
            for variant, ports in RELAY_PORTS.items():
                mode = "kernel" if variant == "relayed" else "python"
                command = [sys.executable, "-c", RELAY_SCRIPT, *map(str, ports), mode]
                relays[variant] = _daemon(lab, r, command, tmp / f"{variant}.log")
                procs.append(relays[variant])
            targets = {
                "direct": _tunnel(
                    lab,
                    ends,
                    "d",
                    "10.199.0",
                    51999,
                    {a: f"{ends[b]}:51999", b: f"{ends[a]}:51999"},
                    tmp,
                    procs,
                ),
            }
            for i, (variant, ports) in enumerate(RELAY_PORTS.items()):
                targets[variant] = _tunnel(
                    lab,
                    ends,
                    f"r{i}",
                    f"10.19{7 - i}.0",
                    51998 - i,
                    {a: f"{relay_ip}:{ports[0]}", b: f"{relay_ip}:{ports[1]}"},
                    tmp,
                    procs,
                )
            time.sleep(1.5)  # the kernel relay's next sync installs the latched flow
            procs.append(
                _daemon(lab, b, ["iperf3", "-s", "-p", str(IPERF_PORT)], tmp / "iperf3.log")
            )
            time.sleep(0.5)
            gbits: dict[tuple[str, int], list[float]] = {
                (v, n): [] for v in targets for n in STREAMS
            }
            cpu = dict.fromkeys(RELAY_PORTS, 0.0)
            order = [(v, n) for n in STREAMS for v in targets]
            for i in range(rounds):
                for variant, n in order if i % 2 == 0 else order[::-1]:
                    relay = relays.get(variant)
                    before = cpu_seconds(relay.pid) if relay else 0.0
                    gbits[variant, n].append(_iperf(lab, a, targets[variant], n, seconds))
                    if relay:
                        cpu[variant] += cpu_seconds(relay.pid) - before
                    log(f"round {i + 1}: {variant} x{n} {gbits[variant, n][-1]:.3g} Gbit/s")
            tables = lab.run(r, "nft", "list", "tables").stdout
            kernel_used = "cl-relay-bench" in tables
    finally:
        _stop_all(procs)
        lab.cleanup()
    medians = {f"{v}_x{n}_gbit_s": round(statistics.median(g), 3) for (v, n), g in gbits.items()}
    ratios = {
        f"{v}_vs_direct_x{n}": round(
            statistics.median(gbits[v, n]) / statistics.median(gbits["direct", n]), 3
        )
        for v in RELAY_PORTS
        for n in STREAMS
    }
    cpu_per_gbit = {}
    for variant in RELAY_PORTS:
        total = sum(sum(gbits[variant, n]) * seconds for n in STREAMS)
        cpu_per_gbit[variant] = round(cpu[variant] / total, 3) if total else None
    return {
        "medians": medians,
        "runs": {f"{v}_x{n}": g for (v, n), g in gbits.items()},
        "ratios": ratios,
        "kernel_flows_used": kernel_used,
        "relay_cpu_s_per_gbit": cpu_per_gbit,
    }


def failover(rounds: int, tmp: Path) -> list[float]:
    """Seconds from killing the relay of a relayed pair to a ping across it, per round."""
    from lab.agents import Agent
    from lab.api import make_network, make_token
    from lab.components import Controller, Etcd, free_port
    from lab.multicloud import MultiCloud
    from lab.relays import Relay

    net = MultiCloud()
    etcd = Etcd.serving(tmp / "etcd", host=net.gateway)
    ctl = Controller(
        etcd_url=etcd.url, state_dir=tmp / "controller", port=free_port(), host=net.gateway
    )
    agents: list[Agent] = []
    relays: dict[str, Relay] = {}
    times: list[float] = []
    try:
        etcd.start()
        ctl.start()
        with ctl.client() as admin:
            make_network(admin, "relay-bench", cidr="10.214.0.0/24")
            token = make_token(admin, "relay-bench")
        spots = {}
        for n, (name, subnet) in enumerate((("a", "192.168.1"), ("b", "10.77.0"))):
            net.add_cloud(name, subnet, 11 + n, nat="masquerade fully-random")
        for n, rid in enumerate(("r1", "r2")):
            spots[rid] = (net.add_public_host(f"p{n}", 20 + n), 20 + n)
            relays[rid] = Relay(
                net, spots[rid][0], rid, spots[rid][1], etcd.url, tmp / f"{rid}.log"
            )
        for n, name in enumerate(("a", "b"), start=1):
            agent = Agent(
                net,
                n,
                net.add_host(name, 1),
                tmp / f"agent-{name}1",
                f"cl-{net.tag}{name}1",
                log_level="info",
            )
            agent.start(
                "join",
                "--controller",
                ctl.url,
                "--hostname",
                f"{name}1",
                "--interface",
                agent.interface,
                "--listen-port",
                "51820",
                "--label",
                f"site={name}",
                token=token,
            )
            agents.append(agent)
        a1, b1 = agents
        target = b1.overlay_ip(60)
        _ping_until(net, a1.ns, target, time.monotonic(), limit=90)
        for i in range(rounds):
            with ctl.client() as admin:
                hosts = admin.get("/v1/networks/relay-bench/hosts").json()
            served = next(iter(next(h for h in hosts if h["name"] == "a1")["relays"].values()))
            victim = next(r for r in relays.values() if served.startswith(r.address + ":"))
            started = time.monotonic()
            victim.kill()  # no lease revoke: the lease has to expire
            times.append(_ping_until(net, a1.ns, target, started, limit=90))
            log(f"failover {i + 1}: {times[-1]:.2f} s after {victim.id} was killed")
            if i + 1 < rounds:
                ns, host_no = spots[victim.id]
                relays[victim.id] = Relay(
                    net, ns, victim.id, host_no, etcd.url, tmp / f"{victim.id}.log"
                )
                time.sleep(5)  # registered; the pair may move back to it
                _ping_until(net, a1.ns, target, time.monotonic(), limit=90)
    finally:
        for agent in agents:
            agent.stop(signal.SIGKILL)
            Path(f"/var/run/wireguard/{agent.interface}.sock").unlink(missing_ok=True)
        for relay in relays.values():
            relay.stop()
        ctl.stop()
        etcd.stop()
        net.cleanup()
    return times


def _ping_until(net: Namespaces, ns: str, address: str, started: float, limit: float) -> float:
    """Seconds from ``started`` to the first ping reply from ``address`` (one try each
    0.2 s at most)."""
    while time.monotonic() - started < limit:
        if net.ping(ns, address, wait=0.2):
            return time.monotonic() - started
    raise TimeoutError(f"no ping to {address} from {ns} after {limit} s")


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    rounds, seconds = (1, 1) if args.smoke else (3, 5)
    clean_up_on_sigterm()
    tput = throughput(rounds, seconds)
    with tempfile.TemporaryDirectory(prefix="cl-relay-failover-") as tmp_dir:
        times = failover(rounds, Path(tmp_dir))
    ratios = tput["ratios"]
    result: dict[str, Any] = {
        "benchmark": "cladnet.relay",
        "machine": machine_facts("wireguard-go", "iperf3"),
        "rounds": rounds,
        "seconds": seconds,
        **tput,
        "failover_s": [round(t, 2) for t in times],
        "failover_median_s": round(statistics.median(times), 2),
        "target_relayed_vs_direct": TARGET_RELAYED_VS_DIRECT,
        "target_failover_s": TARGET_FAILOVER_S,
        "target_met": all(
            ratios[f"relayed_vs_direct_x{n}"] >= TARGET_RELAYED_VS_DIRECT for n in STREAMS
        )
        and max(times) < TARGET_FAILOVER_S,
    }
    print(json.dumps(result, indent=2))
    m = tput["medians"]
    print(
        "relay: kernel "
        + ", ".join(f"x{n} {ratios[f'relayed_vs_direct_x{n}']:.2f}" for n in STREAMS)
        + ", Python "
        + ", ".join(f"x{n} {ratios[f'relayed_python_vs_direct_x{n}']:.2f}" for n in STREAMS)
        + f" of direct ({m['relayed_x1_gbit_s']} / {m['relayed_python_x1_gbit_s']} vs "
        + f"{m['direct_x1_gbit_s']} Gbit/s x1); failover {result['failover_median_s']} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
