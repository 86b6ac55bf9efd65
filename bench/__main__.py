"""Run CLADNet's benchmarks, one after another, and gather their reports.

    python -m bench                      # list them
    python -m bench all [--smoke]        # every one (CI: --smoke)
    python -m bench joins mesh --out results.json

Each benchmark is its own module (``python -m bench.<name>`` runs it alone) and prints
one JSON object (inputs, machine facts, every figure, and the baselines measured in the
same run) followed by a one-line summary. This runs each in a fresh process, in turn
(they would disturb each other's timings), keeps its stderr on ours, and prints a
summary line per benchmark; ``--out`` writes every report in one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine_facts

REPO = Path(__file__).resolve().parent.parent

# name → (module, needs root, what it measures against)
BENCHMARKS: dict[str, tuple[str, bool, str]] = {
    "addrspace": ("addrspace", False, "planner vs a naive enumeration"),
    "joins": ("joins", False, "joins/s through 1 and 2 controllers vs raw etcd transactions"),
    "convergence": ("convergence", False, "watch fan-out vs etcd's own watch"),
    "mesh": ("mesh", True, "group to full mesh vs a hand-configured wireguard-go mesh"),
    "dataplane": ("dataplane", True, "overlay vs underlay, hand wireguard-go, nebula"),
    "relay": ("relay", True, "a tunnel through cladnet-relay (kernel, Python) vs direct; failover"),
    "reach": ("reach", True, "join → pings per NAT kind; NAT address change vs hand wireguard-go"),
    "ingest": ("ingest", False, "collector ingest vs broker-only and store-only"),
    "store": ("store", False, "SQLite store writes vs one INSERT per row"),
    "agent-footprint": ("agent_footprint", True, "agent RSS/CPU vs node_exporter, psutil"),
    "agent-scale": ("agent_scale", False, "agent absorbing a join burst vs per-event reconcile"),
    "policy": ("policy", False, "policy compile + nft load vs planning without a policy"),
    "dns": ("dns", False, "agent DNS server queries/s vs the bare codec"),
    "fleet": ("fleet", False, "real agents' convergence vs raw watch streams; etcd B/host/min"),
}


def run(name: str, smoke: bool) -> dict[str, Any]:
    """One benchmark in a fresh process: its report, summary, exit code and duration."""
    module, root, _ = BENCHMARKS[name]
    if root and os.geteuid() != 0:
        return {"name": name, "skipped": "needs root (network namespaces, WireGuard)"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *(["--smoke"] if smoke else [])],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    result: dict[str, Any] = {
        "name": name,
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "summary": lines[-1] if lines else "",
    }
    try:
        result["report"] = json.loads("\n".join(lines[:-1]))
    except json.JSONDecodeError as exc:
        result["error"] = f"no JSON report before the summary line: {exc}"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"'all' or some of: {', '.join(BENCHMARKS)}")
    p.add_argument("--smoke", action="store_true", help="the small sizes CI runs")
    p.add_argument("--out", type=Path, help="write every report here as one JSON file")
    args = p.parse_args(argv)
    if not args.names:
        for name, (_, root, against) in BENCHMARKS.items():
            print(f"{name:<16}{'(root) ' if root else ''}{against}")
        return 0
    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    results = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        result = run(name, args.smoke)
        results.append(result)
        state = (
            result.get("skipped")
            or result.get("error")
            or (f"exit {result['returncode']}" if result["returncode"] else result["summary"])
        )
        print(f"{name} ({result.get('seconds', 0)} s): {state}", flush=True)
    if args.out:
        args.out.write_text(
            json.dumps(
                {"machine": machine_facts(), "smoke": args.smoke, "results": results}, indent=1
            )
        )
    failed = [r["name"] for r in results if r.get("returncode") or r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
