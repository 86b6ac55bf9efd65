#!/usr/bin/env python3
"""Collector ingest, end to end: publisher → Mosquitto → collector → store, in samples/s,
with SQLite and with VictoriaMetrics, against a same-run baseline: the same batches
through the same broker to a subscriber that only counts them.

    python -m bench.ingest            # 400 hosts x 80 metrics x 10 batches (320,000 samples)
    python -m bench.ingest --smoke    # 50 hosts x 80 metrics x 4 batches

The publisher sends QoS 1 batches from one process with a window of outstanding
publishes, as agents do in aggregate. "Zero loss" is checked: every (host, seq) must
reach the collector (its gap and batch counters). Target: 200,000 samples/s for one
collector process (5,000 hosts x 80 metrics every 2 s). One JSON object, then a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

from cladnet.metrics import Batch, topic
from tests.components import (
    MQTT_ADMIN_PASSWORD,
    MQTT_COLLECTOR_PASSWORD,
    Collector,
    Mosquitto,
    Victoria,
    free_port,
)

PUBLISHER, PUBLISHER_PASSWORD = "bench-publisher", "bench-pw"


def _batches(hosts: int, metrics: int, rounds: int) -> list[tuple[str, bytes]]:
    now = time.time() - rounds * 2
    out = []
    for r in range(rounds):
        for h in range(hosts):
            b = Batch(network="bench", host=f"vm{h}", seq=r, ts=now + 2 * r, interval=2.0)
            for m in range(metrics):
                b.add(f"bench_metric_{m}", float(r + m))
            out.append((topic("bench", f"vm{h}"), b.encode()))
    return out


async def _publish(broker: Mosquitto, batches: list[tuple[str, bytes]], window: int = 200) -> float:
    started = time.monotonic()
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=PUBLISHER,
        password=PUBLISHER_PASSWORD,
        max_inflight_messages=window,
    ) as c:
        pending: set[asyncio.Task[None]] = set()
        for t, body in batches:
            pending.add(asyncio.create_task(c.publish(t, body, qos=1)))
            if len(pending) >= window:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
    return time.monotonic() - started


async def _baseline(broker: Mosquitto, batches: list[tuple[str, bytes]]) -> float:
    """Publish while a bare subscriber counts; seconds until it has everything."""
    got = 0
    ready, done = asyncio.Event(), asyncio.Event()

    async def count() -> None:
        nonlocal got
        async with aiomqtt.Client(
            broker.host, broker.port, username="cladnet-collector", password=MQTT_COLLECTOR_PASSWORD
        ) as c:
            await c.subscribe("cladnet/metrics/#", qos=1)
            ready.set()
            async for _ in c.messages:
                got += 1
                if got == len(batches):
                    done.set()
                    return

    task = asyncio.create_task(count())
    await ready.wait()
    started = time.monotonic()
    await _publish(broker, batches)
    await asyncio.wait_for(done.wait(), 300)
    await task
    return time.monotonic() - started


def _collector_counts(c: Collector) -> dict:
    with c.client() as http:
        return http.get("/v1/ingest").json()


async def _through_collector(broker: Mosquitto, c: Collector, batches: list) -> float:
    started = time.monotonic()
    await _publish(broker, batches)
    while _collector_counts(c)["counters"].get("batches", 0) < len(batches):
        await asyncio.sleep(0.05)
        if time.monotonic() - started > 600:
            raise TimeoutError("collector did not get every batch")
    return time.monotonic() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    hosts, metrics, rounds = (50, 80, 4) if args.smoke else (400, 80, 10)
    batches = _batches(hosts, metrics, rounds)
    samples = hosts * metrics * rounds
    tmp = Path(tempfile.mkdtemp(prefix="cl-bench-ingest-"))
    broker = Mosquitto(tmp / "mqtt", free_port())
    vm = Victoria(tmp / "vm", free_port())
    result: dict = {"hosts": hosts, "metrics": metrics, "rounds": rounds, "samples": samples}
    collectors: list[Collector] = []
    try:
        broker.start()
        vm.start()
        env = {"CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD}
        ctl = ["mosquitto_ctrl", "-h", broker.host, "-p", str(broker.port), "-u", "admin", "-P",
               MQTT_ADMIN_PASSWORD, "dynsec"]  # fmt: skip
        for cmd in (["createRole", "bench"],
                    ["addRoleACL", "bench", "publishClientSend", "cladnet/metrics/#", "allow", "5"],
                    ["createClient", PUBLISHER, "-p", PUBLISHER_PASSWORD],
                    ["addClientRole", PUBLISHER, "bench"]):  # fmt: skip
            subprocess.run(ctl + cmd, check=True, capture_output=True, env={**env})
        base = asyncio.run(_baseline(broker, batches))
        result["baseline_broker_only"] = {"seconds": round(base, 2),
                                          "samples_per_s": round(samples / base)}  # fmt: skip
        for store in ("sqlite", f"victoria:{vm.url}"):
            c = Collector(broker, tmp / f"col-{len(collectors)}", free_port(), store=store)
            collectors.append(c)
            c.start()
            secs = asyncio.run(_through_collector(broker, c, batches))
            counts = _collector_counts(c)
            gaps = sum(h["gaps"] for h in counts["hosts"].values())
            name = store.split(":")[0]
            result[name] = {"seconds": round(secs, 2), "samples_per_s": round(samples / secs),
                            "vs_baseline": round(base / secs, 2), "gaps": gaps,
                            "batches": counts["counters"].get("batches")}  # fmt: skip
            c.stop()
    finally:
        for c in collectors:
            c.stop()
        vm.stop()
        broker.stop()
    print(json.dumps(result, indent=1))
    print(f"ingest: SQLite {result['sqlite']['samples_per_s']:,} samples/s, VictoriaMetrics "
          f"{result['victoria']['samples_per_s']:,} samples/s; broker-only baseline "
          f"{result['baseline_broker_only']['samples_per_s']:,} samples/s (target 200,000); "
          f"gaps {result['sqlite']['gaps']}/{result['victoria']['gaps']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
