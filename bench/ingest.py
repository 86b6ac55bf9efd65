#!/usr/bin/env python3
"""Collector ingest end to end: agents' publishers → Mosquitto → collector → store → query.

One command, one JSON object on stdout (inputs, machine facts, every figure, the
same-run baselines, ratios), then a one-line summary. Progress goes to stderr.

    /work/venv/bin/python -m bench.ingest          # 200 agents x 50 batches, SQLite + Victoria
    /work/venv/bin/python -m bench.ingest --smoke  # 20 agents x 10 batches, SQLite (< 30 s)

The load is N simulated agents in this process, each the agent's real ``Spool`` and
``Publisher`` (its own MQTT connection, QoS 1, end-to-end acks from the collector),
publishing real batches: the agent's ``HostCollector`` figures of this machine plus
``--peers`` WireGuard peers through ``peer_samples`` (about 80 samples a batch, as
the issue assumes), re-numbered per host and round. The spools are filled while the
publishers sit connected and idle (untimed), then all are woken at once.

Phases, each on a fresh Mosquitto (a stopped collector's persistent session on a
shared broker keeps taking its share of the batches, which is what made an earlier
version of this benchmark wait forever):

1. ``broker_only`` (baseline): the same publishers and batches (acknowledged by the
   broker's PUBACK, no collector) to one subscriber on the collector's shared
   subscription that only counts messages;
2. per store: ``cladnet-collector`` with SQLite / VictoriaMetrics; the clock stops when
   ``/v1/metrics/latest`` shows every host's last batch (publish → queryable); zero
   loss is checked through ``/v1/ingest`` (batches, gaps, duplicates);
3. ``store_only`` (baseline) per store: the same samples written straight to a fresh
   store in the collector's flush size (20,000 samples), in this process.

Ratios: end to end over each baseline. The 200,000 samples/s target (one collector,
5,000 hosts x 80 metrics every 2 s) is reported, not asserted. Every wait is bounded
by ``--timeout``; the exit status is 1 on loss, a timeout or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import httpx

from agent.metrics.host import HostCollector
from agent.metrics.overlay import peer_samples
from agent.metrics.publisher import Broker, Publisher
from agent.metrics.spool import Spool
from bench import common
from bench.common import cpu_seconds
from cladnet import metrics
from cladnet.mesh import DeviceState, PeerState
from cladnet.tasks import cancel_and_wait
from collector.store import open_store
from lab.components import (
    MQTT_ADMIN_PASSWORD,
    MQTT_COLLECTOR_PASSWORD,
    Collector,
    Mosquitto,
    Victoria,
    free_port,
)

NETWORK = "bench"
AGENT_USER, AGENT_PASSWORD = "bench-agents", "bench-agents-pw"
TARGET_SAMPLES_PER_SECOND = 200_000
FLUSH_SAMPLES = 20_000  # the collector's write size (collector.ingest.Ingest)
MAX_BATCHES = 100  # a publisher looks at its 128 oldest batches; stay below that


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON object plus one summary line."""
    print(f"[ingest {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Deadline:
    """One time budget for the whole run; every wait takes what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"out of time before {what}")
        return left

    async def until(
        self, predicate: Callable[[], Awaitable[bool]], what: str, every: float = 0.05
    ) -> float:
        """Poll ``predicate`` until true; return when it became true (monotonic)."""
        try:
            async with asyncio.timeout(self.left(what)):
                # Polled: the state lives in other processes (HTTP) or other tasks.
                while True:
                    if await predicate():
                        break
                    await asyncio.sleep(every)
        except TimeoutError:
            raise TimeoutError(f"timed out waiting for {what}") from None
        return time.monotonic()


# --- the load --------------------------------------------------------------------------


def template(peers: int) -> list[tuple[str, dict[str, str], float]]:
    """A real batch's samples: this machine's host figures and ``peers`` overlay peers."""
    host = HostCollector()
    batch = metrics.Batch(network=NETWORK, host="t", seq=0, ts=time.time(), interval=2.0)
    host.collect(batch)
    time.sleep(0.2)  # rates and CPU ratios need two readings
    batch = metrics.Batch(network=NETWORK, host="t", seq=0, ts=time.time(), interval=2.0)
    host.collect(batch)
    now = time.time()
    device = DeviceState(
        listen_port=51820,
        peers={
            f"key{i}": PeerState(f"key{i}", (f"10.0.0.{i}/32",), None, 25, now - 30, i, i)
            for i in range(peers)
        },
    )
    peer_samples(
        batch,
        device,
        {f"p{i}": {"public_key": f"key{i}", "name": f"vm{i}"} for i in range(peers)},
        now,
    )
    for i in range(peers):
        batch.add("wireguard_peer_latency_seconds", 0.0004 + i / 1e5, peer=f"vm{i}")
    return batch.samples


def batches(agents: int, rounds: int, samples: list[Any], start: float) -> list[list[bytes]]:
    """Per agent, its ``rounds`` encoded batches (2 s apart, ending now)."""
    out = []
    for a in range(agents):
        own = []
        for r in range(rounds):
            b = metrics.Batch(NETWORK, f"vm{a}", r, start + 2 * r, 2.0, samples, f"h-{a}")
            b.sent = b.ts
            own.append(b.encode())
        out.append(own)
    return out


class Agents:
    """N agents' spools and publishers, connected, filled, then woken together."""

    def __init__(self, broker: Mosquitto, payloads: list[list[bytes]], tmp: Path, acks: bool):
        self.payloads = payloads
        creds = Broker(broker.url, AGENT_USER, AGENT_PASSWORD)
        self.spools = [Spool(tmp / f"spool-{a}") for a in range(len(payloads))]
        # resend_after: long enough that nothing is sent twice during a run, so the
        # publishers only send when woken.
        self.publishers = [
            Publisher(
                creds,
                f"bench-vm{a}-{os.getpid()}",
                metrics.topic(NETWORK, f"vm{a}"),
                spool,
                ack_topic=metrics.ack_topic(NETWORK, f"vm{a}") if acks else None,
                resend_after=3600.0,
            )
            for a, spool in enumerate(self.spools)
        ]
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(self, deadline: Deadline) -> None:
        self.tasks = [asyncio.create_task(p.run()) for p in self.publishers]

        async def connected() -> bool:
            return all(p.connected for p in self.publishers)

        await deadline.until(connected, f"{len(self.publishers)} publishers to connect")
        await asyncio.sleep(0.5)  # their ack subscriptions follow the connect
        for spool, own in zip(self.spools, self.payloads, strict=True):
            for body in own:
                spool.append(spool.next_seq(), body)

    def go(self) -> float:
        for p in self.publishers:
            p.wake.set()
        return time.monotonic()

    async def drained(self) -> bool:
        return all(len(s) == 0 for s in self.spools)

    async def close(self) -> None:
        await cancel_and_wait(self.tasks)


def make_agent_user(broker: Mosquitto) -> None:
    """One broker user for every simulated agent: publish metrics, read acks."""
    ctl = [
        "mosquitto_ctrl",
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-u",
        "admin",
        "-P",
        MQTT_ADMIN_PASSWORD,
        "dynsec",
    ]
    for cmd in (
        ["createRole", "bench-agents"],
        ["addRoleACL", "bench-agents", "publishClientSend", "cladnet/metrics/#", "allow", "5"],
        ["addRoleACL", "bench-agents", "subscribePattern", "cladnet/acks/#", "allow", "5"],
        ["createClient", AGENT_USER, "-p", AGENT_PASSWORD],
        ["addClientRole", AGENT_USER, "bench-agents", "5"],
    ):
        subprocess.run(ctl + cmd, check=True, capture_output=True, timeout=20)


def fresh_broker(tmp: Path, name: str) -> Mosquitto:
    broker = Mosquitto(tmp / f"mqtt-{name}", free_port())
    broker.start()
    make_agent_user(broker)
    return broker


def cpu_of(procs: dict[str, int]) -> dict[str, float]:
    return {k: cpu_seconds(pid) for k, pid in procs.items()}


def rate(samples: int, seconds: float) -> float:
    return round(samples / seconds, 1) if seconds > 0 else 0.0


# --- phases ----------------------------------------------------------------------------


async def broker_only(tmp: Path, payloads: list[list[bytes]], deadline: Deadline) -> dict[str, Any]:
    """Baseline: the same publishers and batches to a subscriber that only counts."""
    broker = fresh_broker(tmp, "baseline")
    total = sum(len(p) for p in payloads)
    agents = Agents(broker, payloads, tmp / "baseline", acks=False)
    got = 0
    subscribed = asyncio.Event()

    async def count() -> None:
        nonlocal got
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username="cladnet-collector",
            password=MQTT_COLLECTOR_PASSWORD,
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(f"$share/collectors/{metrics.TOPIC_ROOT}/#", qos=1)
            subscribed.set()
            async for _ in client.messages:
                got += 1

    counter = asyncio.create_task(count())
    try:
        async with asyncio.timeout(deadline.left("the baseline subscriber")):
            await subscribed.wait()
        await agents.connect(deadline)
        procs = {"mosquitto": broker.proc.pid if broker.proc else 0, "bench": os.getpid()}
        cpu0 = cpu_of(procs)
        started = agents.go()

        async def all_counted() -> bool:
            if counter.done():
                counter.result()  # the subscriber failed: say why
            return got >= total

        ended = await deadline.until(all_counted, "the subscriber to count every batch")
        cpu = {k: round(v - cpu0[k], 2) for k, v in cpu_of(procs).items()}
    finally:
        await agents.close()
        await cancel_and_wait([counter], aiomqtt.MqttError)
        broker.stop()
    seconds = ended - started
    return {
        "what": "same publishers (PUBACK only) → Mosquitto → one aiomqtt subscriber on "
        "$share/collectors/cladnet/metrics/# that counts messages",
        "batches": total,
        "received": got,
        "seconds": round(seconds, 3),
        "batches_per_s": rate(total, seconds),
        "cpu_seconds": cpu,
    }


async def end_to_end(
    tmp: Path,
    store: str,
    name: str,
    payloads: list[list[bytes]],
    samples_per_batch: int,
    deadline: Deadline,
) -> dict[str, Any]:
    """Publishers → Mosquitto → cladnet-collector → store, until queryable."""
    broker = fresh_broker(tmp, name)
    collector = Collector(broker, tmp / f"collector-{name}", free_port(), store=store)
    agents = Agents(broker, payloads, tmp / name, acks=True)
    total = sum(len(p) for p in payloads)
    last_ts = {f"vm{a}": json.loads(own[-1])["ts"] for a, own in enumerate(payloads)}
    http = httpx.AsyncClient(
        base_url=collector.url, headers={"Authorization": f"Bearer {collector.token}"}, timeout=10
    )
    try:
        collector.start()
        await agents.connect(deadline)
        procs = {
            "mosquitto": broker.proc.pid if broker.proc else 0,
            "collector": collector.proc.pid if collector.proc else 0,
            "bench": os.getpid(),
        }
        cpu0 = cpu_of(procs)
        started = agents.go()
        # Acknowledged by the collector = written to the store.
        acked = await deadline.until(agents.drained, "every batch to be acknowledged")

        polls: list[float] = []  # how long each check took: the clock's resolution

        async def queryable() -> bool:
            began = time.monotonic()
            r = await http.get("/v1/metrics/latest", params={"network": NETWORK})
            polls.append(time.monotonic() - began)
            hosts = r.json()["hosts"] if r.status_code == 200 else {}
            # VictoriaMetrics keeps milliseconds.
            return all(
                abs(hosts.get(h, {}).get("ts", 0.0) - ts) < 0.002 for h, ts in last_ts.items()
            )

        ended = await deadline.until(queryable, "every host's last batch to be queryable", 0.1)
        cpu = {k: round(v - cpu0[k], 2) for k, v in cpu_of(procs).items()}
        ingest = (await http.get("/v1/ingest")).json()
    finally:
        await http.aclose()
        await agents.close()
        collector.stop()
        broker.stop()
    counters = ingest["counters"]
    hosts = ingest["hosts"]
    seconds = ended - started
    samples = total * samples_per_batch
    return {
        "store": store.split(":")[0],
        "batches": total,
        "samples": samples,
        "seconds_to_acknowledged": round(acked - started, 3),
        "seconds_to_queryable": round(seconds, 3),
        # One check of /v1/metrics/latest (every series of the run): the last one, the
        # longest. The queryable clock stops only at the end of a check that succeeds.
        "query_seconds": {"last": round(polls[-1], 3), "max": round(max(polls), 3)},
        "samples_per_s": rate(samples, seconds),
        # Stored and acknowledged: VictoriaMetrics makes rows searchable a second or more
        # after it accepted them, which the collector cannot change.
        "samples_per_s_to_acknowledged": rate(samples, acked - started),
        "batches_per_s": rate(total, seconds),
        "cpu_seconds": cpu,
        "collector_cpu_us_per_sample": round(cpu["collector"] / samples * 1e6, 2),
        # CPU seconds (all threads) per second: near 1.0, the collector is CPU-bound.
        "collector_busy_fraction": round(cpu["collector"] / seconds, 2),
        "stored_batches": counters.get("batches", 0),
        "stored_samples": counters.get("samples", 0),
        "duplicates": counters.get("duplicates", 0),
        "rejected": counters.get("rejected", 0),
        "gaps": sum(h["gaps"] for h in hosts.values()),
        "hosts_seen": len(hosts),
        "zero_loss": counters.get("batches") == total
        and counters.get("samples") == samples
        and all(h["gaps"] == 0 and h["highest_seq"] == len(payloads[0]) - 1 for h in hosts.values())
        and len(hosts) == len(payloads),
    }


async def store_only(tmp: Path, store: str, payloads: list[list[bytes]]) -> dict[str, Any]:
    """Baseline: the same samples straight into a fresh store, in full flush-sized writes."""
    target = open_store(store, tmp / f"store-only-{store.split(':')[0]}")
    # Another network name, so VictoriaMetrics keeps these apart from the end-to-end run.
    flat = []
    for own in payloads:
        for body in own:
            b = metrics.decode(body)
            b.network = f"{NETWORK}-store"
            flat.extend(b.flat())
    try:
        started = time.monotonic()
        for i in range(0, len(flat), FLUSH_SAMPLES):
            await target.write(flat[i : i + FLUSH_SAMPLES])
        seconds = time.monotonic() - started
    finally:
        await target.close()
    return {
        "what": f"store.write() of the same samples in chunks of {FLUSH_SAMPLES:,}, "
        "decoding not timed, in this process",
        "samples": len(flat),
        "seconds": round(seconds, 3),
        "samples_per_s": rate(len(flat), seconds),
    }


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    deadline = Deadline(args.timeout)
    samples = template(args.peers)
    start = time.time() - 2 * args.batches
    payloads = batches(args.agents, args.batches, samples, start)
    out: dict[str, Any] = {
        "samples_per_batch": len(samples),
        "batch_bytes": len(payloads[0][0]),
        "total_samples": len(samples) * args.agents * args.batches,
    }
    log(f"baseline: {args.agents} publishers → Mosquitto → counting subscriber")
    base = await broker_only(tmp, payloads, deadline)
    base["samples_per_s"] = rate(out["total_samples"], base["seconds"])
    out["broker_only"] = base
    vm: Victoria | None = None
    try:
        for name in args.stores:
            store = "sqlite"
            if name == "victoria":
                vm = Victoria(tmp / "vm", free_port())
                vm.start()
                store = f"victoria:{vm.url}"
            log(f"{name}: {args.agents} publishers → Mosquitto → collector → store")
            e2e = await end_to_end(tmp, store, name, payloads, len(samples), deadline)
            log(f"{name}: store only")
            direct = await store_only(tmp, store, payloads)
            e2e["store_only"] = direct
            e2e["ratio_to_broker_only"] = round(e2e["samples_per_s"] / base["samples_per_s"], 3)
            e2e["ratio_to_store_only"] = round(e2e["samples_per_s"] / direct["samples_per_s"], 3)
            e2e["target_samples_per_s"] = TARGET_SAMPLES_PER_SECOND
            e2e["target_met"] = (
                e2e["zero_loss"] and e2e["samples_per_s"] >= TARGET_SAMPLES_PER_SECOND
            )
            out[name] = e2e
    finally:
        if vm is not None:
            vm.stop()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--agents", type=int, default=200, help="simulated agents (connections)")
    p.add_argument("--batches", type=int, default=50, help=f"batches per agent (≤ {MAX_BATCHES})")
    p.add_argument("--peers", type=int, default=8, help="WireGuard peers per batch")
    p.add_argument("--stores", default="sqlite,victoria", help="sqlite and/or victoria")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--smoke", action="store_true", help="20 agents x 10 batches, SQLite, < 30 s")
    args = p.parse_args(argv)
    if args.smoke:
        args.agents, args.batches, args.stores = 20, 10, "sqlite"
        args.timeout = min(args.timeout, 25.0)
    if not 1 <= args.batches <= MAX_BATCHES:
        p.error(f"--batches must be 1..{MAX_BATCHES}")
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not set(args.stores) <= {"sqlite", "victoria"}:
        p.error("--stores takes sqlite and/or victoria")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the JSON report and the summary line."""
    common.clean_up_on_sigterm()
    args = parse_args(argv)
    # The agent's publisher keeps 32 publishes in flight; aiomqtt warns above 10.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    began = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "cladnet.ingest",
        "inputs": {
            "agents": args.agents,
            "batches_per_agent": args.batches,
            "peers_per_batch": args.peers,
            "stores": args.stores,
            "timeout_seconds": args.timeout,
            "smoke": args.smoke,
            "load": "agent Spool + Publisher per simulated agent (own MQTT connection, "
            "QoS 1, end-to-end acks), all in this process; spools filled, then all woken",
        },
        "machine": common.machine_facts("aiomqtt", "paho-mqtt")
        | {
            "mosquitto_version": subprocess.run(
                ["mosquitto", "-h"], capture_output=True, text=True, timeout=10
            ).stdout.splitlines()[0]
        },
    }
    ok = False
    try:
        with tempfile.TemporaryDirectory(prefix="cladnet-bench-ingest-") as tmp:
            report |= asyncio.run(run(args, Path(tmp)))
        ok = all(report[s]["zero_loss"] for s in args.stores)
    except Exception as exc:  # reported in the JSON, exit status 1
        log(f"failed: {exc!r}")
        report["error"] = repr(exc)
    report["ok"] = ok
    report["duration_seconds"] = round(time.monotonic() - began, 1)
    print(json.dumps(report, separators=(",", ":")))
    parts = []
    for s in args.stores:
        if s in report:
            r = report[s]
            parts.append(
                f"{s} {r['samples_per_s']:,.0f} samples/s publish→queryable "
                f"({r['samples_per_s_to_acknowledged']:,.0f} to acknowledged) "
                f"(x{r['ratio_to_broker_only']} of broker-only, x{r['ratio_to_store_only']} of "
                f"store-only {r['store_only']['samples_per_s']:,.0f}), "
                f"{'zero loss' if r['zero_loss'] else 'LOSS'}"
            )
    if "broker_only" in report:
        parts.append(f"broker-only {report['broker_only']['samples_per_s']:,.0f} samples/s")
    print(
        f"ingest ({args.agents} agents x {args.batches} batches x "
        f"{report.get('samples_per_batch')} samples): "
        + "; ".join(parts)
        + (f"; target {TARGET_SAMPLES_PER_SECOND:,}" if parts else "")
        + ("" if ok else f" — FAILED {report.get('error', '')}")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
