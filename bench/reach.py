#!/usr/bin/env python3
"""Reach: from ``cladnet-agent join`` to the first overlay pings, per NAT kind, and from
a NAT's public address changing in place to pings again; against a hand-made
wireguard-go tunnel's start → first ping between two public hosts of the same lab, in
the same run (root; wireguard-go; etcd).

    python -m bench.reach            # every kind; 3 address changes of 3 NATs
    python -m bench.reach --smoke    # every kind; 1 address change of the 1:1 NAT (CI)

The lab is lab/natlab.py: a public host ``p`` running an agent and ``cladnet-relay``,
then one host per NAT kind joining in turn: ``q`` public, ``o1`` behind a 1:1 NAT,
``e1`` behind plain masquerade (endpoint-independent), ``s1`` behind ``masquerade
fully-random`` (symmetric: relayed), ``g1`` behind two stacked NATs with 100.64.0.0/10
between them (carrier-grade NAT), ``n1`` and ``n2`` behind one NAT on two subnets with
no route between them and no hairpinning. Every namespace and NAT is built before the
first timed join. Per join: from starting the agent process until the new host's
first reply from each host already in the mesh (pinged in parallel, one try per 0.2 s
each): ``first`` (the earliest), ``all`` (the last: every pair of that host connected).
Address change: the NAT's address is replaced by another on the internet (conntrack
entries go with the old one, as when a cloud re-assigns an address), then the time
until the host behind it has a reply from every other host.

The network's keepalive is ``--keepalive`` (5 s, as the dataplane and mesh benches).
Targets (issue 14: every pair connected within 5 s of joining; pings again within 5 s
of an address change) are reported, not asserted.

One JSON object on stdout, then a one-line summary; progress on stderr.
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
from typing import Any

from bench.common import clean_up_on_sigterm, machine_facts
from bench.dataplane import _hand_tunnel, _stop, hand_devices
from lab.natlab import HOSTS, NatLab

TARGET_JOIN_S = 5.0
TARGET_MOVE_S = 5.0
JOINS = ["q", "o1", "e1", "s1", "g1", "n1", "n2"]  # after p, in this order
# host → the two public host numbers its NAT alternates between
MOVES = {"o1": (41, 51), "e1": (42, 52), "g1": (44, 54)}
LIMIT_S = 60.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rounded(took: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (round(v, 2) if v is not None else None) for k, v in took.items()}


def _span(took: dict[str, float | None]) -> tuple[float | None, float | None]:
    """(first, all): the earliest reply, and the last (None when one never came)."""
    times = [t for t in took.values() if t is not None]
    first = round(min(times), 2) if times else None
    last = round(max(times), 2) if times and len(times) == len(took) else None
    return first, last


def run(smoke: bool, keepalive: int, tmp: Path) -> dict[str, Any]:
    """Build the lab, time the joins and the address changes; the report's figures."""
    lab = NatLab(tmp, keepalive=keepalive, log_level="info")
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {}
    try:
        log(f"lab {lab.net.tag}: etcd, controller, relay; every NAT and namespace")
        lab.start()
        for name in JOINS:
            lab.add(name)
        ends = {lab.namespaces[n]: lab.public_ip(n) for n in ("p", "q")}
        hand_s, _, _ = _hand_tunnel(lab.net, ends, tmp, procs)  # type: ignore[arg-type]
        out["hand_tunnel_first_ping_s"] = round(hand_s, 3)
        log(f"hand wireguard-go tunnel p-q: first ping after {hand_s:.3f} s")
        for proc in procs:
            _stop(proc)
        # The hand tunnel's devices go with their processes, but not always at once: one
        # left in p's namespace a moment has held p's first join attempt (CI, once).
        for ns, name in zip(ends, hand_devices(lab.net.tag), strict=True):
            subprocess.run(["ip", "-n", ns, "link", "del", name], capture_output=True)
        lab.join("p")
        lab.agents["p"].overlay_ip(60)
        joined = ["p"]
        joins: dict[str, Any] = {}
        for name in JOINS:
            started = time.monotonic()
            lab.join(name)
            took = lab.ping_all(name, joined, started, LIMIT_S)
            first, last = _span(took)
            joins[name] = {"kind": HOSTS[name].kind, "first_s": first, "all_s": last}
            joins[name]["per_peer_s"] = _rounded(took)
            log(f"{name} ({HOSTS[name].kind}) joined: first ping {first} s, all {last} s")
            joined.append(name)
        out["joins"] = joins
        # The paths the pairs settled on, as the agents report them.
        time.sleep(3)
        out["paths"] = {name: lab.paths(name) for name in lab.agents}
        moves: dict[str, list[Any]] = {}
        rounds = 1 if smoke else 3
        for name, numbers in list(MOVES.items())[: 1 if smoke else None]:
            others = [o for o in lab.agents if o != name]
            moves[name] = []
            for i in range(rounds):
                # Settled first: every pair of the host pings before the move.
                lab.ping_all(name, others, time.monotonic(), LIMIT_S)
                started = time.monotonic()
                new = lab.net.move_public_address(HOSTS[name].cloud, numbers[i % 2], flush=True)
                took = lab.ping_all(name, others, started, LIMIT_S)
                first, last = _span(took)
                moves[name].append(
                    {"to": new, "first_s": first, "all_s": last, "per_peer_s": _rounded(took)}
                )
                log(f"{name}'s NAT moved to {new}: first ping {first} s, all {last} s")
        out["address_change"] = moves
    finally:
        for proc in procs:
            if proc.poll() is None:
                _stop(proc)
        lab.close()
        for name in hand_devices(lab.net.tag):
            Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)
    return out


def verdict(out: dict[str, Any]) -> dict[str, Any]:
    """Worst figures against the targets; None (a pair never pinged) counts as missed."""
    joins = [j["all_s"] for j in out["joins"].values()]
    moves = [m["all_s"] for ms in out["address_change"].values() for m in ms]
    worst_join = None if None in joins else max(joins)
    worst_move = None if None in moves or not moves else max(moves)
    hand = out["hand_tunnel_first_ping_s"]
    return {
        "worst_join_all_s": worst_join,
        "worst_move_all_s": worst_move,
        "join_vs_hand_tunnel": {
            n: (round(j["all_s"] / hand, 1) if j["all_s"] is not None and hand else None)
            for n, j in out["joins"].items()
        },
        "join_met": worst_join is not None and worst_join < TARGET_JOIN_S,
        "move_met": worst_move is not None and worst_move < TARGET_MOVE_S,
    }


def summary(result: dict[str, Any]) -> str:
    """The one human line."""
    joins = ", ".join(
        f"{j['kind']} {j['all_s']}" for j in result["joins"].values() if j["kind"] != "same_nat"
    )
    same = [j["all_s"] for j in result["joins"].values() if j["kind"] == "same_nat"]
    moves = ", ".join(
        f"{HOSTS[n].kind} " + "/".join(str(m["all_s"]) for m in ms)
        for n, ms in result["address_change"].items()
    )
    v = result["verdict"]
    return (
        f"reach: join → all pairs ping (s): {joins}, same NAT {'/'.join(map(str, same))} "
        f"(hand tunnel {result['hand_tunnel_first_ping_s']} s); target < {TARGET_JOIN_S} s "
        f"{'met' if v['join_met'] else 'NOT met'}; NAT address change → pings again (s): "
        f"{moves}; target < {TARGET_MOVE_S} s {'met' if v['move_met'] else 'NOT met'}"
    )


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reach", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="one address change (CI, < 60 s)")
    p.add_argument("--keepalive", type=int, default=5, help="the network's keepalive (s)")
    p.add_argument("--keep", type=Path, help="a new directory to keep the lab's logs in")
    args = p.parse_args()
    clean_up_on_sigterm()
    if args.keep:
        args.keep.mkdir(parents=True)
        out = run(args.smoke, args.keepalive, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="cl-reach-bench-") as tmp_dir:
            out = run(args.smoke, args.keepalive, Path(tmp_dir))
    result: dict[str, Any] = {
        "benchmark": "cladnet.reach",
        "machine": machine_facts("wireguard-go"),
        "inputs": {
            "smoke": args.smoke,
            "keepalive_s": args.keepalive,
            "joins": ["p", *JOINS],
            "moves": list(MOVES)[:1] if args.smoke else list(MOVES),
            "ping": "one try per 0.2 s per peer, peers in parallel",
        },
        **out,
        "target_join_s": TARGET_JOIN_S,
        "target_move_s": TARGET_MOVE_S,
    }
    result["verdict"] = verdict(out)
    result["target_met"] = result["verdict"]["join_met"] and result["verdict"]["move_met"]
    move_times = [m["all_s"] for ms in out["address_change"].values() for m in ms]
    if move_times and None not in move_times:
        result["address_change_median_s"] = round(statistics.median(move_times), 2)
    print(json.dumps(result, indent=1))
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
