"""Access policy enforced by real agents in network namespaces: the peer lists and the
nftables filter follow the policy, without restarts; the filter goes on leave."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cladnet import policy as acl
from lab.agents import Agent, full_mesh, setup_mesh
from lab.components import Controller, wait_until
from lab.netns import Lab

PORT = 5432
SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)\n"
    "while True:\n"
    "    c,_=s.accept(); c.sendall(b'hi'); c.close()\n"
)
CLIENT = (
    "import socket,sys\n"
    "c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)\n"
    "assert c.recv(2) == b'hi'\n"
)
WEB_TO_DB: dict[str, Any] = {
    "groups": {"web": ["tag:web"], "db": ["tag:db"]},
    "rules": [{"src": "group:web", "dst": "group:db", "proto": "tcp", "ports": [PORT]}],
    "tests": [
        {"src": "group:web", "dst": "group:db", "proto": "tcp", "port": PORT, "expect": "allow"},
        {"src": "group:db", "dst": "group:web", "proto": "tcp", "port": PORT, "expect": "deny"},
    ],
}


@pytest.fixture
def servers(lab: Lab) -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:  # processes outlive their namespace: stop them ourselves
        proc.kill()
        proc.wait(10)


def _connects(a: Agent, address: str) -> bool:
    r = a.lab.run(a.ns, sys.executable, "-c", CLIENT, address, str(PORT), check=False)
    return r.returncode == 0


def _table(a: Agent) -> str | None:
    r = a.lab.run(a.ns, "nft", "list", "table", "inet", acl.table_name(a.interface), check=False)
    return r.stdout if r.returncode == 0 else None


def _keys(a: Agent) -> set[str]:
    return set(a.wg_peers())


def test_policy_is_enforced_by_peer_lists_and_packet_filters(
    mesh_controller: Controller, agents, lab: Lab, servers: list[subprocess.Popen]
) -> None:
    hosts, _ = setup_mesh(mesh_controller, agents, 3)
    full_mesh(hosts)
    web, db, other = hosts
    ips = {a.index: a.overlay_ip() for a in hosts}
    # A new network's explicit allow-all policy is loaded as such on every host.
    for a in hosts:
        table = wait_until(lambda a=a: _table(a), 10, what=f"vm{a.index}'s filter")
        assert 'accept comment "rule 0"' in table and "saddr" not in table, table
    for a in (web, db):  # the same listener on both: only the policy makes a difference
        servers.append(lab.popen(a.ns, [sys.executable, "-c", SERVER, ips[a.index], str(PORT)]))
    assert wait_until(
        lambda: _connects(db, ips[1]) and _connects(web, ips[2]), 10, what="listeners"
    )

    admin = mesh_controller.client()
    by_name = {h["name"]: h for h in admin.get("/v1/networks/mesh/hosts").json()}
    keys = {a.index: by_name[f"vm{a.index}"]["public_key"] for a in hosts}
    assert admin.put(f"/v1/hosts/{by_name['vm1']['id']}/tags", json={"tags": ["web"]}).is_success
    assert admin.put(f"/v1/hosts/{by_name['vm2']['id']}/tags", json={"tags": ["db"]}).is_success
    changed = time.monotonic()
    r = admin.put("/v1/networks/mesh/policy", json=WEB_TO_DB)
    assert r.status_code == 200, r.text

    # (1) Peer lists: vm3 has no flow with anyone and vanishes; web and db keep each
    # other (a one-way rule keeps the source in the destination's list).
    wait_until(lambda: _keys(web) == {keys[2]}, 10, what="web's peers to follow the policy")
    wait_until(lambda: _keys(db) == {keys[1]}, 10, what="db's peers to follow the policy")
    wait_until(lambda: _keys(other) == set(), 10, what="vm3 to lose every peer")
    wait_until(lambda: "tcp dport 5432" in (_table(db) or ""), 10, what="db's filter")
    print(f"policy change enforced on every host {time.monotonic() - changed:.2f}s after the write")

    # The agent says what it enforces (from its state file, saved at most every 2 s).
    def enforced() -> object:
        r = lab.run(
            db.ns, sys.executable, "-m", "agent.main", "status", "--state-dir", str(db.state_dir)
        )
        return json.loads(r.stdout)[0]["policy"]

    wait_until(lambda: enforced() == {"version": 1, "allows_all": False}, 10, what="status")

    # (2) Filters: the reachability matrix is the one the policy computes.
    policy = acl.parse(WEB_TO_DB)
    records = {
        a.index: by_name[f"vm{a.index}"] | {"tags": t} for a, t in ((web, ["web"]), (db, ["db"]))
    }
    for src, dst in ((web, db), (db, web)):
        want_tcp = acl.evaluate(policy, records[src.index], records[dst.index], "tcp", PORT).allowed
        want_ping = acl.evaluate(
            policy, records[src.index], records[dst.index], "icmp", None
        ).allowed
        assert _connects(src, ips[dst.index]) == want_tcp, (src.ns, dst.ns, _table(dst))
        assert lab.ping(src.ns, ips[dst.index]) == want_ping, (src.ns, dst.ns)
    assert _connects(web, ips[2]) and not _connects(db, ips[1])
    assert not lab.ping(other.ns, ips[2]) and not _connects(other, ips[2])

    # A change of policy takes effect with no restart: db may now ping web.
    loosened = {
        **WEB_TO_DB,
        "rules": [*WEB_TO_DB["rules"], {"src": "group:db", "dst": "group:web", "proto": "icmp"}],
    }
    pids = [a.proc.pid for a in hosts if a.proc is not None]
    assert admin.put("/v1/networks/mesh/policy", json=loosened).status_code == 200
    assert wait_until(lambda: lab.ping(db.ns, ips[1]), 10, what="db → web ping after the change")
    assert not _connects(db, ips[1])  # still no TCP that way
    # Back to allow-all: vm3 returns everywhere.
    assert admin.put("/v1/networks/mesh/policy", json=acl.ALLOW_ALL).status_code == 200
    full_mesh(hosts)
    assert _connects(db, ips[1])
    assert [a.proc.pid for a in hosts if a.proc is not None] == pids

    # Leaving removes the filter with the interface: removed by an admin (the agent
    # tears down on its own DELETED event) …
    assert admin.delete(f"/v1/hosts/{by_name['vm3']['id']}").status_code == 200
    wait_until(lambda: _table(other) is None, 15, what="vm3's filter to go with its removal")
    # … or leaving itself.
    web.stop()
    r = lab.run(
        web.ns,
        sys.executable,
        "-m",
        "agent.main",
        "leave",
        "--state-dir",
        str(web.state_dir),
        "--backend",
        "userspace",
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert _table(web) is None
    admin.close()
