"""Fault tests on real agents (namespaces, wireguard-go) with the control plane killed
for real and a state disk really full.

- The whole control plane (etcd and the controller) is down for
  ``CLADNET_OUTAGE_SECONDS`` (default 300, the issue's 5 minutes): the overlay keeps
  passing traffic all along; etcd and the controller come back on the same ports with
  the same data, and the agents resync with nobody touching them.
- An agent's state directory is full (a tmpfs filled to ENOSPC): it says so in one
  log line per failed write, keeps running, and the tunnels keep working.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agent.daemon import Timing
from lab.agents import Agent, full_mesh, setup_mesh
from lab.api import make_token
from lab.components import Controller, Etcd, wait_until
from lab.netns import Lab, sh
from tests.support import need_root

pytestmark = pytest.mark.root

OUTAGE_SECONDS = float(os.environ.get("CLADNET_OUTAGE_SECONDS", "300"))
PING_EVERY = 15.0
# An agent retries the controller with a capped backoff (Timing.backoff_max, 30 s,
# ±20 % jitter) for its watch and its heartbeat: after a long outage both are at the
# cap, so the first retry after the restart comes within ~36 s. Four caps is generous
# and still bounded.
RECOVERY_TIMEOUT = 4 * Timing().backoff_max


def _pairs(hosts: list[Agent]) -> list[tuple[Agent, Agent]]:
    return [(a, b) for a in hosts for b in hosts if a is not b]


def _answers(lab: Lab, a: Agent, ip: str) -> bool:
    """One of three pings (2 s each) answered: a lost packet is not an outage."""
    return any(lab.ping(a.ns, ip, wait=2) for _ in range(3))


def _last_seen(ctl: Controller) -> dict[str, float]:
    with ctl.client() as admin:
        r = admin.get("/v1/networks/mesh/hosts")
    assert r.status_code == 200, r.text
    return {h["name"]: h["last_seen"] or 0.0 for h in r.json()}


def _kill(proc, what: str) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL one process we started, by its PID, and reap it."""
    assert proc is not None and proc.poll() is None, f"{what} is not running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_whole_control_plane_down_overlay_keeps_working(
    mesh_controller: Controller, etcd: Etcd, agents, lab: Lab
) -> None:
    hosts, _ = setup_mesh(mesh_controller, agents, 3)
    full_mesh(hosts)
    ips = {a.index: a.overlay_ip() for a in hosts}
    pids = {a.index: a.proc.pid for a in hosts if a.proc is not None}

    # The whole control plane dies: the controller and etcd, kill -9.
    _kill(mesh_controller.proc, "the controller")
    mesh_controller.proc = None
    _kill(etcd.proc, "etcd")
    etcd.proc = None
    down = time.monotonic()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{mesh_controller.url}/healthz", timeout=2)

    # Every 15 s, every pair pings over the overlay; every round must pass.
    rounds: list[float] = []
    while True:
        at = time.monotonic() - down
        failed = [
            f"vm{a.index}->vm{b.index}"
            for a, b in _pairs(hosts)
            if not _answers(lab, a, ips[b.index])
        ]
        dead = [f"vm{a.index}" for a in hosts if a.proc is None or a.proc.poll() is not None]
        assert not failed and not dead, (
            f"round {len(rounds) + 1} at {at:.0f}s into the outage: no answer {failed}, "
            f"agents exited {dead}\n" + "\n".join(a.log_text() for a in hosts)
        )
        rounds.append(at)
        if at >= OUTAGE_SECONDS:
            break
        next_round = min(len(rounds) * PING_EVERY, OUTAGE_SECONDS)
        time.sleep(max(0.0, next_round - (time.monotonic() - down)))
    outage = time.monotonic() - down
    print(
        f"control plane down {outage:.0f}s: {len(rounds)} ping rounds of 6 pairs all passed "
        f"(at {', '.join(f'{t:.0f}' for t in rounds)} s)"
    )

    # Back on the same ports with the same data; nobody touches the agents.
    etcd.start()
    mesh_controller.start()
    back_wall, back = time.time(), time.monotonic()

    # Every old agent heartbeats again …
    def heartbeats_after_restart() -> dict[str, float] | None:
        seen = _last_seen(mesh_controller)
        old = {f"vm{a.index}" for a in hosts}
        return seen if all(seen.get(name, 0.0) > back_wall for name in old) else None

    wait_until(heartbeats_after_restart, RECOVERY_TIMEOUT, 1, what="heartbeats of the old agents")
    heartbeats = time.monotonic() - back
    # … and follows the controller again: a fourth host joins, the others add it.
    with mesh_controller.client() as admin:
        token = make_token(admin, "mesh")
    new = agents(4)[-1]
    new.join(mesh_controller.url, token)
    full_mesh([*hosts, new], timeout=RECOVERY_TIMEOUT)
    print(
        f"after the restart: heartbeats from all old agents in {heartbeats:.1f}s, "
        f"a new agent in the full mesh in {time.monotonic() - back:.1f}s"
    )
    # The same agent processes did all of it.
    assert {a.index: a.proc.pid for a in hosts if a.proc is not None} == pids
    assert all(a.proc is not None and a.proc.poll() is None for a in hosts)


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path], None]]:
    """Mount a small tmpfs at a path (unmounted at the end, whatever happened)."""
    need_root()
    mounted: list[Path] = []

    def mount(path: Path) -> None:
        path.mkdir(parents=True)
        sh("mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "cl-state", str(path))
        mounted.append(path)

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            # Lazy: an agent started by `ip netns exec` holds its own copy of the mount.
            sh("umount", "-l", str(path), check=False)


def _save_errors(agent: Agent) -> list[dict]:
    entries = []
    for path in agent.logs:
        for line in path.read_text().splitlines():
            if "cannot save state" in line:
                entries.append(json.loads(line))
    return entries


def test_full_state_disk_is_reported_and_tunnels_keep_working(
    mesh_controller: Controller, agents, lab: Lab, tmpfs
) -> None:
    first = agents(3)[0]
    tmpfs(first.state_dir)  # before the agent starts: it runs in its own mount namespace
    hosts, token = setup_mesh(mesh_controller, agents, 3)
    full_mesh(hosts)
    # The state is saved at most every 2 s (agent Timing.save_every), not per event.
    saved = wait_until(
        lambda: (m := first.membership()) and len(m["peers"]) == 2 and m, 10, what="the save"
    )

    # The disk fills up.
    r = sh("dd", "if=/dev/zero", f"of={first.state_dir / 'cl-fill'}", "bs=4k", check=False)
    assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
    assert _save_errors(first) == []

    # Changes the agent must save: a fourth host joins; then another host's tags change
    # until a save needs a page the disk no longer has (a journal line can still fit in
    # the last page of the journal's file, which is why one change may not be enough).
    new = agents(4)[-1]
    new.join(mesh_controller.url, token)
    full_mesh([*hosts, new])
    other = hosts[1].membership()["me"]["id"]  # type: ignore[index]
    with mesh_controller.client() as admin:
        for attempt in range(20):
            errors = _save_errors(first)
            if errors:
                break
            tags = {"tags": [f"t{attempt}"]}
            assert admin.put(f"/v1/hosts/{other}/tags", json=tags).is_success
            time.sleep(Timing().save_every + 0.5)  # one save per save_every at most
    assert errors, "no save failed on a full disk"
    for entry in errors:  # one line each: a clear message and the reason, no traceback
        assert entry["level"] == "error" and "exc" not in entry, entry
        assert "No space left on device" in entry["error"], entry
    assert "Traceback" not in first.log_text()
    assert first.proc is not None and first.proc.poll() is None, first.log_text()
    # The last good state is intact and whole (the writes are atomic, a torn journal
    # line does not count): the peers saved before the disk filled, maybe the new one.
    kept = first.membership()
    assert kept is not None and set(saved["peers"]) <= set(kept["peers"]), kept
    assert kept["me"] == saved["me"]
    # … the others, with room on their disks, saved the new peer, …
    wait_until(
        lambda: all(len((a.membership() or {}).get("peers", {})) == 3 for a in hosts[1:]),
        10,
        what="the others' saves",
    )
    # … and every tunnel still passes traffic, the new one included.
    ips = {a.index: a.overlay_ip() for a in [*hosts, new]}
    for a, b in _pairs([*hosts, new]):
        assert _answers(lab, a, ips[b.index]), f"vm{a.index}->vm{b.index}"
    print(f"{len(errors)} save error line(s): {errors[0]['msg']}: {errors[0]['error']}")
