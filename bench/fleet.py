#!/usr/bin/env python3
"""Fleet: real agents converging on one endpoint change, and what steady heartbeats
cost etcd per host.

    python -m bench.fleet                   # agents 100, 1,000; hosts 100, 1,000, 5,000
    python -m bench.fleet --sizes 100 --write-sizes 100,1000
    python -m bench.fleet --smoke           # 10 agents, 20 hosts (CI)

1. **Convergence** (issue 13, item 4), per N, on a fresh etcd and controller: N agents
   run the real agent code (``agent.daemon.NetworkAgent``'s list + watch loop, event
   coalescing, planning and state saves, against an in-memory WireGuard device that
   records what it is asked to do: ``MemoryBackend`` of bench/agent_scale.py), spread over
   two worker processes. Each joins through the controller (``POST /v1/join``) and holds
   its own list + watch stream with its own credential. One more host ("mover") then PUTs
   a new endpoint ``--changes`` times; per change, the time from just before the PUT to
   the moment each agent's device holds the new endpoint (CLOCK_MONOTONIC is shared by
   the processes). Reported: p50/p99 over every agent and change, the controller's CPU
   per change and per delivered event, the agents' CPU per agent per event (worker CPU
   over the change / agents). Same-run baseline: the raw watch-stream fan-out of
   bench/convergence.py (N streams read by one process, no agent code) at the same N,
   as a ratio. Every agent holds every other as a peer, so the fleet's memory and its
   initial listing grow with N²: a size whose estimate exceeds the machine's free memory
   is skipped and says so (5,000 agents: 25 M held peers). Agents start in waves of
   ``WAVE`` per worker, each once the previous wave holds every peer: 1,000 agents
   listing at once kept one controller saturated past the agents' request timeout.
   Once every device is complete the workers wait ``SETTLE_S`` (the last wave's first
   state saves and held-back keepalives) and freeze their heaps (``gc.freeze``): a real
   agent's garbage collector walks its own few MB, a worker's would walk hundreds of
   agents' at once. The longest collector pause per change is reported.
2. **etcd writes** (issue 13, item 2), per N, on a fresh etcd and controller: N hosts
   join with real credentials and heartbeat through the controller's HTTP API as the
   agent does (``POST /v1/hosts/{id}/heartbeat`` with unchanged addresses, every
   ``--heartbeat`` s, phases spread evenly) for ``--window`` s. A watch of etcd's whole
   ``/cladnet/`` keyspace counts every write (key + value bytes, by key kind); etcd's own
   ``etcd_mvcc_put_total`` is the cross-check. Reported: bytes and puts per host per
   minute (constant in N is the goal), and the heartbeats actually sent (the one bench
   process and controller share 2 cores with everything else).

Targets (p99 < 1 s at 1,000 agents, < 3 s at 5,000) are reported, never asserted.
Controller join limits are raised for the run (``CLADNET_JOIN_RATE``/``_BURST``): every
join comes from 127.0.0.1. Agent state goes to /dev/shm when it exists (the shared disk
is not the thing measured). One JSON object on stdout, then a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aetcd
import httpx

from agent.daemon import NetworkAgent
from agent.state import Membership, StateDir
from bench import common, convergence
from bench.agent_scale import MemoryBackend
from bench.common import cpu_seconds, percentile, rss_bytes
from cladnet.keys import generate_keypair
from cladnet.mesh import DeviceChanges
from lab.api import join, make_network, make_token
from lab.components import Controller, Etcd, free_port

WORKERS = 2
WAVE = 25  # agents per worker that list at once
SETTLE_S = 5.0  # after every device is complete, before the first change
SAMPLED_AGENTS = 200  # hosts with the agent code where all N would not fit in memory
TARGETS_P99_SECONDS = {1000: 1.0, 5000: 3.0}
CIDR = "10.64.0.0/16"
# Resident memory per peer an agent holds (its listed dict, plan, device entry), with
# slack; N agents hold N peers each. Checked against the measured figure in the report.
EST_BYTES_PER_HELD_PEER = 8 * 1024
CONTROLLER_ENV = {
    "CLADNET_WATCH_KEEPALIVE": "30",
    "CLADNET_JOIN_RATE": "100000",  # every join comes from 127.0.0.1
    "CLADNET_JOIN_BURST": "100000",
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON object plus one summary line."""
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def distribution(values: list[float]) -> dict[str, float | None]:
    s = sorted(values)
    return {
        "p50": ms(percentile(s, 50)),
        "p99": ms(percentile(s, 99)),
        "max": ms(s[-1] if s else None),
    }


class RecordingBackend(MemoryBackend):
    """The in-memory device, noting when a watched peer first holds the expected endpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.key: str | None = None
        self.want: str | None = None
        self.seen_at: float | None = None

    async def apply(
        self, name: str, changes: DeviceChanges, private_key: str | None = None
    ) -> None:
        await super().apply(name, changes, private_key)
        if self.seen_at is None and self.key is not None:
            held = self.peers.get(self.key)
            if held is not None and held.endpoint == self.want:
                self.seen_at = time.monotonic()


class GcPauses:
    """The longest garbage-collector pause since the last :meth:`take` (seconds)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.longest = 0.0

    def note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self.started)

    def take(self) -> float:
        longest, self.longest = self.longest, 0.0
        return longest


pauses = GcPauses()


# --- worker processes: many real agents each ---------------------------------------------


def worker(conn: Connection, cfg: dict[str, Any]) -> None:
    """A worker process: join ``cfg['indices']`` agents, run them, answer the main process."""
    # Quiet: each agent fails to bind its DNS server (its overlay address exists nowhere)
    # and says so on every refresh.
    logging.disable(logging.CRITICAL)
    common.clean_up_on_sigterm()  # a terminated worker still removes its state directory
    try:
        asyncio.run(_worker(conn, cfg))
    except Exception as exc:  # the main process reports it
        conn.send(("error", repr(exc)))


async def _join_agent(
    http: httpx.AsyncClient, cfg: dict[str, Any], index: int, root: Path
) -> NetworkAgent:
    private, public = generate_keypair()
    r = await http.post(
        "/v1/join",
        json={"token": cfg["token"], "hostname": f"fleet-{index}", "public_key": public,
              "listen_port": 51820},
    )  # fmt: skip
    r.raise_for_status()
    result = r.json()
    net = result["network"]
    me = {
        "id": result["host_id"],
        "name": result["hostname"],
        "network_id": net["id"],
        "public_key": public,
        "overlay_ip": result["overlay_ip"],
        "listen_port": 51820,
        "addresses": [],
        "public_address": result["observed_address"],
        "endpoints": [],
        "labels": {},
    }
    m = Membership(
        controller=cfg["url"], host_id=result["host_id"], interface="cl-fleet", network=net, me=me
    )
    agent = NetworkAgent(
        StateDir(root / str(index)), m, result["credential"], private, RecordingBackend()
    )
    agent._device_ready = True  # no link to configure: the device is in memory
    return agent


async def _worker(conn: Connection, cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()

    async def recv() -> Any:
        return await loop.run_in_executor(None, conn.recv)

    shm = cfg["state_root"]
    agents: list[NetworkAgent] = []
    tasks: list[asyncio.Task[None]] = []
    with tempfile.TemporaryDirectory(prefix="cl-fleet-", dir=shm) as tmp:
        http = httpx.AsyncClient(base_url=cfg["url"], timeout=60)
        gate = asyncio.Semaphore(16)

        async def join_one(index: int) -> None:
            async with gate:
                agents.append(await _join_agent(http, cfg, index, Path(tmp)))

        try:
            await asyncio.gather(*(join_one(i) for i in cfg["indices"]))
            await http.aclose()
            conn.send(("joined", len(agents)))
            _, expected = await recv()
            cpu0, started, rss0 = time.process_time(), time.monotonic(), rss_bytes(os.getpid())
            backends: list[RecordingBackend] = [a.backend for a in agents]  # type: ignore[misc]
            deadline = started + cfg["ready_timeout"]
            # Agents start in waves, each once the last holds every peer: all at once,
            # N lists of N peers pile up on the one controller past the client's timeout.
            for first in range(0, len(agents), cfg["wave"]):
                end = first + cfg["wave"]
                tasks += [asyncio.create_task(a.sync_loop()) for a in agents[first:end]]
                while any(len(b.peers) < expected for b in backends[first:end]):
                    if time.monotonic() > deadline:
                        short = sum(len(b.peers) < expected for b in backends)
                        raise TimeoutError(f"{short} agents' devices did not get every peer")
                    await asyncio.sleep(0.05)
            ready_s, ready_cpu = time.monotonic() - started, time.process_time() - cpu0
            # Settle: the last wave's first state saves and held-back keepalives are the
            # listing's tail, not a change's work.
            await asyncio.sleep(SETTLE_S)
            # Every agent's listing is long-lived now. A real agent's collector walks its
            # own heap only; here one worker's would walk hundreds of agents' at once.
            gc.collect()
            gc.freeze()
            gc.callbacks.append(pauses.note)
            conn.send(("ready", ready_s, ready_cpu, rss_bytes(os.getpid()), rss0))
            while True:
                msg = await recv()
                if msg[0] == "arm":
                    for b in backends:
                        b.key, b.want, b.seen_at = msg[1], msg[2], None
                    cpu0 = time.process_time()
                    conn.send(("armed",))
                elif msg[0] == "collect":
                    deadline = time.monotonic() + msg[1]
                    while any(b.seen_at is None for b in backends):
                        if time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.01)
                    conn.send(("seen", [b.seen_at for b in backends],
                               time.process_time() - cpu0, pauses.take()))  # fmt: skip
                else:
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for a in agents:
                for task in (a._apply_task, a._deferred, a._save_task):
                    if task is not None:
                        task.cancel()
                await a.client.close()


def stream_worker(conn: Connection, cfg: dict[str, Any]) -> None:
    """A worker process for the hosts without agent code (a sampled run): join
    ``cfg['count']`` hosts, each then watching the peers with its own credential on a
    raw stream (bench/convergence.py's reader), and note when each sees a change."""
    common.clean_up_on_sigterm()
    try:
        asyncio.run(_stream_worker(conn, cfg))
    except Exception as exc:  # the main process reports it
        conn.send(("error", repr(exc)))


async def _stream_worker(conn: Connection, cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    credentials: list[str] = []
    fanout = convergence.Fanout(cfg["count"])
    readers: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=cfg["url"], timeout=60) as http:

        async def join_one(index: int) -> None:
            async with gate:
                r = await http.post(
                    "/v1/join",
                    json={"token": cfg["token"], "hostname": f"fleet-s{index}",
                          "public_key": generate_keypair()[1], "listen_port": 51820},
                )  # fmt: skip
                r.raise_for_status()
                credentials.append(r.json()["credential"])

        await asyncio.gather(*(join_one(i) for i in range(cfg["count"])))
        conn.send(("joined", len(credentials)))
        await loop.run_in_executor(None, conn.recv)  # "start": the agents list meanwhile
        r = await http.get(
            f"/v1/networks/{cfg['network']}/peers",
            params={"limit": 1},
            headers={"Authorization": f"Bearer {credentials[0]}"},
        )
        r.raise_for_status()
        path = f"/v1/networks/{cfg['network']}/peers?watch=true&since={r.json()['revision']}"

    async def open_one(index: int) -> None:
        async with gate:
            reader, writer, _ = await asyncio.wait_for(
                convergence.open_stream(cfg["port"], path, credentials[index]), 60
            )
        writers.append(writer)
        readers.append(asyncio.create_task(convergence.read_stream(index, reader, fanout)))

    try:
        await asyncio.gather(*(open_one(i) for i in range(cfg["count"])))
        conn.send(("ready", 0.0, 0.0, rss_bytes(os.getpid()), rss_bytes(os.getpid())))
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg[0] == "arm":
                change = convergence.Change(marker=msg[2].encode(), watchers=cfg["count"])
                fanout.current = change
                cpu0 = time.process_time()
                conn.send(("armed",))
            elif msg[0] == "collect":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(change.done.wait(), msg[1])
                fanout.current = None
                # perf_counter and monotonic are the same clock on Linux (CLOCK_MONOTONIC).
                conn.send(("seen", change.arrivals, time.process_time() - cpu0, 0.0))
            else:
                break
    finally:
        await convergence.close_streams(writers, readers)


def _answer(conn: Connection, want: str, timeout: float) -> Any:
    """The worker's next message, which must be ``want``."""
    if not conn.poll(timeout):
        raise TimeoutError(f"a worker did not answer {want!r} within {timeout:.0f} s")
    msg = conn.recv()
    if msg[0] != want:
        raise RuntimeError(f"worker: {msg}")
    return msg


# --- 1. convergence with real agents -------------------------------------------------------


def start_etcd(tmp: Path, name: str) -> Etcd:
    port = free_port()
    etcd = Etcd(f"http://127.0.0.1:{port}", tmp / name, port, free_port())
    etcd.start()
    return etcd


def start_controller(etcd: Etcd, tmp: Path, name: str) -> Controller:
    ctl = Controller(etcd.url, tmp / name, free_port(), extra_env=dict(CONTROLLER_ENV))
    ctl.start()
    return ctl


def agents_run(n: int, changes: int, tmp: Path, real: int | None = None) -> dict[str, Any]:
    """N hosts, ``real`` of them (all by default) running the agent code in WORKERS
    processes and the rest raw watch streams in one more; ``changes`` endpoint changes
    of one more host."""
    real = n if real is None else real
    etcd = start_etcd(tmp, f"etcd-agents-{n}")
    ctl: Controller | None = None
    procs: list[Any] = []
    conns: list[Connection] = []
    streams: Connection | None = None
    try:
        ctl = start_controller(etcd, tmp, f"ctl-agents-{n}")
        assert ctl.proc is not None
        with ctl.client() as admin:
            net = make_network(admin, f"fleet-{n}", cidr=CIDR)
            token = make_token(admin, net["id"], max_uses=n + 1)
        _, mover_public = generate_keypair()
        r = join(ctl, token, "mover", public_key=mover_public)
        r.raise_for_status()
        mover = r.json()
        ctx = multiprocessing.get_context("spawn")
        # Fewer agents list at once when each listing is longer.
        wave = max(1, min(WAVE, WAVE * 1000 // n))
        for w in range(WORKERS):
            mine, theirs = ctx.Pipe()
            cfg = {"url": ctl.url, "token": token, "indices": list(range(w, real, WORKERS)),
                   "ready_timeout": 300 + n * 0.5, "wave": wave,
                   "state_root": "/dev/shm" if os.path.isdir("/dev/shm") else None}  # fmt: skip
            p = ctx.Process(target=worker, args=(theirs, cfg), name=f"cl-fleet-{w}")
            p.start()
            procs.append(p)
            conns.append(mine)
        if real < n:
            streams, theirs = ctx.Pipe()
            cfg = {"url": ctl.url, "port": ctl.port, "token": token, "count": n - real,
                   "network": net["id"]}  # fmt: skip
            p = ctx.Process(target=stream_worker, args=(theirs, cfg), name="cl-fleet-streams")
            p.start()
            procs.append(p)
        every = [*conns, *([streams] if streams is not None else [])]
        log(f"N={n}: joining {real} agents in {WORKERS} workers and {n - real} stream hosts")
        started = time.monotonic()
        for c in every:
            _answer(c, "joined", 120 + n * 0.2)
        join_s = time.monotonic() - started
        ctl_cpu0, started = cpu_seconds(ctl.proc.pid), time.monotonic()
        for c in every:
            c.send(("start", n))  # every other host and the mover
        ready = [_answer(c, "ready", 180 + n * 0.5) for c in every][: len(conns)]
        ready_s = time.monotonic() - started
        ready_ctl_cpu = cpu_seconds(ctl.proc.pid) - ctl_cpu0
        log(f"N={n}: every device holds {n} peers after {ready_s:.1f} s; changing the endpoint")
        latencies: list[float] = []
        stream_latencies: list[float] = []
        per_change, ctl_cpu, agent_cpu, gc_pause, missing = [], [], [], [], 0
        with ctl.client(token=mover["credential"]) as mc:
            for k in range(changes):
                time.sleep(0.5)  # let the previous change settle
                endpoint = f"198.51.100.{k + 1}:{51820 + k}"
                for c in every:
                    c.send(("arm", mover_public, endpoint))
                for c in every:
                    _answer(c, "armed", 60)
                cpu0 = cpu_seconds(ctl.proc.pid)
                sent = time.monotonic()
                mc.put(f"/v1/hosts/{mover['host_id']}/endpoints",
                       json={"endpoints": [endpoint]}).raise_for_status()  # fmt: skip
                for c in every:
                    c.send(("collect", 30 + n / 50))
                seen = [_answer(c, "seen", 120 + n / 50) for c in every]
                ctl_cpu.append(cpu_seconds(ctl.proc.pid) - cpu0)
                if streams is not None:
                    arrived = seen.pop()[1]
                    stream_latencies += [t - sent for t in arrived if t is not None]
                    missing += sum(t is None for t in arrived)
                agent_cpu.append(sum(s[2] for s in seen))
                gc_pause.append(max(s[3] for s in seen))
                arrivals = [t for s in seen for t in s[1]]
                lat = [t - sent for t in arrivals if t is not None]
                missing += len(arrivals) - len(lat)
                latencies += lat
                per_change.append(distribution(lat))
                log(f"N={n}: change {k + 1}: {per_change[-1]}, missing {len(arrivals) - len(lat)}")
        for c in every:
            c.send(("stop",))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        if ctl is not None:
            ctl.stop()
        etcd.stop()
    median = sorted(ctl_cpu)[len(ctl_cpu) // 2]
    rss = sum(r[3] for r in ready)
    held_rss = sum(r[3] - r[4] for r in ready)  # grown while listing: the held peers
    sampled = {}
    if real < n:
        sampled = {
            "hosts": n,
            "stream_hosts": n - real,
            "stream_hosts_latency_ms_all_changes": distribution(stream_latencies),
        }
    return {
        "agents": real,
        **sampled,
        "workers": WORKERS,
        "join_seconds": round(join_s, 1),
        "all_devices_complete_seconds": round(ready_s, 1),
        "initial_listing": {
            "controller_cpu_seconds": round(ready_ctl_cpu, 1),
            "workers_cpu_seconds": round(sum(r[2] for r in ready), 1),
        },
        "workers_rss_mb": round(rss / 2**20, 1),
        "rss_bytes_per_held_peer": round(held_rss / max(1, real * n)),
        "latency_ms_all_changes": distribution(latencies),
        "latency_ms_per_change": per_change,
        "missing": missing,
        "controller_cpu_ms_per_change": [round(x * 1000, 1) for x in ctl_cpu],
        "workers_longest_gc_pause_ms_per_change": [round(x * 1000, 1) for x in gc_pause],
        "controller_cpu_us_per_delivered_event": round(median / n * 1e6, 1),
        "agent_cpu_ms_per_agent_per_event": round(
            sorted(agent_cpu)[len(agent_cpu) // 2] / real * 1000, 3
        ),
    }


def agents_that_fit(n: int, cap: int | None) -> tuple[int, str | None]:
    """How many of N hosts run the agent code, and why not all: at most ``cap``, and
    all only when their N² held peers fit in memory (else SAMPLED_AGENTS or fewer)."""
    need = n * n * EST_BYTES_PER_HELD_PEER
    available = convergence.mem_available()
    if available >= need and (cap is None or cap >= n):
        return n, None
    fit = min(
        n, SAMPLED_AGENTS if cap is None else cap, available // 2 // (n * EST_BYTES_PER_HELD_PEER)
    )
    why = (f"{n} agents hold {n * n:,} peers: ~{need // 2**30} GiB estimated "
           f"({EST_BYTES_PER_HELD_PEER} B each), MemAvailable {available // 2**30} GiB"
           if available < need else f"--max-agents {cap}")  # fmt: skip
    return fit, f"{why}; {fit} hosts run the agent code, the other {n - fit} raw watch streams"


def convergence_size(
    n: int, changes: int, tmp: Path, index: int, cap: int | None = None
) -> dict[str, Any]:
    """Agents (all N, or a sample and raw streams for the rest) and the raw-stream
    baseline at one N."""
    real, reason = agents_that_fit(n, cap)
    if real < 2:
        log(f"N={n}: skipped: {reason}")
        return {"skipped": reason}
    if reason is not None:
        log(f"N={n}: sampled: {reason}")
    entry: dict[str, Any] = {"sampled": reason} if reason else {}
    try:
        entry["agents"] = agents_run(n, changes, tmp, real)
        gc.collect()
        etcd = start_etcd(tmp, f"etcd-streams-{n}")
        try:
            raw, _ = asyncio.run(convergence.controller_run(etcd, tmp, index, n, changes, 100))
        finally:
            etcd.stop()
        entry["raw_streams"] = {
            "what": "bench/convergence.py: N raw watch streams read by one process",
            "latency_ms_all_changes": raw["latency_ms_all_changes"],
            "missing": raw["missing_events"],
            "controller_cpu_us_per_delivered_event": raw["controller"][
                "cpu_us_per_delivered_event"
            ],
        }
        a99 = entry["agents"]["latency_ms_all_changes"]["p99"]
        r99 = raw["latency_ms_all_changes"]["p99"]
        entry["ratio_p99_agents_vs_raw_streams"] = round(a99 / r99, 2) if a99 and r99 else None
        if n in TARGETS_P99_SECONDS:
            entry["target"] = {
                "p99_ms_below": TARGETS_P99_SECONDS[n] * 1000,
                "met": a99 is not None
                and a99 < TARGETS_P99_SECONDS[n] * 1000
                and entry["agents"]["missing"] == 0,
            }
    except Exception as exc:  # reported; the next size still runs
        log(f"N={n}: failed: {exc!r}")
        entry["error"] = repr(exc)
    return entry


# --- 2. etcd writes per host per minute ---------------------------------------------------


async def etcd_metric(url: str, name: str) -> float:
    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(f"{url}/metrics")).text
    return sum(
        float(m[3]) for line in text.splitlines() if (m := _SAMPLE.match(line)) and m[1] == name
    )


def revision(etcd: Etcd) -> int:
    """etcd's current revision."""
    return int(
        json.loads(etcd.ctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"]["revision"]
    )


async def writes_run(n: int, window: float, heartbeat: float, tmp: Path) -> dict[str, Any]:
    """N hosts heartbeating for ``window`` s: etcd writes counted by a keyspace watch."""
    etcd = start_etcd(tmp, f"etcd-writes-{n}")
    ctl: Controller | None = None
    watcher = aetcd.Client(host="127.0.0.1", port=etcd.client_port, timeout=60)
    try:
        ctl = start_controller(etcd, tmp, f"ctl-writes-{n}")
        assert ctl.proc is not None
        with ctl.client() as admin:
            net = make_network(admin, f"writes-{n}", cidr=CIDR)
            token = make_token(admin, net["id"], max_uses=n)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=ctl.url, timeout=60, limits=limits) as http:
            gate = asyncio.Semaphore(32)
            hosts: list[tuple[str, str, list[str]]] = []

            async def join_one(i: int) -> None:
                addresses = [f"192.0.2.{i % 250 + 1}/24"]
                body = {"token": token, "hostname": f"h{i}", "public_key": generate_keypair()[1],
                        "listen_port": 51820, "addresses": addresses}  # fmt: skip
                async with gate:
                    r = await http.post("/v1/join", json=body)
                r.raise_for_status()
                hosts.append((r.json()["host_id"], r.json()["credential"], addresses))

            log(f"writes N={n}: joining {n} hosts")
            await asyncio.gather(*(join_one(i) for i in range(n)))
            sent, late = [0], [0.0]  # counted heartbeats, worst lateness

            async def beat(
                host_id: str, credential: str, addresses: list[str], counted: bool = True
            ) -> None:
                async with gate:
                    r = await http.post(
                        f"/v1/hosts/{host_id}/heartbeat",
                        json={"addresses": addresses, "listen_port": 51820},
                        headers={"Authorization": f"Bearer {credential}"},
                    )
                r.raise_for_status()
                sent[0] += counted

            async def host_loop(i: int, beats: int, t0: float) -> None:
                # Beat 0 is the warm-up (not counted): afterwards each host beats once per
                # interval, as an agent does. Phases spread over 90 % of the interval, so
                # the warm-up's writes are in before the counted window opens.
                for k in range(beats + 1):
                    at = t0 + (0.9 * i / n + k) * heartbeat
                    if (wait := at - time.monotonic()) > 0:
                        await asyncio.sleep(wait)
                    if k:
                        late[0] = max(late[0], time.monotonic() - at)
                    await beat(*hosts[i], counted=k > 0)

            await watcher.connect()
            watch = await watcher.watch_prefix(b"/cladnet/")
            counted: dict[str, list[int]] = {}  # key kind → [puts, bytes, deletes]
            opened = [2**63]  # etcd's revision when the counted window opened

            async def count() -> None:
                async for event in watch:
                    if event.kv.mod_revision <= opened[0]:
                        continue  # a warm-up write, late
                    kind = event.kv.key.split(b"/")[2].decode()
                    row = counted.setdefault(kind, [0, 0, 0])
                    if event.kind == "PUT":
                        row[0] += 1
                        row[1] += len(event.kv.key) + len(event.kv.value)
                    else:
                        row[2] += 1

            counter = asyncio.create_task(count())
            beats = max(1, round(window / heartbeat))
            log(f"writes N={n}: 1 + {beats} heartbeat(s) per host, every {heartbeat} s")
            t0 = time.monotonic()
            loops = asyncio.gather(*(host_loop(i, beats, t0) for i in range(n)))
            await asyncio.sleep(max(0.0, t0 + heartbeat - time.monotonic()))
            opened_at = time.monotonic()
            opened[0] = revision(etcd)
            puts0 = await etcd_metric(etcd.url, "etcd_mvcc_put_total")
            cpu0 = cpu_seconds(ctl.proc.pid)
            await loops
            elapsed = max(time.monotonic() - opened_at, beats * heartbeat)
            ctl_cpu = cpu_seconds(ctl.proc.pid) - cpu0
            await asyncio.sleep(1)  # the watch's last events
            puts = await etcd_metric(etcd.url, "etcd_mvcc_put_total") - puts0
            counter.cancel()
            await asyncio.gather(counter, return_exceptions=True)
    finally:
        with contextlib.suppress(Exception):
            await watcher.close()
        if ctl is not None:
            ctl.stop()
        etcd.stop()
    minutes = elapsed / 60
    total_bytes = sum(r[1] for r in counted.values())
    total_puts = sum(r[0] for r in counted.values())
    fields = ("puts", "bytes", "deletes")
    return {
        "hosts": n,
        "window_seconds": round(elapsed, 1),
        "heartbeats_sent": sent[0],
        "heartbeats_per_host_per_minute": round(sent[0] / n / minutes, 2),
        "worst_heartbeat_lateness_s": round(late[0], 2),
        "etcd_write_bytes_per_host_per_minute": round(total_bytes / n / minutes, 1),
        "etcd_puts_per_host_per_minute": round(total_puts / n / minutes, 2),
        "etcd_write_bytes_per_heartbeat": round(total_bytes / max(1, sent[0]), 1),
        "etcd_write_bytes_per_put": round(total_bytes / max(1, total_puts), 1),
        "by_key_kind": {k: dict(zip(fields, r, strict=True)) for k, r in counted.items()},
        "etcd_mvcc_put_total_delta": puts,
        "controller_cpu_ms_per_heartbeat": round(ctl_cpu * 1000 / max(1, sent[0]), 2),
    }


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000", help="agent counts (convergence)")
    p.add_argument("--write-sizes", default="100,1000,5000", help="host counts (etcd writes)")
    p.add_argument("--changes", type=int, default=5, help="endpoint changes per size")
    p.add_argument("--heartbeat", type=float, default=10.0, help="the agent's interval (s)")
    p.add_argument("--window", type=float, default=60.0, help="writes counted for this long")
    p.add_argument(
        "--max-agents",
        type=int,
        help="at most this many hosts of a size run the agent code, the rest hold raw "
        f"watch streams (default: all N when they fit in memory, else {SAMPLED_AGENTS})",
    )
    p.add_argument("--smoke", action="store_true", help="small and short, for CI")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    args.write_sizes = [int(s) for s in str(args.write_sizes).split(",") if s.strip()]
    if args.smoke:
        # A 6-s heartbeat still exceeds the controller's 5-s liveness throttle, so every
        # heartbeat writes as at 10 s; figures are per minute either way.
        args.sizes, args.write_sizes, args.changes = [10], [20], 3
        args.max_agents = 6  # and 4 stream hosts: both kinds of host run in CI
        args.heartbeat, args.window = 6.0, 6.0
    return args


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    convergence.raise_fd_limit(2 * max([*args.sizes, *args.write_sizes]) + 512)
    sizes = {
        str(n): convergence_size(n, args.changes, tmp, i, args.max_agents)
        for i, n in enumerate(args.sizes)
    }
    writes: dict[str, Any] = {}
    for n in args.write_sizes:
        try:
            writes[str(n)] = asyncio.run(writes_run(n, args.window, args.heartbeat, tmp))
        except Exception as exc:
            log(f"writes N={n}: failed: {exc!r}")
            writes[str(n)] = {"error": repr(exc)}
    per_host = [w["etcd_write_bytes_per_host_per_minute"] for w in writes.values() if "hosts" in w]
    return {
        "convergence": sizes,
        "etcd_writes": writes,
        "writes_scaling": {
            # ~1.0: each host costs etcd the same bytes whatever the fleet's size.
            "max_over_min_bytes_per_host_per_minute": round(max(per_host) / min(per_host), 3)
            if per_host and min(per_host)
            else None,
        },
        "ok": all("error" not in e for e in [*sizes.values(), *writes.values()])
        and all(e["agents"]["missing"] == 0 for e in sizes.values() if "agents" in e),
    }


def summary(report: dict[str, Any]) -> str:
    parts = []
    for n, e in report["convergence"].items():
        if "agents" in e:
            a, r = e["agents"], e["raw_streams"]
            who = f"{n} hosts ({a['agents']} with agent code)" if "hosts" in a else f"{n} agents"
            parts.append(
                f"{who}: p50 {a['latency_ms_all_changes']['p50']} / p99 "
                f"{a['latency_ms_all_changes']['p99']} ms (raw streams p99 "
                f"{r['latency_ms_all_changes']['p99']} ms, x{e['ratio_p99_agents_vs_raw_streams']})"
                + (
                    f", target {'met' if e['target']['met'] else 'NOT met'}"
                    if "target" in e
                    else ""
                )
            )
        else:
            parts.append(f"{n} agents: {e.get('skipped') or e.get('error')}")
    for n, w in report["etcd_writes"].items():
        parts.append(
            f"{n} hosts: {w['etcd_write_bytes_per_host_per_minute']} etcd B/host/min"
            if "hosts" in w
            else f"{n} hosts: {w['error']}"
        )
    return "fleet: " + "; ".join(parts) + ("" if report["ok"] else " — FAILED")


def main(argv: list[str] | None = None) -> int:
    common.clean_up_on_sigterm()
    args = parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "cladnet.fleet",
        "inputs": {
            "sizes": args.sizes,
            "write_sizes": args.write_sizes,
            "changes_per_size": args.changes,
            "heartbeat_seconds": args.heartbeat,
            "window_seconds": args.window,
            "workers": WORKERS,
            "max_agents": args.max_agents,
            "smoke": args.smoke,
            "device": "in-memory recording backend (no wireguard-go)",
            "controller_env": CONTROLLER_ENV,
        },
        "machine": convergence.machine_facts(),
    }
    with tempfile.TemporaryDirectory(prefix="cl-bench-fleet-") as tmp:
        report |= run(args, Path(tmp))
    report["duration_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=1))
    print(summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
