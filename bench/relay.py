#!/usr/bin/env python3
"""Relay throughput: TCP over a WireGuard tunnel relayed by ``cladnet-relay``'s pair
forwarder against the same tunnel direct, between the same two namespaces in the same
run (root; wireguard-go; iperf3).

    python -m bench.relay            # 3 rounds, 5 s iperf3 runs, 1 and 4 streams
    python -m bench.relay --smoke    # 1 round, 1 s runs

Method: three namespaces on one bridge (tests/netns.Lab): A, B and R. Two hand-configured
wireguard-go tunnels between A and B (MTU 1420, the network default): "direct" (each
end's endpoint is the other's underlay address) and "relayed" (A's endpoint for B is
R:40000, B's for A is R:40001; R runs the relay's ``PairForwarder``, the code
``cladnet-relay`` runs per pair, in a session of its own like any daemon). iperf3 from A
to B over each, alternating the order every round; figures are medians; the relay's own
CPU seconds over its runs give CPU per Gbit. The 0.8 relayed/direct target is reported,
not asserted.

One JSON object on stdout, then a one-line summary; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
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
from lab.netns import Lab

TARGET_RELAYED_VS_DIRECT = 0.8
STREAMS = (1, 4)
RELAY_PORTS = (40000, 40001)
IPERF_PORT = 5201

# The relay's forwarder for one pair, with no etcd: what ``cladnet-relay`` runs per pair.
RELAY_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from agent.relay import PairForwarder, Side

    async def main():
        pair = PairForwarder((Side("a", None), Side("b", None)), lambda side, addr: None)
        await pair.open("0.0.0.0", (int(sys.argv[1]), int(sys.argv[2])))
        await asyncio.Event().wait()

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
        lab.run(ns, "wg", "set", dev, "listen-port", str(port), "private-key", str(key_file),
                "peer", keys[other][1], "allowed-ips", f"{tunnel[other]}/32",
                "endpoint", endpoints[ns], "persistent-keepalive", "5")  # fmt: skip
        lab.run(ns, "ip", "addr", "add", f"{tunnel[ns]}/24", "dev", dev)
        lab.run(ns, "ip", "link", "set", dev, "mtu", str(DEFAULT_MTU), "up")
    _first_ping(lab, a, tunnel[b], time.monotonic())
    return tunnel[b]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    rounds, seconds = (1, 1) if args.smoke else (3, 5)
    clean_up_on_sigterm()
    lab = Lab()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cl-relay-bench-") as tmp_dir:
            tmp = Path(tmp_dir)
            a, b, r = lab.add_host(1), lab.add_host(2), lab.add_host(3)
            ends = {a: lab.address(1), b: lab.address(2)}
            relay_ip = lab.address(3)
            relay = _daemon(lab, r, [sys.executable, "-c", RELAY_SCRIPT,
                                     *map(str, RELAY_PORTS)], tmp / "relay.log")  # fmt: skip
            procs.append(relay)
            targets = {
                "direct": _tunnel(lab, ends, "d", "10.199.0", 51999,
                                  {a: f"{ends[b]}:51999", b: f"{ends[a]}:51999"}, tmp, procs),
                "relayed": _tunnel(lab, ends, "r", "10.197.0", 51998,
                                   {a: f"{relay_ip}:{RELAY_PORTS[0]}",
                                    b: f"{relay_ip}:{RELAY_PORTS[1]}"}, tmp, procs),
            }  # fmt: skip
            procs.append(_daemon(lab, b, ["iperf3", "-s", "-p", str(IPERF_PORT)],
                                 tmp / "iperf3.log"))  # fmt: skip
            time.sleep(0.5)
            gbits: dict[tuple[str, int], list[float]] = {
                (v, n): [] for v in targets for n in STREAMS
            }
            relay_cpu = 0.0
            order = [(v, n) for n in STREAMS for v in targets]
            for i in range(rounds):
                for variant, n in order if i % 2 == 0 else order[::-1]:
                    before = cpu_seconds(relay.pid)
                    gbits[variant, n].append(_iperf(lab, a, targets[variant], n, seconds))
                    if variant == "relayed":
                        relay_cpu += cpu_seconds(relay.pid) - before
                    log(f"round {i + 1}: {variant} x{n} {gbits[variant, n][-1]:.3g} Gbit/s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        lab.cleanup()
    medians = {f"{v}_x{n}_gbit_s": round(statistics.median(g), 3) for (v, n), g in gbits.items()}
    ratios = {
        f"relayed_vs_direct_x{n}": round(
            statistics.median(gbits["relayed", n]) / statistics.median(gbits["direct", n]), 3
        )
        for n in STREAMS
    }
    relayed_gbit = sum(sum(gbits["relayed", n]) * seconds for n in STREAMS)
    result: dict[str, Any] = {
        "benchmark": "cladnet.relay",
        "machine": machine_facts("wireguard-go", "iperf3"),
        "rounds": rounds,
        "seconds": seconds,
        "medians": medians,
        "runs": {f"{v}_x{n}": g for (v, n), g in gbits.items()},
        "ratios": ratios,
        "relay_cpu_s_per_gbit": round(relay_cpu / relayed_gbit, 3) if relayed_gbit else None,
        "target_relayed_vs_direct": TARGET_RELAYED_VS_DIRECT,
        "target_met": all(v >= TARGET_RELAYED_VS_DIRECT for v in ratios.values()),
    }
    print(json.dumps(result, indent=2))
    print(
        "relay: "
        + ", ".join(f"x{n} {ratios[f'relayed_vs_direct_x{n}']:.2f} of direct" for n in STREAMS)
        + f" ({medians['relayed_x1_gbit_s']} vs {medians['direct_x1_gbit_s']} Gbit/s x1); "
        + f"relay CPU {result['relay_cpu_s_per_gbit']} s/Gbit"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
