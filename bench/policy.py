#!/usr/bin/env python3
"""Access policy: compile time and nftables load time for 1,000 hosts x 50 rules.

One JSON object on stdout (inputs, machine facts, figures in ms), then a one-line
summary. Needs root for the nft part (a throwaway network namespace ``cl-bench-<tag>``,
deleted at the end); without root only the pure figures are measured.

    python -m bench.policy            # 1,000 hosts x 50 rules
    python -m bench.policy --smoke    # 100 hosts x 10 rules (CI)

Figures, each the median of 5 runs: ``parse`` (document → Policy), ``plan`` (one host's
device: which of the peers it keeps), ``ruleset`` (one host's nft text), for a typical
host (the destination of a few rules) and the worst one (the destination of every rule,
with sources spread over every host), then ``nft -f`` of those texts. Baseline in the
same run: ``plan`` without a policy (every peer kept).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import machine_facts
from cladnet import mesh
from cladnet import policy as acl

RUNS = 5
TAGS = 25
ROLES = 10


def _hosts(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"h-{i}",
            "name": f"vm{i}",
            "public_key": base64.b64encode(i.to_bytes(32, "big")).decode(),
            "overlay_ip": f"10.200.{i // 250}.{i % 250 + 1}",
            "listen_port": 51820,
            "tags": [f"t{i % TAGS}"],
            "labels": {"role": f"r{i % ROLES}"},
        }
        for i in range(n)
    ]


def _document(rules: int, every_dst: bool = False) -> dict[str, Any]:
    return {
        "groups": {f"g{g}": [f"tag:t{g}", f"label:role=r{g % ROLES}"] for g in range(TAGS)},
        "rules": [
            {
                "src": [f"group:g{r % TAGS}", f"tag:t{(r * 3) % TAGS}"],
                "dst": ["*"] if every_dst else [f"tag:t{(r * 7) % TAGS}"],
                "proto": "tcp",
                "ports": [1000 + r, f"{2000 + r}-{2100 + r}"],
            }
            for r in range(rules)
        ],
    }


def _median_ms(fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def _nft_ms(texts: dict[str, str]) -> dict[str, float]:
    ns = f"cl-bench-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = {}
        for name, text in texts.items():

            def load(text: str = text) -> None:
                subprocess.run(
                    ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                    input=text.encode(),
                    check=True,
                    capture_output=True,
                )

            out[name] = _median_ms(load)
        return out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    n, rules = (100, 10) if args.smoke else (1000, 50)
    hosts = _hosts(n)
    network = {"cidr": "10.200.0.0/16", "mtu": 1420, "keepalive": 25}
    me, peers = hosts[0], hosts[1:]
    doc, worst_doc = _document(rules), _document(rules, every_dst=True)
    policy, worst = acl.parse(doc), acl.parse(worst_doc)
    texts = {
        "typical": acl.nft_ruleset(policy, me, peers, "wgbench"),
        "worst": acl.nft_ruleset(worst, me, peers, "wgbench"),
    }
    figures: dict[str, Any] = {
        "parse_ms": _median_ms(lambda: acl.parse(doc)),
        "plan_ms": _median_ms(lambda: mesh.plan(network, me, peers, policy=policy)),
        "plan_peers": len(mesh.plan(network, me, peers, policy=policy).peers),
        "plan_without_policy_ms": _median_ms(lambda: mesh.plan(network, me, peers)),
        "ruleset_ms": _median_ms(lambda: acl.nft_ruleset(policy, me, peers, "wgbench")),
        "ruleset_worst_ms": _median_ms(lambda: acl.nft_ruleset(worst, me, peers, "wgbench")),
        "ruleset_bytes": len(texts["typical"]),
        "ruleset_worst_bytes": len(texts["worst"]),
    }
    if os.geteuid() == 0:
        loaded = _nft_ms(texts)
        figures["nft_load_ms"], figures["nft_load_worst_ms"] = loaded["typical"], loaded["worst"]
    report = {
        "benchmark": "cladnet.policy",
        "inputs": {"hosts": n, "rules": rules, "runs": RUNS},
        "machine": machine_facts(),
        "figures": figures,
    }
    print(json.dumps(report, indent=1))
    nft = (
        f", nft -f {figures['nft_load_ms']} ms (worst {figures['nft_load_worst_ms']} ms)"
        if "nft_load_ms" in figures
        else ""
    )
    print(
        f"{n} hosts x {rules} rules: parse {figures['parse_ms']} ms, plan {figures['plan_ms']} ms"
        f" (without policy {figures['plan_without_policy_ms']} ms), ruleset"
        f" {figures['ruleset_ms']} ms (worst {figures['ruleset_worst_ms']} ms){nft}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
