#!/usr/bin/env python3
"""The data plane: join-to-first-ping, address-change recovery, and TCP throughput over
the CLADNet overlay against the raw underlay and a hand-configured wireguard-go tunnel,
all measured in the same run on namespaces of this machine (root; wireguard-go).

    python -m bench.dataplane            # 6-host mesh, 3 repetitions, 5 s iperf3 runs
    python -m bench.dataplane --smoke    # 3 hosts, 1 repetition, 2 s runs

Method:
- hosts are namespaces on one bridge (tests/netns.Lab), agents are real
  ``cladnet-agent join`` processes with the userspace backend, the controller and
  etcd real processes;
- join-to-first-ping: from starting the agent process of a new host until its first
  successful ping of an existing host's overlay address (ping every 20 ms);
- baseline for that: two namespaces configured by hand (``wireguard-go`` + ``wg set``
  + ``ip``), from starting wireguard-go until the first ping;
- recovery: delete the host's underlay address, add a new one, time until pings in
  both directions pass again;
- throughput: ``iperf3 -c … -t T -J`` (one TCP stream) between two hosts over the
  underlay, over the overlay, and over the hand-made tunnel; UDP receive-buffer
  errors (``/proc/net/snmp`` RcvbufErrors, per namespace) during the overlay run.
One JSON object on stdout, then a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cladnet.keys import generate_keypair
from tests.components import Controller, Etcd, free_port
from tests.netns import Lab, sh
from tests.test_agent_mesh import Agent
from tests.test_controller_api import make_network, make_token


def _first_ping(lab: Lab, ns: str, address: str, started: float, limit: float = 30) -> float:
    while time.monotonic() - started < limit:
        if lab.run(ns, "ping", "-c", "1", "-W", "0.2", address, check=False).returncode == 0:
            return time.monotonic() - started
        time.sleep(0.02)
    raise TimeoutError(f"no ping to {address} from {ns}")


def _rcvbuf_errors(lab: Lab, ns: str) -> int:
    lines = lab.run(ns, "cat", "/proc/net/snmp").stdout.splitlines()
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    return int(udp[1][udp[0].index("RcvbufErrors")])


def _iperf(lab: Lab, server_ns: str, client_ns: str, address: str, seconds: int) -> float:
    server = lab.popen(server_ns, ["iperf3", "-s", "-1", "-B", address],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.3)
        r = lab.run(client_ns, "iperf3", "-c", address, "-t", str(seconds), "-J",
                    timeout=seconds + 30)  # fmt: skip
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    hosts, reps, seconds = (3, 1, 2) if args.smoke else (6, 3, 5)
    tmp = Path(tempfile.mkdtemp(prefix="cl-bench-"))
    lab = Lab()
    port = free_port()
    etcd = Etcd(url=f"http://127.0.0.1:{port}", data_dir=tmp / "etcd", client_port=port,
                peer_port=free_port())  # fmt: skip
    ctl = Controller(etcd_url=etcd.url, state_dir=tmp / "ctl", port=free_port(),
                     host=lab.gateway)  # fmt: skip
    agents: list[Agent] = []
    hand_links: list[str] = []
    result: dict = {"hosts": hosts, "repetitions": reps, "iperf_seconds": seconds}
    try:
        etcd.start()
        ctl.start()
        with ctl.client() as admin:
            make_network(admin, "bench", cidr="10.216.0.0/24", keepalive=5)
            token = make_token(admin, "bench")
        total = hosts - 1 + reps
        for i in range(1, total + 3):
            lab.add_host(i)

        def agent(i: int) -> Agent:
            a = Agent(lab, i, f"cl-{lab.tag}-h{i}", tmp / f"agent{i}", f"cl-{lab.tag}w{i}")
            agents.append(a)
            return a

        # The hand-made tunnel between the two spare namespaces (baseline).
        spare_a, spare_b = f"cl-{lab.tag}-h{total + 1}", f"cl-{lab.tag}-h{total + 2}"
        hand_s, hand_ip, hand_links = _tunnel_between(lab, spare_a, spare_b, total)
        result["hand_tunnel_first_ping_s"] = round(hand_s, 3)

        first = [agent(i) for i in range(1, hosts)]
        for a in first:
            a.join(ctl.url, token)
        ips = {a.index: a.overlay_ip(30) for a in first}
        for a in first[1:]:
            _first_ping(lab, a.ns, ips[first[0].index], time.monotonic(), 60)
        joins = []
        for r in range(reps):
            new = agent(hosts + r)
            started = time.monotonic()
            new.join(ctl.url, token)
            joins.append(_first_ping(lab, new.ns, ips[first[0].index], started, 60))
        result["join_to_first_ping_s"] = {
            "median": round(statistics.median(joins), 3),
            "min": round(min(joins), 3),
            "max": round(max(joins), 3),
        }

        a, b = first[0], first[1]
        recover = []
        for gen in range(1, reps + 1):
            # Back and forth between two addresses: each move is a real change.
            old, new_addr = lab.address(b.index, (gen - 1) % 2), lab.address(b.index, gen % 2)
            started = time.monotonic()
            lab.run(b.ns, "ip", "addr", "del", f"{old}/24", "dev", "eth0")
            lab.run(b.ns, "ip", "addr", "add", f"{new_addr}/24", "dev", "eth0")
            _first_ping(lab, b.ns, ips[a.index], started, 60)
            _first_ping(lab, a.ns, ips[b.index], started, 60)
            recover.append(time.monotonic() - started)
        result["address_change_recovery_s"] = {"median": round(statistics.median(recover), 3),
                                               "max": round(max(recover), 3)}  # fmt: skip

        underlay = _iperf(lab, b.ns, a.ns, lab.address(b.index, reps % 2), seconds)
        before = _rcvbuf_errors(lab, b.ns)
        overlay = _iperf(lab, b.ns, a.ns, ips[b.index], seconds)
        drops = _rcvbuf_errors(lab, b.ns) - before
        hand = _iperf(lab, spare_b, spare_a, hand_ip, seconds)
        result["throughput_gbit_s"] = {
            "underlay": round(underlay, 2),
            "overlay": round(overlay, 3),
            "hand_wireguard_go": round(hand, 3),
        }
        result["overlay_vs_hand"] = round(overlay / hand, 2) if hand else None
        result["overlay_vs_underlay"] = round(overlay / underlay, 4) if underlay else None
        result["overlay_udp_rcvbuf_errors"] = drops
    finally:
        for a in agents:
            a.stop()
        # wireguard-go runs in its own session (tunnels outlive agent restarts) and may
        # outlive its namespace: stop the ones this run started, by PID.
        ours = [a.interface for a in agents] + hand_links
        for pid, cmd in _processes():
            if cmd[:1] == ["wireguard-go"] and cmd[-1] in ours:
                subprocess.run(["kill", str(pid)], check=False)
        for name in ours:
            Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)
        for link in hand_links:
            sh("ip", "link", "del", link, check=False)
        ctl.stop()
        etcd.stop()
        lab.cleanup()
    print(json.dumps(result, indent=1))
    t = result["throughput_gbit_s"]
    print(f"join→first ping {result['join_to_first_ping_s']['median']}s "
          f"(hand tunnel {result['hand_tunnel_first_ping_s']}s); address change recovered in "
          f"{result['address_change_recovery_s']['median']}s; overlay {t['overlay']} Gbit/s = "
          f"{result['overlay_vs_hand']}x hand wireguard-go ({t['hand_wireguard_go']}), "
          f"underlay {t['underlay']} Gbit/s")  # fmt: skip


def _processes() -> list[tuple[int, list[str]]]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            out.append((int(proc.name), [c.decode(errors="replace") for c in cmd if c]))
    return out


def _tunnel_between(lab: Lab, a: str, b: str, total: int) -> tuple[float, str, list[str]]:
    """The hand-made tunnel between the spare namespaces (their Lab indexes)."""
    ia, ib = total + 1, total + 2
    keys = {a: generate_keypair(), b: generate_keypair()}
    names = {a: f"cl-{lab.tag}ha", b: f"cl-{lab.tag}hb"}
    tunnel = {a: "10.199.0.1", b: "10.199.0.2"}
    underlay = {a: lab.address(ia), b: lab.address(ib)}
    started = time.monotonic()
    for ns, other in ((a, b), (b, a)):
        lab.run(ns, "wireguard-go", names[ns])
        key_file = Path(tempfile.mkstemp()[1])
        key_file.write_text(keys[ns][0])
        lab.run(ns, "wg", "set", names[ns], "listen-port", "51999", "private-key", str(key_file),
                "peer", keys[other][1], "allowed-ips", f"{tunnel[other]}/32",
                "endpoint", f"{underlay[other]}:51999")  # fmt: skip
        key_file.unlink()
        lab.run(ns, "ip", "addr", "add", f"{tunnel[ns]}/24", "dev", names[ns])
        lab.run(ns, "ip", "link", "set", names[ns], "mtu", "1420", "up")
    return _first_ping(lab, a, tunnel[b], started), tunnel[b], list(names.values())


if __name__ == "__main__":
    sys.exit(main())
