#!/usr/bin/env python3
"""DNS: queries/s answered by one agent's name server, and the cost of a peer change.

One command, one JSON object on stdout (inputs, machine facts, figures, the same-run
baseline), then a one-line summary. Progress on stderr.

    python -m bench.dns           # 1,000 hosts, 20,000 queries
    python -m bench.dns --smoke   # 100 hosts, 2,000 queries (CI)

The agent's real server (``agent.dns.DnsServer``) runs in a child process on a free
loopback port; this process sends A queries for random known, unknown and foreign names
over UDP, keeping ``WINDOW`` queries in flight, and counts the answers. All come
from one source, so the per-source rate limit (``agent.dns.RATE``, 500/s) is lifted
in the child: this measures what one agent can answer, not what one peer may ask. Baseline, in the
same run: ``cladnet.dns.answer`` called directly (parse + lookup + pack, no socket), the
ceiling for one core. Also: ``build_zone`` for all hosts, which the agent runs after
every applied peer change.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dnslib import DNSRecord

from bench.common import machine_facts
from cladnet import dns

REPO_ROOT = Path(__file__).resolve().parent.parent

WINDOW = 32
# On loopback: the server answers only sources inside the network, as on the overlay.
NET = {"name": "prod", "cidr": "127.0.0.0/8"}


def hosts(n: int) -> list[dict[str, Any]]:
    return [{"name": f"vm{i}", "overlay_ip": f"127.0.{i // 250}.{i % 250 + 1}"} for i in range(n)]


def queries(n_hosts: int, count: int) -> list[bytes]:
    rng = random.Random(15)
    names = []
    for _ in range(count):
        r = rng.random()
        if r < 0.8:
            names.append(f"vm{rng.randrange(n_hosts)}.prod.cladnet.internal")
        elif r < 0.9:
            names.append(f"nope{rng.randrange(1000)}.prod.cladnet.internal")
        else:
            names.append("example.com")
    return [DNSRecord.question(name).pack() for name in names]


SERVER = """
import asyncio, sys
import agent.dns
from agent.dns import DnsServer
from bench.dns import NET, hosts
from cladnet import dns

async def main() -> None:
    agent.dns.RATE = agent.dns.BURST = 1e9  # capacity, not the per-source limit
    server = DnsServer(dns.build_zone(NET, hosts(int(sys.argv[1]))))
    await server.start("127.0.0.1", int(sys.argv[2]))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(server.queries, server.junk, flush=True)

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def through_server(n_hosts: int, packets: list[bytes]) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(n_hosts), str(port)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the DNS server did not start")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(1.0)
        answered = lost = 0
        started = time.perf_counter()
        for i in range(0, len(packets), WINDOW):
            if lost:
                break
            batch = packets[i : i + WINDOW]
            for p in batch:
                sock.send(p)
            for _ in batch:
                try:
                    sock.recv(4096)
                    answered += 1
                except TimeoutError:
                    lost += 1
                    break
        elapsed = time.perf_counter() - started
        sock.close()
        proc.stdin.close()
        served = proc.stdout.readline().split()
        return {
            "queries": len(packets),
            "answered": answered,
            "lost": lost,
            "seconds": round(elapsed, 3),
            "queries_per_s": round(answered / elapsed),
            "server_counted": int(served[0]) if served else None,
        }
    finally:
        proc.kill()
        proc.wait(10)


def codec_only(n_hosts: int, packets: list[bytes]) -> dict[str, Any]:
    zone = dns.build_zone(NET, hosts(n_hosts))
    started = time.perf_counter()
    for p in packets:
        dns.answer(p, zone)
    elapsed = time.perf_counter() - started
    per_query_us = round(elapsed / len(packets) * 1e6, 1)
    return {"queries_per_s": round(len(packets) / elapsed), "us_per_query": per_query_us}


def zone_build(n_hosts: int) -> float:
    hs = hosts(n_hosts)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        dns.build_zone(NET, hs)
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    n_hosts, count = (100, 2_000) if args.smoke else (1_000, 20_000)
    packets = queries(n_hosts, count)
    print(f"dns: {n_hosts} hosts, {count} queries", file=sys.stderr)
    server = through_server(n_hosts, packets)
    baseline = codec_only(n_hosts, packets)
    report = {
        "benchmark": "cladnet.dns",
        "inputs": {"hosts": n_hosts, "queries": count, "window": WINDOW, "mix": "80/10/10"},
        "machine": machine_facts("dnslib"),
        "server": server,
        "baseline_codec_only": baseline,
        "zone_build_ms": zone_build(n_hosts),
    }
    print(json.dumps(report, indent=2))
    print(
        f"dns: {server['queries_per_s']} queries/s answered by one agent over UDP "
        f"({baseline['queries_per_s']}/s codec alone); zone of {n_hosts} hosts built in "
        f"{report['zone_build_ms']} ms"
    )
    return 0 if server["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
