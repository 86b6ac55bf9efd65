#!/usr/bin/env python3
"""Concurrent joins per second through one and through two controllers on one real etcd.

One command, one JSON object on stdout (inputs, machine facts, every figure, the
same-run baseline, ratios), then a one-line human summary. Progress goes to stderr.

    /work/venv/bin/python bench/joins.py            # 1,000 joins, concurrency 64
    /work/venv/bin/python bench/joins.py --smoke    # 100 joins (CI)

Phases, all on one throwaway etcd:

1. baseline: the same number of ``create_revision == 0`` puts straight to etcd with
   aetcd at the same concurrency (the raw cost of "a unique key"), plus a txn shaped
   like a join (3 compares, 6 puts) for context;
2. N joins through ONE controller;
3. N joins through TWO controllers (the client's connections split evenly).

The client is a minimal keep-alive HTTP/1.1 connection per worker (``JoinConnection``)
with the request bodies (and keys) made beforehand: what it spends per join is the
load generator's, on the same 2 cores as the controllers and etcd, so it is kept small
and reported (``cpu_seconds.bench_client``).

Each controller limits joins per source address (``--join-rate``/``--join-burst``, left
at their defaults here). A fleet joins from many addresses; so does the bench: its
connections bind loopback source addresses (127.P.0.K, a fresh block per phase, one
address per 8 connections), so a phase's joins are spread over several sources, each
well under the burst.
The report names the limit, the sources and the most joins one source made (counted
from the addresses the controller observed, not from what the bench meant to do).

For each controller phase: joins/s, p50/p99/max latency, txn retries (scraped from
each controller's ``/metrics``), etcd RPCs per join (from etcd's ``/metrics``), CPU
seconds per process, and duplicates: overlay IPs / host ids repeated in the
responses or in ``GET /v1/networks/{id}/peers``. Any duplicate, failed join or
peer-list mismatch makes the exit status 1. The 500 joins/s target (issue 13: with two
controllers) is reported, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd
import httpx
from aetcd import transactions as tx

from bench import common
from bench.common import cpu_seconds, percentile
from cladnet.keys import generate_keypair
from controller.config import Settings
from lab.components import Controller, Etcd, free_port

TARGET_JOINS_PER_SECOND = 500.0
CONNECTIONS_PER_SOURCE = 8
# The controllers run with their default per-source join limit; no source may need
# more than this share of its burst in one phase.
LIMIT = Settings()
MAX_SOURCE_SHARE = 0.5


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON object plus one summary line."""
    print(f"[joins {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- facts and small statistics --------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    return {
        **common.machine_facts("aetcd", "httpx", "uvicorn"),
        # Without sniffio, httpcore retries `import sniffio` (a failing path search)
        # for every pooled-connection lock: ~15% of this client's CPU.
        "sniffio_installed": common.dist_version("sniffio") is not None,
    }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def own_cpu_seconds() -> float:
    return cpu_seconds(os.getpid())


# --- Prometheus scraping ---------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(url: str) -> list[tuple[str, str, float]]:
    """(name, labels, value) of every sample at a Prometheus text endpoint."""
    text = httpx.get(url, timeout=10).text
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples.append((match[1], match[2] or "", float(match[3])))
    return samples


def metric_sum(samples: list[tuple[str, str, float]], name: str, label_filter: str = "") -> float:
    return sum(v for n, labels, v in samples if n == name and label_filter in labels)


def etcd_rpcs(etcd_url: str) -> dict[str, float]:
    """etcd's handled unary KV RPCs by method (Range, Txn, Put…), cumulative."""
    out: dict[str, float] = {}
    for name, labels, value in scrape(f"{etcd_url}/metrics"):
        if name == "grpc_server_handled_total" and 'grpc_service="etcdserverpb.KV"' in labels:
            method = re.search(r'grpc_method="([^"]+)"', labels)
            if method:
                out[method[1]] = out.get(method[1], 0.0) + value
    return out


# --- load generator --------------------------------------------------------------------


@dataclass
class LoadResult:
    """Latencies and wall time of ``count`` calls run ``concurrency`` at a time."""

    seconds: float
    latencies: list[float]
    outcomes: list[Any] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "count": len(lat),
            "seconds": round(self.seconds, 3),
            "per_second": round(len(lat) / self.seconds, 1) if self.seconds else None,
            "latency_ms": {
                "p50": ms(percentile(lat, 50)),
                "p90": ms(percentile(lat, 90)),
                "p99": ms(percentile(lat, 99)),
                "max": ms(lat[-1] if lat else None),
                "mean": ms(sum(lat) / len(lat) if lat else None),
            },
        }


async def run_load(
    count: int, concurrency: int, call: Callable[[int, int], Awaitable[Any]]
) -> LoadResult:
    """Run ``call(i, worker)`` for i in 0..count-1 with exactly ``concurrency`` in flight.

    A fixed pool of workers pulling indices (not a semaphore over ``count`` tasks):
    the latency measured is the call's own, not time spent queued behind the limit.
    """
    latencies = [0.0] * count
    outcomes: list[Any] = [None] * count
    next_index = 0

    async def worker(w: int) -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            outcomes[i] = await call(i, w)
            latencies[i] = time.perf_counter() - started

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(min(concurrency, count))))
    return LoadResult(time.perf_counter() - started, latencies, outcomes)


# --- the joining client ----------------------------------------------------------------


@dataclass
class Reply:
    """A controller's answer: its status and its JSON body."""

    status_code: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class JoinConnection:
    """One keep-alive HTTP/1.1 connection from a given source address, one request at a
    time: the load generator's side of a join costs a few socket calls and a JSON parse.

    httpx cost this bench about as much CPU per join as the controller did (≈ 1 ms), on
    the same 2 cores; the controllers parse the requests with the same server either way.
    """

    IDLE_SECONDS = 2.0  # reconnect first: uvicorn closes connections idle for 5 s

    def __init__(self, url: str, source: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        self.host, self.port, self.source = parts.hostname, parts.port, source
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._used = 0.0

    async def post(self, path: str, body: bytes) -> Reply:
        """POST ``body`` (JSON) to ``path``; the reply, or an exception on a broken connection."""
        if self._streams is not None and time.monotonic() - self._used > self.IDLE_SECONDS:
            await self.aclose()
        if self._streams is None:
            self._streams = await asyncio.open_connection(
                self.host, self.port, local_addr=(self.source, 0)
            )
        reader, writer = self._streams
        try:
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s"
                % (path.encode(), self.host.encode(), self.port, len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in lines[1:]
                if line[:15].lower() == b"content-length:"
            )
            reply = Reply(status, await reader.readexactly(length))
        except BaseException:
            await self.aclose()
            raise
        self._used = time.monotonic()
        return reply

    async def aclose(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# --- baseline: raw etcd transactions ---------------------------------------------------


async def etcd_baseline(
    host: str, port: int, count: int, concurrency: int, run_id: str
) -> dict[str, Any]:
    """``count`` create_revision==0 puts, and as many join-shaped txns, through one aetcd client.

    Same client library and concurrency as the controller uses, so the ratio says how
    much of etcd's transaction rate a join keeps.
    """
    client = aetcd.Client(host=host, port=port, timeout=30)
    await client.connect()
    try:
        # Warm the channel so connection set-up is not timed.
        for i in range(20):
            await client.put(f"/bench/warm/{run_id}/{i}".encode(), b"x")

        async def unique_put(i: int, _worker: int) -> bool:
            key = f"/bench/raw/{run_id}/{i}".encode()
            ok, _ = await client.transaction(
                compare=[tx.Create(key) == 0], success=[tx.Put(key, b"x")], failure=[]
            )
            return bool(ok)

        raw = await run_load(count, concurrency, unique_put)

        # aetcd needs an explicit failure list (None crashes in _ops_to_requests).
        # What one join writes: 3 compares, 6 puts, a ~400-byte peer record.
        peer_json = b"p" * 400
        network_key = f"/bench/joinlike/{run_id}/network".encode()
        await client.put(network_key, b"n")

        async def join_shaped(i: int, _worker: int) -> bool:
            base = f"/bench/joinlike/{run_id}/{i}"
            keys = [f"{base}/{k}".encode() for k in ("ip", "name", "host", "peer", "live", "use")]
            ok, _ = await client.transaction(
                compare=[
                    tx.Create(keys[0]) == 0,
                    tx.Create(keys[1]) == 0,
                    tx.Create(network_key) > 0,
                ],
                success=[tx.Put(k, peer_json if k.endswith(b"peer") else b"x" * 60) for k in keys],
                failure=[],
            )
            return bool(ok)

        shaped = await run_load(count, concurrency, join_shaped)
    finally:
        await client.close()
    raw_fig = raw.figures() | {"succeeded": sum(1 for ok in raw.outcomes if ok)}
    shaped_fig = shaped.figures() | {"succeeded": sum(1 for ok in shaped.outcomes if ok)}
    return {
        "what": "aetcd.Client.transaction(compare=[Create(key)==0], success=[Put(key,b'x')]) "
        "from this process, one client (one gRPC channel), distinct keys",
        "etcd_raw_txn": raw_fig,
        "etcd_join_shaped_txn": shaped_fig
        | {"what": "3 create_revision compares + 6 puts (one ~400 B) per txn, like a join"},
    }


# --- controller phases -----------------------------------------------------------------


def cidr_for(count: int, index: int) -> str:
    """A distinct 10.x network with at least 2x headroom over ``count`` hosts.

    Headroom as an operator would plan it (the controller recommends 2x): a nearly
    full network would measure random-probe collisions, not join throughput.
    """
    prefix = 32 - max(4, math.ceil(math.log2(2 * count + 2)))
    size = 2 ** (32 - prefix)
    base = int(ipaddress.IPv4Address("10.64.0.0")) + index * max(size, 2**16)
    return str(ipaddress.IPv4Network((base, prefix)))


def source_address(phase: int, index: int) -> str:
    """The loopback address a phase's ``index``-th client joins from: 127.<phase+1>.x.y
    (never 127.0.0.1, which the admin calls use)."""
    base = int(ipaddress.IPv4Address("127.0.0.0")) + (phase + 1) * 65536
    return str(ipaddress.IPv4Address(base + 1 + index))


def setup_network(admin: httpx.Client, name: str, cidr: str, hosts: int) -> tuple[str, str]:
    """Create a network and an unlimited join token; return (network id, token)."""
    r = admin.post("/v1/networks", json={"name": name, "cidr": cidr, "expected_hosts": hosts})
    r.raise_for_status()
    net_id = r.json()["id"]
    r = admin.post(f"/v1/networks/{net_id}/tokens", json={"ttl_seconds": 3600})
    r.raise_for_status()
    return net_id, r.json()["token"]


async def join_phase(
    controllers: list[Controller],
    etcd: Etcd,
    name: str,
    cidr: str,
    count: int,
    concurrency: int,
    warmup: int,
    phase: int,
) -> dict[str, Any]:
    """``count`` joins spread round-robin over ``controllers``, from clients with their
    own loopback source addresses; figures + correctness checks."""
    with controllers[0].client() as admin:
        net_id, token = setup_network(admin, name, cidr, count + warmup)
    # Keys up front: key generation is the agent's cost, not the controller's.
    bodies = [
        json.dumps(
            {
                "token": token,
                "hostname": f"{name}-vm-{i}",
                "public_key": generate_keypair()[1],
                "listen_port": 51820,
            }
        ).encode()
        for i in range(count + warmup)
    ]
    # One source address per CONNECTIONS_PER_SOURCE connections, and enough of them
    # that none needs more than MAX_SOURCE_SHARE of a controller's per-source burst.
    n_sources = max(len(controllers), math.ceil(concurrency / CONNECTIONS_PER_SOURCE))
    n_sources = max(n_sources, math.ceil((count + warmup) / (MAX_SOURCE_SHARE * LIMIT.join_burst)))
    n_sources += -n_sources % len(controllers)  # the same number for every controller
    sources = [source_address(phase, k) for k in range(n_sources)]
    # Worker w keeps one connection, from sources[w % n_sources], to the controller of
    # that source: the workers split evenly between the controllers.
    connections = [
        JoinConnection(controllers[(w % n_sources) % len(controllers)].url, sources[w % n_sources])
        for w in range(concurrency)
    ]

    def joiner(bodies: list[bytes]) -> Callable[[int, int], Awaitable[Reply | Exception]]:
        async def one_join(i: int, worker: int) -> Reply | Exception:
            try:
                return await connections[worker].post("/v1/join", bodies[i])
            except Exception as exc:  # counted as a failed join, not a crash
                return exc

        return one_join

    try:
        # Warm-up joins (not timed, but checked like the rest): open every connection
        # and let each controller's first-request costs pass.
        warm = await run_load(warmup, concurrency, joiner(bodies[:warmup]))

        retries_before = [
            metric_sum(scrape(f"{c.url}/metrics"), "cladnet_controller_txn_retries_total")
            for c in controllers
        ]
        rpcs_before = etcd_rpcs(etcd.url)
        procs = {
            **{f"controller_{i}": c.proc.pid for i, c in enumerate(controllers) if c.proc},
            "etcd": etcd.proc.pid if etcd.proc else 0,
        }
        cpu_before = {k: cpu_seconds(pid) for k, pid in procs.items()}
        client_cpu_before = own_cpu_seconds()

        load = await run_load(count, concurrency, joiner(bodies[warmup:]))

        cpu = {k: round(cpu_seconds(pid) - cpu_before[k], 2) for k, pid in procs.items()}
        cpu["bench_client"] = round(own_cpu_seconds() - client_cpu_before, 2)
        rpcs_after = etcd_rpcs(etcd.url)
        retries = [
            metric_sum(scrape(f"{c.url}/metrics"), "cladnet_controller_txn_retries_total") - before
            for c, before in zip(controllers, retries_before, strict=True)
        ]
    finally:
        for connection in connections:
            await connection.aclose()

    responses: list[Reply | Exception] = [*warm.outcomes, *load.outcomes]
    ok = [r.json() for r in responses if isinstance(r, Reply) and r.status_code == 200]
    errors: dict[str, int] = {}
    for r in responses:
        if isinstance(r, Exception):
            key = type(r).__name__
        elif r.status_code != 200:
            try:
                key = f"{r.status_code} {r.json().get('error', '?')}"
            except ValueError:
                key = str(r.status_code)
        else:
            continue
        errors[key] = errors.get(key, 0) + 1
    ips = [j["overlay_ip"] for j in ok]
    per_source: dict[str, int] = {}
    for j in ok:
        per_source[j["observed_address"]] = per_source.get(j["observed_address"], 0) + 1
    host_ids = [j["host_id"] for j in ok]
    with controllers[-1].client() as admin:
        peers = admin.get(f"/v1/networks/{net_id}/peers").json()["peers"]
    peer_ips = [p["overlay_ip"] for p in peers]
    network = ipaddress.IPv4Network(cidr)
    checks = {
        "joins_ok": len(ok),
        "joins_failed": len(responses) - len(ok),
        "errors": errors,
        "duplicate_ips_in_responses": len(ips) - len(set(ips)),
        "duplicate_host_ids_in_responses": len(host_ids) - len(set(host_ids)),
        "duplicate_ips_in_peers": len(peer_ips) - len(set(peer_ips)),
        "peers_listed": len(peers),
        "responses_missing_from_peers": len(set(ips) - set(peer_ips)),
        "peers_not_in_responses": len(set(peer_ips) - set(ips)),
        "ips_outside_cidr": sum(1 for ip in ips if ipaddress.IPv4Address(ip) not in network),
        # Sources as the controllers saw them: joins from elsewhere than the bench's own
        # addresses would mean the spread did not happen as reported.
        "sources_observed": len(per_source),
        "joins_from_unexpected_sources": sum(
            n for src, n in per_source.items() if src not in set(sources)
        ),
        "max_joins_per_source": max(per_source.values(), default=0),
    }
    figures = load.figures()
    rpc_delta = {
        m: round((rpcs_after.get(m, 0.0) - rpcs_before.get(m, 0.0)) / count, 2)
        for m in sorted(rpcs_after)
        if rpcs_after.get(m, 0.0) - rpcs_before.get(m, 0.0) > 0
    }
    return {
        "controllers": len(controllers),
        "http_clients": f"{concurrency} keep-alive connections (JoinConnection)",
        "source_addresses": f"{sources[0]}..{sources[-1]} "
        f"(each for {CONNECTIONS_PER_SOURCE} connections)",
        "network_cidr": cidr,
        "warmup_joins": len(warm.outcomes),
        "joins_per_second": figures["per_second"],
        "seconds": figures["seconds"],
        "latency_ms": figures["latency_ms"],
        "txn_retries": {"total": int(sum(retries)), "per_controller": [int(r) for r in retries]},
        "etcd_rpcs_per_join": rpc_delta,
        "cpu_seconds": cpu,
        "controller_cpu_ms_per_join": round(
            sum(v for k, v in cpu.items() if k.startswith("controller")) / count * 1000, 2
        ),
        "checks": checks,
    }


def phase_failures(label: str, phase: dict[str, Any]) -> list[str]:
    """Correctness problems of one phase (each makes the exit status 1)."""
    c = phase["checks"]
    problems = [
        f"{label}: {key}={c[key]}"
        for key in (
            "joins_failed",
            "duplicate_ips_in_responses",
            "duplicate_host_ids_in_responses",
            "duplicate_ips_in_peers",
            "responses_missing_from_peers",
            "peers_not_in_responses",
            "ips_outside_cidr",
            "joins_from_unexpected_sources",
        )
        if c[key]
    ]
    if c["joins_ok"] + c["joins_failed"] == 0:
        problems.append(f"{label}: no joins were made")
    return problems


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--joins", type=int, default=1000, help="timed joins per phase")
    p.add_argument("--concurrency", type=int, default=64, help="joins in flight (in total)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed joins first (default: concurrency)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny and fast: 100 joins (for CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.joins = 100
    if args.warmup is None:
        args.warmup = args.concurrency  # one per pooled connection
    return args


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    etcd = Etcd.serving(tmp / "etcd")
    controllers: list[Controller] = []
    try:
        log(f"starting etcd on {etcd.url}")
        etcd.start()
        for i in range(2):
            ctl = Controller(etcd_url=etcd.url, state_dir=tmp / f"controller-{i}", port=free_port())
            controllers.append(ctl)
            ctl.start()
        log(f"controllers on {[c.url for c in controllers]}")

        log(f"baseline: {args.joins} raw etcd txns at concurrency {args.concurrency}")
        baseline = await etcd_baseline(
            "127.0.0.1", etcd.client_port, args.joins, args.concurrency, run_id="b"
        )
        log(f"  {baseline['etcd_raw_txn']['per_second']} txn/s")

        log(f"one controller: {args.joins} joins at concurrency {args.concurrency}")
        one = await join_phase(
            controllers[:1],
            etcd,
            "bench-one",
            cidr_for(args.joins, 0),
            args.joins,
            args.concurrency,
            args.warmup,
            phase=0,
        )
        log(f"  {one['joins_per_second']} joins/s")

        log(f"two controllers: {args.joins} joins at concurrency {args.concurrency}")
        two = await join_phase(
            controllers,
            etcd,
            "bench-two",
            cidr_for(args.joins, 1),
            args.joins,
            args.concurrency,
            args.warmup,
            phase=1,
        )
        log(f"  {two['joins_per_second']} joins/s")
    finally:
        for ctl in controllers:
            ctl.stop()
        etcd.stop()

    raw_rate = baseline["etcd_raw_txn"]["per_second"]
    failures = phase_failures("one_controller", one) + phase_failures("two_controllers", two)
    return {
        "baseline": baseline,
        "results": {"one_controller": one, "two_controllers": two},
        "ratios": {
            "one_controller_joins_per_etcd_txn": round(one["joins_per_second"] / raw_rate, 4),
            "two_controllers_joins_per_etcd_txn": round(two["joins_per_second"] / raw_rate, 4),
            "two_vs_one_controller": round(two["joins_per_second"] / one["joins_per_second"], 3),
            "one_controller_joins_per_join_shaped_txn": round(
                one["joins_per_second"] / baseline["etcd_join_shaped_txn"]["per_second"], 4
            ),
        },
        "target": {
            "joins_per_second": TARGET_JOINS_PER_SECOND,
            "met_one_controller": one["joins_per_second"] >= TARGET_JOINS_PER_SECOND,
            "met_two_controllers": two["joins_per_second"] >= TARGET_JOINS_PER_SECOND,
        },
        "ok": not failures,
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    common.clean_up_on_sigterm()
    args = parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "cladnet.joins",
        "inputs": {
            "joins_per_phase": args.joins,
            "concurrency": args.concurrency,
            "warmup_joins": args.warmup,
            "smoke": args.smoke,
            "client": f"{args.concurrency} keep-alive HTTP/1.1 connections (JoinConnection, "
            "one per worker), split evenly between controllers; a fixed pool of workers "
            "keeps exactly `concurrency` joins in flight",
            "join_limit_per_source": {
                "rate_per_second": LIMIT.join_rate,
                "burst": LIMIT.join_burst,
                "how": "the controllers' defaults, unchanged; the bench's connections "
                f"join from 127.x.y.z source addresses, one per {CONNECTIONS_PER_SOURCE}",
            },
        },
        "machine": machine_facts(),
    }
    with tempfile.TemporaryDirectory(prefix="cladnet-bench-joins-") as tmp:
        report |= asyncio.run(run(args, Path(tmp)))
    report["duration_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, separators=(",", ":")))
    one = report["results"]["one_controller"]
    two = report["results"]["two_controllers"]
    target = report["target"]
    print(
        f"joins: 1 controller {one['joins_per_second']}/s "
        f"(p50 {one['latency_ms']['p50']} ms, p99 {one['latency_ms']['p99']} ms), "
        f"2 controllers {two['joins_per_second']}/s "
        f"(p50 {two['latency_ms']['p50']} ms, p99 {two['latency_ms']['p99']} ms); "
        f"raw etcd txn {report['baseline']['etcd_raw_txn']['per_second']}/s "
        f"(ratio {report['ratios']['one_controller_joins_per_etcd_txn']}); "
        f"retries {one['txn_retries']['total']}+{two['txn_retries']['total']}; "
        f"target {TARGET_JOINS_PER_SECOND:.0f}/s: "
        f"1 ctl {'met' if target['met_one_controller'] else 'NOT met'}, "
        f"2 ctl {'met' if target['met_two_controllers'] else 'NOT met'}; "
        f"{'OK' if report['ok'] else 'FAILED: ' + '; '.join(report['failures'])}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
