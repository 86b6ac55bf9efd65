#!/usr/bin/env python3
"""Full mesh over real agents and real WireGuard: from ``POST /v1/groups`` to every
ordered pair answering a ping, for groups of 4 / 8 / 16 (up to 64) VMs of the ``local`` driver
spread over three clouds (two with the same private subnet), and from a VM's public
address change to restored pings; against a hand-configured wireguard-go mesh of the
same size measured in the same run (root; wireguard-go).

    python -m bench.mesh                    # sizes 4, 8, 16; in-place NAT change + resume
    python -m bench.mesh --sizes 16,64      # other sizes (2 to 64 VMs)
    python -m bench.mesh --smoke            # 4 VMs, one address change (resume); < 90 s

Method:
- etcd, the controller and the ``local`` driver are real (as tests/test_driver_local.py
  runs them); a VM is a namespace behind its cloud's stateless 1:1 NAT and boots the
  real ``cladnet-agent`` (userspace backend: wireguard-go) from the group's user-data;
- per size N: seconds from the POST to every VM ``Running``, to every VM having an
  overlay address, and to the full mesh: every ordered pair (a→b) has answered one
  ICMP echo over the overlay. The group is then deleted and gone (records and
  namespaces) before the next size;
- pings: one raw ICMP socket opened inside each source namespace; every pair not yet
  answered gets an echo request every ``PROBE_INTERVAL`` s (stretched so that all
  pairs together get at most ``PROBE_RATE`` a second: 64 VMs), all pairs in parallel,
  from one loop. ``ip netns exec … ping`` per probe would fork 240 processes a round
  for 16 VMs on the 2 cores being measured. For the full mesh (CladNet and baseline
  alike) b→a is first probed once a→b answered: echoes both ways at once make both
  WireGuard ends initiate, the crossed handshakes leave both as responders, and the
  pair waits for 5 s retries (16 hand-made hosts: over 20 s instead of under 1 s on
  2 cores), so the check itself would set the floor. Address changes are probed both
  ways at once (sessions exist; that is "pings restored both ways");
- address change (largest size): (1) the VM's public address moved in place, its 1:1
  NAT rewritten by the driver's own helpers while the VM keeps running (a cloud
  re-assigning an elastic IP) → pings both ways between it and every other VM; (2)
  suspend, then resume, which gives the VM a NEW public address (the driver's own way)
  → the same pings, timed from the resume request;
- worst-order pair (first, once): two wireguard-go hosts; the one with the lower key
  adds the other and sends it a packet, which is dropped there (the other does not know
  it yet); 0.3 s later the other adds it. Seconds from that add until both hold a
  handshake, with the agent's handshake trigger (``agent.handshake``) and without it
  (WireGuard's own retry of the first initiation, 5 s): the tail the trigger removes;
- baseline, per size: N fresh namespaces on one bridge (tests/netns.Lab), one
  ``wireguard-go`` each configured by this script with ``wg set`` for all N-1 peers
  (hosts in parallel), from the first wireguard-go start to the full mesh with the
  same pings: the floor for bringing up N WireGuard hosts on this machine;
- where the time goes (``agent_timeline_s``): from the VMs' agent logs (debug level),
  seconds from the POST until each agent's process started, its join was answered,
  its device was up, its peers were listed and its device held all other VMs (p50
  and max over the VMs).

One JSON object on stdout, then a one-line summary; progress on stderr. Everything
made here is named ``cl-…``/``cl<tag>…`` and removed, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agent.daemon import Timing
from agent.handshake import HandshakeStarter
from agent.handshake import send as handshake_send
from agent.netlink import in_netns
from agent.wireguard.userspace import UserspaceBackend
from bench.common import (
    clean_up_on_sigterm,
    machine_facts,
    percentile,
    runtime_only_python,
    wireguard_go_processes,
)
from cladnet.keys import generate_keypair
from cladnet.mesh import DeviceChanges, PeerConfig
from cladnet.models import DEFAULT_KEEPALIVE
from controller.drivers.local import Driver
from lab.components import Controller, Etcd, free_port, wait_until
from lab.netns import Lab, free_prefix, root_missing, sh

PROBE_INTERVAL = 0.1  # seconds between echo requests of one pending pair
# At most this many echo requests a second over all pairs: 64 VMs have 4,032 pairs, and
# 10 echoes a second to each flooded the 2 cores (1.6 million sent, the hand-made mesh's
# p50 91 s); up to 16 VMs (240 pairs) every pending pair still gets PROBE_INTERVAL.
PROBE_RATE = 2500
API_POLL = 0.1  # seconds between reads of the group while waiting for a state
REGIONS = ("a-west", "b-east", "c-north")  # clouds a, b (same subnet) and c
WG_PORT = 51820
Pair = tuple[str, str]  # (from, to) by VM or host name


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def _log(message: str) -> None:
    print(f"[mesh {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- pings over every ordered pair, in parallel --------------------------------------------


def _socket_in(namespace: str) -> socket.socket:
    """A raw ICMP socket living in ``namespace``, so one loop can ping from every VM."""
    sock = in_netns(
        namespace, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    )
    sock.setblocking(False)
    return sock


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int) -> bytes:
    payload = b"cladnet-bench-mesh"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload


@dataclass
class Probe:
    """What one parallel ping run saw: each pair's first reply (seconds from ``started``)."""

    replies: dict[Pair, float]
    sent: int
    began_s: float  # when probing began, from ``started``

    def summary(self) -> dict[str, Any]:
        times = sorted(self.replies.values())
        return {
            "pairs": len(times),
            "probing_began_s": round(self.began_s, 3),
            "first_reply_s": {
                "min": round(times[0], 3),
                "p50": round(percentile(times, 50) or 0, 3),
                "p90": round(percentile(times, 90) or 0, 3),
                "max": round(times[-1], 3),
            },
            "echo_requests_sent": self.sent,
            # Where a tail comes from: the last pairs to answer.
            "slowest": {
                f"{a}->{b}": round(t, 3)
                for (a, b), t in sorted(self.replies.items(), key=lambda kv: -kv[1])[:3]
            },
        }


def probe(
    pairs: dict[Pair, tuple[str, str]], started: float, timeout: float, ordered: bool = False
) -> Probe:
    """Ping ``pairs`` ((from, to) → (source namespace, target address)) until every pair
    has answered once; an echo every ``PROBE_INTERVAL`` s to each pair still silent
    (less often when that would exceed ``PROBE_RATE`` echoes a second in all).

    ``ordered``: (b, a) is first probed when (a, b), earlier in ``pairs``, has answered.
    Echoes sent both ways at once make both WireGuard ends initiate a handshake; each
    consumes the other's initiation, both end up as responders that may not send, and
    the pair waits for a handshake retry (REKEY_TIMEOUT, 5 s). Once (a, b) answered the
    session works both ways, so ordering costs the reverse pair one round trip.
    """
    ident = random.randrange(1, 0xFFFF)
    sockets = {ns: _socket_in(ns) for ns in sorted({ns for ns, _ in pairs.values()})}
    by_fd = {s.fileno(): ns for ns, s in sockets.items()}
    lookup = {(ns, ip): pair for pair, (ns, ip) in pairs.items()}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    after: dict[Pair, Pair] = {}  # pair → its reverse, probed once the pair answered
    if ordered:
        for a, b in pairs:
            if (b, a) in pairs and (b, a) not in after:
                after[(a, b)] = (b, a)
    waiting = set(after.values())
    pending = set(pairs)
    due = {p: math.inf if p in waiting else 0.0 for p in pairs}
    replies: dict[Pair, float] = {}
    seq = sent = 0
    began = time.monotonic() - started
    try:
        while pending:
            now = time.monotonic()
            if now - started > timeout:
                silent = ", ".join(f"{a}->{b}" for a, b in sorted(pending)[:6])
                raise BenchError(
                    f"{len(pending)} of {len(pairs)} pairs did not answer within "
                    f"{timeout:.0f}s (e.g. {silent})"
                )
            interval = max(PROBE_INTERVAL, len(pending) / PROBE_RATE)
            for pair in pending:
                if due[pair] <= now:
                    ns, ip = pairs[pair]
                    seq = (seq + 1) & 0xFFFF
                    # Unroutable yet (no WireGuard address): a failed probe like any other.
                    with contextlib.suppress(OSError):
                        sockets[ns].sendto(_echo_request(ident, seq), (ip, 0))
                    sent += 1
                    due[pair] = now + interval
            wait = min(1.0, max(0.0, min(due[p] for p in pending) - time.monotonic()))
            for fd, _ in poller.poll(math.ceil(wait * 1000)):
                while True:
                    try:
                        packet, (source, _) = sockets[by_fd[fd]].recvfrom(2048)
                    except BlockingIOError:
                        break
                    icmp = packet[(packet[0] & 0x0F) * 4 :]
                    if len(icmp) < 8:
                        continue
                    kind, _, _, who, _ = struct.unpack("!BBHHH", icmp[:8])
                    answered = lookup.get((by_fd[fd], source))
                    if kind == 0 and who == ident and answered in pending:
                        assert answered is not None
                        replies[answered] = time.monotonic() - started
                        pending.discard(answered)
                        if answered in after:
                            due[after[answered]] = 0.0
    finally:
        for s in sockets.values():
            s.close()  # an open socket would keep a deleted namespace alive
    return Probe(replies, sent, began)


# --- the cloud: etcd, controller, local driver --------------------------------------------


@dataclass
class Run:
    """Everything this run made, so that cleanup removes exactly that."""

    tmp: Path
    tag: str = ""
    driver: Driver | None = None
    etcd: Etcd | None = None
    ctl: Controller | None = None
    labs: list[Lab] = field(default_factory=list)
    wireguard: list[subprocess.Popen[bytes]] = field(default_factory=list)
    hand_ifaces: list[str] = field(default_factory=list)
    keep: bool = False  # leave tmp (the VMs' logs, the controller's) in place


def _our_tag() -> str:
    """A driver tag no name on this machine uses yet (other runs may be going on)."""
    names = sh("ip", "netns", "list").stdout + sh("ip", "-o", "link", "show").stdout
    for _ in range(100):
        tag = f"{random.randrange(0x10000):04x}"
        if f"cl{tag}" not in names and f"cl-{tag}" not in names:
            return tag
    raise BenchError("no free driver tag")


def _free_internet() -> str:
    """A 172.x.0.0/16 without an address of this machine; searched from the top, as
    tests search from 172.20 and the demo from 172.29 (they may run at the same time)."""
    used = sh("ip", "-4", "-o", "addr", "show").stdout
    for second in range(28, 19, -1):
        if f" 172.{second}." not in used:
            return f"172.{second}"
    raise BenchError("no free 172.20-28.0.0/16 for the clouds' internet")


def _runtime_agent(tmp: Path) -> Path:
    """``cladnet-agent`` as a VM has it after ``pip install 'cladnet[agent]'``: without
    the dev venv's other roles and test tools, which would add their imports to every
    agent's start (with trio installed, httpcore imports it, and httpx imports rich: ≈ 0.15 s of CPU
    a start)."""
    python = runtime_only_python(tmp / "agent-venv", ("agent",))
    script = tmp / "cladnet-agent"
    script.write_text(f'#!/bin/sh\nexec {python} -m agent.main "$@"\n')
    script.chmod(0o755)
    return script


def start_cloud(run: Run) -> tuple[Driver, Controller]:
    """The local clouds and a controller driving them (as tests/test_driver_local.py)."""
    inet = _free_internet()
    run.tag = _our_tag()
    clouds = {
        name: {"public": f"{inet}.{i + 1}.0/24", "regions": {region: subnet}}
        for i, (name, region, subnet) in enumerate(
            [
                ("a", "a-west", "192.168.1.0/24"),
                ("b", "b-east", "192.168.1.0/24"),
                ("c", "c-north", "10.77.0.0/24"),
            ]
        )
    }
    options = {
        "state_dir": str(run.tmp / "cloud"),
        "clouds": clouds,
        "internet": f"{inet}.0.0/16",
        "tag": run.tag,
        "agent_log_level": "debug",  # each agent's start, for the timeline
        "agent": str(_runtime_agent(run.tmp)),
    }
    run.driver = driver = Driver(**options)  # type: ignore[arg-type]
    (run.tmp / "drivers.json").write_text(json.dumps({"local": options}))
    asyncio.run(driver.prepare())
    run.etcd = Etcd.serving(run.tmp / "etcd")
    run.etcd.start()
    ctl_port = free_port()
    run.ctl = Controller(
        etcd_url=run.etcd.url,
        state_dir=run.tmp / "controller",
        port=ctl_port,
        host=driver.gateway,
        extra_env={
            "CLADNET_DRIVERS": str(run.tmp / "drivers.json"),
            "CLADNET_ADVERTISE_URL": f"http://{driver.gateway}:{ctl_port}",
        },
    )
    run.ctl.start()
    _log(f"controller at {run.ctl.url}, clouds on {inet}.0.0/16, driver tag {run.tag}")
    return driver, run.ctl


def _members(n: int) -> list[dict[str, Any]]:
    """``n`` VMs round-robin over the three regions (4 → 2+1+1)."""
    counts = {r: n // len(REGIONS) + (i < n % len(REGIONS)) for i, r in enumerate(REGIONS)}
    return [{"driver": "local", "region": r, "count": c} for r, c in counts.items() if c]


def _group(admin: httpx.Client, name: str) -> dict[str, Any]:
    r = admin.get(f"/v1/groups/{name}")
    if r.status_code != 200:
        raise BenchError(f"GET group {name}: {r.status_code} {r.text[:200]}")
    group: dict[str, Any] = r.json()
    failed = [f"{vm['name']}: {vm.get('error')}" for vm in group["vms"] if vm["state"] == "Failed"]
    if failed:
        raise BenchError(f"group {name}: VM failed: {'; '.join(failed)}")
    return group


def _wait_group(
    admin: httpx.Client, name: str, check: Callable[[dict[str, Any]], bool], deadline: float
) -> dict[str, Any]:
    while True:
        group = _group(admin, name)
        if check(group):
            return group
        if time.monotonic() > deadline:
            states = {vm["name"]: vm["state"] for vm in group["vms"]}
            raise BenchError(f"group {name}: timed out, VMs {states}")
        time.sleep(API_POLL)


def _pairs(vms: list[dict[str, Any]], only: str | None = None) -> dict[Pair, tuple[str, str]]:
    """Ordered pairs of VMs (those with ``only`` when given) → (namespace, overlay IP)."""
    return {
        (a["name"], b["name"]): (a["details"]["namespace"], b["overlay_ip"])
        for a in vms
        for b in vms
        if a is not b and only in (None, a["name"], b["name"])
    }


# A VM's agent log line → the step of its start it marks (the first such line counts).
TIMELINE = {
    "agent starting": "agent_started",
    "joined": "join_answered",
    "device up": "device_up",
    "peers listed": "peers_listed",
}


def agent_timeline(vms_dir: Path, names: list[str], posted: float) -> dict[str, Any]:
    """Seconds from the POST to each step of the VMs' agents' start (p50 and max over
    the VMs), from their logs (``console.log``): process started, join answered, device
    up, peers listed, and the device holding all the group's other VMs."""
    steps: dict[str, list[float]] = {step: [] for step in [*TIMELINE.values(), "all_peers_added"]}
    for name in names:
        seen: dict[str, float] = {}
        added = 0
        with contextlib.suppress(OSError):
            lines = (vms_dir / name / "console.log").read_text(errors="replace").splitlines()
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:  # not a log line (join prints its answer too)
                    continue
                if not isinstance(entry, dict) or not isinstance(entry.get("ts"), float):
                    continue
                at = entry["ts"] - posted
                step = TIMELINE.get(entry.get("msg", ""))
                if step is not None:
                    seen.setdefault(step, at)
                elif entry.get("msg") == "device updated":
                    added += len(entry.get("changes", {}).get("add", []))
                    if added >= len(names) - 1:
                        seen.setdefault("all_peers_added", at)
        for step, at in seen.items():
            steps[step].append(at)
    return {
        step: {"p50": round(percentile(sorted(v), 50) or 0, 2), "max": round(max(v), 2)}
        if v
        else None
        for step, v in steps.items()
    }


def cladnet_mesh(admin: httpx.Client, n: int, timeout: float, vms_dir: Path) -> dict[str, Any]:
    """Create a group of ``n`` VMs and time it to Running, overlay IPs, full mesh; and
    where the time went in the VMs' agents (``agent_timeline``)."""
    name = f"mesh{n}"
    members = _members(n)
    started = time.monotonic()
    posted = time.time()  # the agents' logs carry wall-clock times
    r = admin.post("/v1/groups", json={"name": name, "members": members})
    if r.status_code != 202:
        raise BenchError(f"POST /v1/groups: {r.status_code} {r.text[:300]}")
    deadline = started + timeout
    running = overlay = None
    while running is None or overlay is None:
        group = _group(admin, name)
        now = time.monotonic() - started
        if running is None and all(vm["state"] == "Running" for vm in group["vms"]):
            running = now
        if overlay is None and all(vm["overlay_ip"] for vm in group["vms"]):
            overlay = now
        if running is None or overlay is None:
            if time.monotonic() > deadline:
                raise BenchError(f"group {name}: not running/joined within {timeout:.0f}s")
            time.sleep(API_POLL)
    _log(f"{name}: running {running:.2f}s, overlay IPs {overlay:.2f}s after POST; pinging")
    result = probe(_pairs(group["vms"]), started, timeout, ordered=True)
    mesh = max(result.replies.values())
    _log(f"{name}: full mesh {mesh:.2f}s after POST")
    timeline = agent_timeline(vms_dir, [vm["name"] for vm in group["vms"]], posted)
    _log(
        f"{name}: agents (p50/max s after POST): "
        + ", ".join(f"{step} {t['p50']}/{t['max']}" for step, t in timeline.items() if t)
    )
    return {
        "group": group,
        "members": {m["region"]: m["count"] for m in members},
        "post_to_running_s": round(running, 3),
        "post_to_overlay_ips_s": round(overlay, 3),
        "post_to_full_mesh_s": round(mesh, 3),
        # The part after the last join: agents' devices, first handshakes, the probe.
        "overlay_ips_to_full_mesh_s": round(mesh - overlay, 3),
        "agent_timeline_s": timeline,
        **result.summary(),
    }


def delete_group(admin: httpx.Client, driver: Driver, name: str, timeout: float) -> float:
    """Delete the group; wait until its record and its VMs' namespaces are gone."""
    started = time.monotonic()
    r = admin.delete(f"/v1/groups/{name}")
    if r.status_code != 202:
        raise BenchError(f"DELETE group {name}: {r.status_code} {r.text[:200]}")
    prefix = f"cl-{driver.tag}-{name}-"

    def gone() -> bool:
        if admin.get(f"/v1/groups/{name}").status_code != 404:
            return False
        return not any(ns.startswith(prefix) for ns in sh("ip", "netns", "list").stdout.split())

    wait_until(gone, timeout, interval=API_POLL, what=f"group {name} to be removed")
    return round(time.monotonic() - started, 3)


# --- address changes -------------------------------------------------------------------------


class Poller(threading.Thread):
    """Polls ``check`` every API_POLL s in the background until it is true; ``at`` is
    when (seconds from ``started``). Its own HTTP client: clients are not shared."""

    def __init__(
        self, ctl: Controller, check: Callable[[httpx.Client], bool], started: float, limit: float
    ) -> None:
        super().__init__(daemon=True)
        self.ctl, self.check, self.started, self.limit = ctl, check, started, limit
        self.at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        with self.ctl.client() as client:
            while not self.stop.is_set() and time.monotonic() - self.started < self.limit:
                try:
                    if self.check(client):
                        self.at = round(time.monotonic() - self.started, 3)
                        return
                except (httpx.HTTPError, BenchError, KeyError):
                    pass  # the controller is busy or the VM not back yet: ask again
                self.stop.wait(API_POLL)


def _network_hosts(client: httpx.Client, network: str) -> dict[str, dict[str, Any]]:
    r = client.get(f"/v1/networks/{network}/hosts")
    r.raise_for_status()
    return {h["name"]: h for h in r.json()}


async def _move_public(driver: Driver, name: str) -> tuple[str, str]:
    """Give the running VM a new public address in place: the driver's own helpers,
    used as its create and resume do (address on the router, NAT in one nft
    transaction), without stopping the VM. The controller's record is not told."""
    state = driver._load()
    vm = state["vms"][name]
    old = vm["public_ip"]
    await driver._set_public(vm, driver._new_public(vm["cloud"], state))
    await driver._apply_nat(vm["cloud"], state)
    driver._save(state)
    return old, vm["public_ip"]


def in_place_change(
    ctl: Controller, driver: Driver, group: dict[str, Any], victim: str, timeout: float
) -> dict[str, Any]:
    """A running VM's public address changes under it (an elastic IP re-assigned)."""
    started = time.monotonic()
    old, new = asyncio.run(_move_public(driver, victim))
    changed = time.monotonic() - started
    learned = Poller(
        ctl,
        lambda c: _network_hosts(c, group["network_id"])[victim]["public_address"] == new,
        started,
        limit=60,
    )
    learned.start()
    try:
        result = probe(_pairs(group["vms"], only=victim), started, timeout)
    except BaseException:
        learned.stop.set()
        raise
    restored = max(result.replies.values())
    learned.join(60)
    _log(f"in-place public address change {old} -> {new}: pings {restored:.3f}s")
    return {
        "public_ip_change_to_pings_s": round(restored, 3),
        "old_public_ip": old,
        "new_public_ip": new,
        "nat_rewrite_s": round(changed, 3),
        "peers_over_public_address": _public_peers(group, victim),
        "controller_learned_new_address_s": learned.at,
        **result.summary(),
        "how": (
            "the driver's own _set_public + _apply_nat (its create/resume steps) move the "
            "VM's 1:1 NAT to a new public address in one nftables transaction while the VM "
            "and its agent keep running (the controller's group record keeps the old "
            "public_ip: only driver calls update it); timed from the start of that change, "
            "pings both ways at once: peers roam to the new address on its first "
            "authenticated packet; the controller learns it from the agent's heartbeat"
        ),
    }


def _public_ip(driver: Driver, name: str) -> str | None:
    """The VM's public address as the cloud has it now (the controller's record may be
    older: an in-place change is not reported to it)."""
    return asyncio.run(driver.get(name)).public_ip


def _public_peers(group: dict[str, Any], victim: str) -> int:
    """Peers that reach ``victim`` at its public address: those outside its site
    (the local driver's site is the region: cloud, region and vpc labels)."""
    region = next(vm["region"] for vm in group["vms"] if vm["name"] == victim)
    return sum(vm["region"] != region for vm in group["vms"])


def resume_change(
    admin: httpx.Client,
    ctl: Controller,
    driver: Driver,
    group: dict[str, Any],
    victim: str,
    timeout: float,
) -> dict[str, Any]:
    """Suspend a VM, then resume it: a new public address and a new boot."""
    name = group["name"]
    old = _public_ip(driver, victim)
    actions = f"/v1/groups/{name}/vms/{victim}/actions"
    r = admin.post(actions, json={"action": "suspend"})
    if r.status_code != 202:
        raise BenchError(f"suspend {victim}: {r.status_code} {r.text[:200]}")
    _wait_group(
        admin,
        name,
        lambda g: any(v["name"] == victim and v["state"] == "Suspended" for v in g["vms"]),
        time.monotonic() + timeout,
    )

    def running(client: httpx.Client) -> bool:
        vm = next(v for v in _group(client, name)["vms"] if v["name"] == victim)
        return vm["state"] == "Running"

    started = time.monotonic()
    r = admin.post(actions, json={"action": "resume"})
    if r.status_code != 202:
        raise BenchError(f"resume {victim}: {r.status_code} {r.text[:200]}")
    up = Poller(ctl, running, started, limit=timeout)
    up.start()
    try:
        result = probe(_pairs(group["vms"], only=victim), started, timeout)
    except BaseException:
        up.stop.set()
        raise
    finally:
        up.join(timeout)
    restored = max(result.replies.values())
    new = _public_ip(driver, victim)
    recorded = next(vm for vm in _group(admin, name)["vms"] if vm["name"] == victim)["public_ip"]
    if not new or new == old or recorded != new:
        raise BenchError(f"resume of {victim}: public address {old} -> {new} (recorded {recorded})")
    _log(f"resume with new public address {old} -> {new}: pings {restored:.3f}s")
    return {
        "resume_new_public_ip_to_mesh_s": round(restored, 3),
        "old_public_ip": old,
        "new_public_ip": new,
        "peers_over_public_address": _public_peers(group, victim),
        "resume_to_running_s": up.at,
        **result.summary(),
        "how": (
            "suspend (agent and wireguard-go killed, public address released), then timed "
            "from the resume request: new public address, boot of `cladnet-agent run`, "
            "until the VM and every other VM ping each other"
        ),
    }


# --- baseline: a hand-configured wireguard-go mesh -----------------------------------------


def _hand_device(
    run: Run,
    lab: Lab,
    procs: list[subprocess.Popen[bytes]],
    ns: str,
    name: str,
    private_key: str,
    address: str,
    peers: Sequence[str] = (),
) -> None:
    """wireguard-go device ``name`` in ``ns``, configured by hand: key, port, ``peers``
    (``wg set`` arguments), the overlay ``address``/24, up."""
    key_file = run.tmp / f"{name}.key"
    key_file.touch(mode=0o600)
    key_file.write_text(private_key)
    proc = lab.popen(
        ns, ["wireguard-go", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    procs.append(proc)
    run.wireguard.append(proc)
    sock = Path(f"/var/run/wireguard/{name}.sock")
    wait_until(sock.exists, 10, interval=0.005, what=f"wireguard-go {name}")
    port = ["listen-port", str(WG_PORT), "private-key", str(key_file)]
    lab.run(ns, "wg", "set", name, *port, *peers)
    lab.run(ns, "ip", "addr", "add", f"{address}/24", "dev", name)
    lab.run(ns, "ip", "link", "set", name, "mtu", "1420", "up")


def hand_mesh(run: Run, n: int, timeout: float) -> dict[str, Any]:
    """N namespaces on one bridge, wireguard-go + ``wg set`` for all peers by this
    script, from the first wireguard-go start to the full mesh: the floor."""
    # From the top of the range: tests and other benchmarks take Lab /24s from the bottom.
    lab = Lab(subnet_prefix=free_prefix([f"192.168.{k}" for k in range(254, 239, -1)]))
    run.labs.append(lab)
    procs: list[subprocess.Popen[bytes]] = []
    iface = {i: f"cl-{lab.tag}m{i}" for i in range(1, n + 1)}
    run.hand_ifaces += iface.values()
    try:
        hosts = {i: lab.add_host(i) for i in iface}
        keys = {i: generate_keypair() for i in hosts}
        overlay = {i: f"10.198.0.{i}" for i in hosts}

        def bring_up(i: int) -> None:
            peers: list[str] = []
            for j in hosts:
                if j != i:
                    peers += [
                        "peer",
                        keys[j][1],
                        "allowed-ips",
                        f"{overlay[j]}/32",
                        "endpoint",
                        f"{lab.address(j)}:{WG_PORT}",
                    ]
            _hand_device(run, lab, procs, hosts[i], iface[i], keys[i][0], overlay[i], peers)

        started = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(bring_up, hosts))
        configured = time.monotonic() - started
        pairs = {(f"h{a}", f"h{b}"): (hosts[a], overlay[b]) for a in hosts for b in hosts if a != b}
        result = probe(pairs, started, timeout, ordered=True)
        mesh = max(result.replies.values())
        _log(f"hand mesh of {n}: configured {configured:.2f}s, full mesh {mesh:.2f}s")
        return {
            "configured_s": round(configured, 3),
            "start_to_full_mesh_s": round(mesh, 3),
            **result.summary(),
        }
    finally:
        _stop_wireguard(procs)
        for name in iface.values():
            Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)
        lab.cleanup()


def pair_handshake(run: Run, trigger: bool, timeout: float = 30) -> float:
    """Two wireguard-go hosts added in the worst order: the host with the lower key adds
    the other and sends it a packet (dropped: the other does not know it yet), then
    the other adds it. Seconds from that second add until both hold a handshake, with
    the agent's handshake trigger (``agent.handshake``, its default retry) on both
    hosts or without it (then WireGuard's own retry of the first initiation)."""
    lab = Lab(subnet_prefix=free_prefix([f"192.168.{k}" for k in range(254, 239, -1)]))
    run.labs.append(lab)
    procs: list[subprocess.Popen[bytes]] = []
    iface = {i: f"cl-{lab.tag}p{i}" for i in (1, 2)}
    run.hand_ifaces += iface.values()
    try:
        hosts = {i: lab.add_host(i) for i in iface}
        keys = {i: generate_keypair() for i in hosts}
        low, high = sorted(hosts, key=lambda i: keys[i][1])
        overlay = {i: f"10.199.0.{i}" for i in hosts}
        for i in hosts:
            _hand_device(run, lab, procs, hosts[i], iface[i], keys[i][0], overlay[i])
        backend = {i: UserspaceBackend(netns=hosts[i]) for i in hosts}
        retry = Timing().handshake_retry or 1.0

        async def scenario() -> float:
            starters = {
                i: HandshakeStarter(
                    iface[i], functools.partial(backend[i].get, iface[i]), retry, hosts[i]
                )
                for i in hosts
            }

            async def add(i: int, j: int) -> None:
                peer = PeerConfig(
                    keys[j][1], (f"{overlay[j]}/32",), f"{lab.address(j)}:{WG_PORT}", 0
                )
                await backend[i].apply(iface[i], DeviceChanges(peers_to_add=(peer,)))
                if trigger:
                    starters[i].peers_added([peer], keys[i][1])
                elif i == low:  # its first packet, as traffic would send it
                    handshake_send(iface[i], [overlay[j]], hosts[i])

            async def done() -> bool:
                for i, j in ((low, high), (high, low)):
                    state = (await backend[i].get(iface[i])).peers.get(keys[j][1])
                    if state is None or state.last_handshake is None:
                        return False
                return True

            try:
                await add(low, high)
                await asyncio.sleep(0.3)  # the initiation reaches a host that lacks the peer
                started = time.monotonic()
                await add(high, low)
                while not await done():
                    if time.monotonic() - started > timeout:
                        raise BenchError(f"pair handshake (trigger {trigger}): none in {timeout}s")
                    await asyncio.sleep(0.02)
                return time.monotonic() - started
            finally:
                for starter in starters.values():
                    await starter.close()

        took = asyncio.run(scenario())
        _log(f"worst-order pair, handshake trigger {'on' if trigger else 'off'}: {took:.2f}s")
        return round(took, 3)
    finally:
        _stop_wireguard(procs)
        for name in iface.values():
            Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)
        lab.cleanup()


def _stop_wireguard(procs: list[subprocess.Popen[bytes]]) -> None:
    """Our wireguard-go processes, by PID (``ip netns exec`` execs, so it is theirs)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- cleanup and the check that nothing is left -----------------------------------------


def _wireguard_go_pids(prefixes: tuple[str, ...]) -> list[int]:
    """wireguard-go processes serving an interface whose name starts with ``prefixes``."""
    return [pid for pid, iface in wireguard_go_processes().items() if iface.startswith(prefixes)]


def cleanup(run: Run) -> None:
    """Controller first (its reconciler must not make VMs while we remove them), then
    every VM and cloud through the driver's records, then what is ours by name."""
    steps: list[tuple[str, Callable[[], object]]] = []
    if run.ctl is not None:
        steps.append(("controller", run.ctl.stop))
    if run.driver is not None:
        steps.append(("driver teardown", lambda: asyncio.run(run.driver.teardown())))  # type: ignore[union-attr]
    if run.etcd is not None:
        steps.append(("etcd", run.etcd.stop))
    steps.append(("hand wireguard-go", lambda: _stop_wireguard(run.wireguard)))
    for lab in run.labs:
        steps.append((f"lab {lab.tag}", lab.cleanup))
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # keep going: the rest must go too
            _log(f"cleanup of {what} failed: {exc!r}")
    # wireguard-go may outlive its namespace: anything left serving our interfaces.
    for pid in _wireguard_go_pids(_prefixes(run)):
        _log(f"killing leftover wireguard-go {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in run.hand_ifaces:
        Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)
    if not run.keep:
        shutil.rmtree(run.tmp, ignore_errors=True)


def _prefixes(run: Run) -> tuple[str, ...]:
    names = [f"cl-{lab.tag}" for lab in run.labs] + [lab.bridge for lab in run.labs]
    if run.tag:
        names += [f"cl{run.tag}", f"cl-{run.tag}"]
    return tuple(names)


def leftovers(run: Run) -> dict[str, list[str]]:
    """Namespaces, links, nftables tables and processes of this run still present."""
    ours = _prefixes(run)
    if not ours:
        return {}
    netns = [n for n in sh("ip", "netns", "list").stdout.split() if n.startswith(ours)]
    links = [
        line.split()[0].split("@")[0]
        for line in sh("ip", "-br", "link").stdout.splitlines()
        if line.split()[0].startswith(ours)
    ]
    tables = [
        t for t in sh("nft", "list", "tables").stdout.splitlines() if any(p in t for p in ours)
    ]
    procs = [str(pid) for pid in _wireguard_go_pids(ours)]
    found = {"netns": netns, "links": links, "nft_tables": tables, "wireguard_go": procs}
    return {k: v for k, v in found.items() if v}


# --- the run ---------------------------------------------------------------------------------


def _victim(group: dict[str, Any]) -> str:
    """The last VM: in cloud c, so most of its peers reach it at its public address."""
    return str(group["vms"][-1]["name"])


def bench(run: Run, sizes: list[int], smoke: bool) -> dict[str, Any]:
    driver, ctl = start_cloud(run)
    result: dict[str, Any] = {
        "benchmark": "cladnet.mesh",
        "inputs": {
            "sizes": sizes,
            "smoke": smoke,
            "regions": {
                "a-west": "cloud a, 192.168.1.0/24",
                "b-east": "cloud b, 192.168.1.0/24",
                "c-north": "cloud c, 10.77.0.0/24",
            },
            "vms_per_region": "round-robin a-west, b-east, c-north",
            "keepalive_s": DEFAULT_KEEPALIVE,
            "agent_handshake_retry_s": Timing().handshake_retry,
            "wireguard": "wireguard-go (userspace) for both CladNet and the baseline",
            "ping": (
                "ICMP echo from a raw socket opened in the source namespace; each pair not "
                f"yet answered is probed every {PROBE_INTERVAL} s (at most {PROBE_RATE} "
                "echoes/s in all: pending pairs / that rate when longer), all pairs in "
                "parallel; a pair counts at its first reply"
            ),
            "ping_order": (
                "full mesh (CladNet and baseline): b->a is first probed once a->b answered, "
                "so the check does not cross WireGuard handshakes itself (echoes both ways "
                "at once stall a pair for 5 s retries); address changes: both ways at once"
            ),
            "api_poll_s": API_POLL,
        },
        "machine": machine_facts("httpx", "pydantic"),
        "sizes": {},
    }
    on, off = pair_handshake(run, trigger=True), pair_handshake(run, trigger=False)
    result["worst_order_pair"] = {
        "with_trigger_s": on,
        "without_trigger_s": off,
        "ratio_without_to_with": round(off / on, 1),
        "how": (
            "two wireguard-go hosts; the lower key adds the other and sends it one packet "
            "(dropped there), 0.3 s later the other adds it; seconds from that add until "
            "both hold a handshake: with agent.handshake on both hosts vs without it "
            "(WireGuard's own 5-s retry of the first initiation)"
        ),
    }
    with ctl.client() as admin:
        for index, n in enumerate(sizes):
            timeout = 60 if smoke else 60 + 8 * n
            entry: dict[str, Any] = {"hand_wireguard_go": hand_mesh(run, n, timeout)}
            cl = cladnet_mesh(admin, n, timeout, run.tmp / "cloud" / "vms")
            group = cl.pop("group")
            entry["cladnet"] = cl
            entry["ratio_cladnet_to_hand"] = round(
                cl["post_to_full_mesh_s"] / entry["hand_wireguard_go"]["start_to_full_mesh_s"], 1
            )
            if index == len(sizes) - 1:
                victim = _victim(group)
                change: dict[str, Any] = {"size": n, "vm": victim}
                if smoke:
                    change["public_ip_change_to_pings_s"] = (
                        "not measured: --smoke measures one address change (resume)"
                    )
                else:
                    change["in_place"] = in_place_change(ctl, driver, group, victim, timeout)
                    change["public_ip_change_to_pings_s"] = change["in_place"][
                        "public_ip_change_to_pings_s"
                    ]
                change["resume"] = resume_change(admin, ctl, driver, group, victim, timeout)
                change["resume_new_public_ip_to_mesh_s"] = change["resume"][
                    "resume_new_public_ip_to_mesh_s"
                ]
                result["address_change"] = change
            if run.keep:  # deleting the group removes the VMs' directories
                for vm in group["vms"]:
                    with contextlib.suppress(OSError):
                        shutil.copy(
                            run.tmp / "cloud" / "vms" / vm["name"] / "console.log",
                            run.tmp / f"{vm['name']}.console.log",
                        )
            entry["delete_to_gone_s"] = delete_group(admin, driver, group["name"], timeout)
            result["sizes"][str(n)] = entry
    result["ratios_cladnet_to_hand"] = {
        n: e["ratio_cladnet_to_hand"] for n, e in result["sizes"].items()
    }
    return result


def summary(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    names = "/".join(sizes)
    cl = "/".join(f"{e['cladnet']['post_to_full_mesh_s']:.1f}" for e in sizes.values())
    hand = "/".join(f"{e['hand_wireguard_go']['start_to_full_mesh_s']:.2f}" for e in sizes.values())
    ratios = "/".join(f"{e['ratio_cladnet_to_hand']}x" for e in sizes.values())
    change = result["address_change"]
    in_place = change["public_ip_change_to_pings_s"]
    in_place_text = f"{in_place:.2f}s" if isinstance(in_place, float) else "not measured"
    pair = result["worst_order_pair"]
    return (
        f"worst-order pair handshake {pair['with_trigger_s']:.2f}s with the agent's trigger "
        f"vs {pair['without_trigger_s']:.2f}s without; "
        f"full mesh of {names} VMs {cl}s after POST /v1/groups (hand-configured wireguard-go "
        f"{hand}s = {ratios}); {change['size']} VMs: resume with new public IP -> pings "
        f"{change['resume_new_public_ip_to_mesh_s']:.2f}s, in-place public IP change -> "
        f"pings {in_place_text}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.mesh", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--sizes", default="4,8,16", help="group sizes, comma-separated")
    p.add_argument("--smoke", action="store_true", help="4 VMs, one address change (CI)")
    p.add_argument("--keep", type=Path, help="a new directory to keep the run's logs in")
    args = p.parse_args(argv)
    try:
        sizes = [4] if args.smoke else [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: comma-separated integers, not {args.sizes!r}")
    if not sizes or any(n < 2 or n > 64 for n in sizes):
        p.error("--sizes: each between 2 and 64")
    missing = root_missing()
    if missing:
        print(f"bench.mesh: {missing}", file=sys.stderr)
        return 2
    for tool in ("nft", "etcd"):
        if shutil.which(tool) is None:
            print(f"bench.mesh: {tool} is not installed (run deploy/setup.sh)", file=sys.stderr)
            return 2
    clean_up_on_sigterm()
    if args.keep:
        args.keep.mkdir(parents=True)
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="cl-bench-mesh-"))
    run = Run(tmp=tmp.resolve(), keep=args.keep is not None)
    began = time.monotonic()
    code, result = 1, None
    try:
        result = bench(run, sizes, args.smoke)
        code = 0
    except KeyboardInterrupt:
        print("bench.mesh: interrupted; cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, TimeoutError, RuntimeError, OSError, httpx.HTTPError) as exc:
        print(f"bench.mesh: failed: {exc}", file=sys.stderr)
        _diagnose(run)
    except Exception:  # a bug here: the traceback, then the same cleanup
        traceback.print_exc()
        print("bench.mesh: failed (unexpected error above)", file=sys.stderr)
        _diagnose(run)
    finally:
        cleanup(run)
    left = leftovers(run)
    if left:
        print(f"bench.mesh: left behind after cleanup: {left}", file=sys.stderr)
        code = code or 1
    if code == 0 and result is not None:
        result["wall_s"] = round(time.monotonic() - began, 1)
        print(json.dumps(result, indent=1))
        print(summary(result))
    return code


def _diagnose(run: Run) -> None:
    """The end of the controller's log and of each VM console, before they are removed."""
    logs = [run.ctl.log] if run.ctl is not None else []
    logs += sorted((run.tmp / "cloud" / "vms").glob("*/console.log"))[-4:]
    for log in logs:
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace")[-1500:]
            print(f"--- {log.name} ({log.parent.name}) ---\n{tail}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
