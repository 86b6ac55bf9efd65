"""Real agents in namespaces answer their network's names; `dig` asks them.

Each namespace gets its own hosts file (/etc/netns/<ns>/hosts, which `ip netns exec`
mounts over /etc/hosts): the agents run in hosts-file mode against it, so the
machine's own /etc/hosts and /etc/resolv.conf are never touched (checked).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.agents import Agent, full_mesh
from lab.api import make_network, make_token
from lab.components import Controller, wait_until
from lab.netns import Lab

pytestmark = pytest.mark.root


DOMAIN = "mesh.cladnet.internal"
BEGIN = "# BEGIN cladnet mesh"


def _digest(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent"


@pytest.fixture
def netns_hosts(lab: Lab) -> Iterator[Callable[[str], Path]]:
    """A hosts file per namespace, in /etc/netns/<ns>/ (removed afterwards)."""
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed (bind9-dnsutils; run deploy/setup.sh)")
    made: list[Path] = []

    def make(ns: str) -> Path:
        path = Path("/etc/netns") / ns / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        made.append(path.parent)
        path.write_text("127.0.0.1\tlocalhost\n")
        return path

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def dig(lab: Lab, ns: str, server: str, name: str, *opts: str) -> tuple[str, list[str]]:
    """(status, answers) of one query from namespace ``ns`` to ``server``."""
    r = lab.run(
        ns,
        "dig",
        f"@{server}",
        "+tries=1",
        "+time=2",
        "+noall",
        "+comments",
        "+answer",
        *opts,
        name,
        check=False,
    )
    status = next(
        (
            line.split("status: ")[1].split(",")[0]
            for line in r.stdout.splitlines()
            if "status: " in line
        ),
        "no answer",
    )
    answers = [
        line.split()[-1] for line in r.stdout.splitlines() if line and not line.startswith(";")
    ]
    return status, answers


def _join(a: Agent, url: str, token: str, hosts_file: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CLADNET_DNS", "hosts")
    monkeypatch.setenv("CLADNET_HOSTS_FILE", str(hosts_file))
    a.join(url, token)  # the environment is copied when the agent starts


def test_agents_answer_names_that_follow_joins_and_leaves(
    mesh_controller: Controller, agents, lab: Lab, netns_hosts, monkeypatch
) -> None:
    before = {p: _digest(p) for p in ("/etc/resolv.conf", "/etc/hosts")}
    with mesh_controller.client() as admin:
        make_network(admin, "mesh", cidr="10.213.0.0/24", keepalive=5)
        token = make_token(admin, "mesh")
    hosts = agents(2)
    files = {a.index: netns_hosts(a.ns) for a in agents(3)}
    for a in hosts:
        _join(a, mesh_controller.url, token, files[a.index], monkeypatch)
    full_mesh(hosts)
    vm1, vm2 = hosts
    ip1, ip2 = vm1.overlay_ip(), vm2.overlay_ip()

    # vm1 asks its own agent for vm2, over UDP and TCP, and vm2's agent over the tunnel.
    name2 = f"vm2.{DOMAIN}"
    assert wait_until(
        lambda: dig(lab, vm1.ns, ip1, name2) == ("NOERROR", [ip2]), 20, what="vm2's name"
    ), vm1.log_text()
    assert dig(lab, vm1.ns, ip1, name2.upper(), "+tcp") == ("NOERROR", [ip2])
    assert dig(lab, vm1.ns, ip2, f"vm1.{DOMAIN}") == ("NOERROR", [ip1])
    assert dig(lab, vm1.ns, ip1, ip2, "-x")[1] == [f"{name2}."]
    # Unknown in the zone: NXDOMAIN; outside it: REFUSED, never forwarded.
    assert dig(lab, vm1.ns, ip1, f"nope.{DOMAIN}")[0] == "NXDOMAIN"
    assert dig(lab, vm1.ns, ip1, "example.com")[0] == "REFUSED"
    assert dig(lab, vm1.ns, ip1, "vm2.other.cladnet.internal")[0] == "REFUSED"

    # Junk over UDP and TCP is dropped and counted; the server keeps answering.
    junk = (
        "import socket; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"[u.sendto(bytes([i]) * i, ('{ip1}', 53)) for i in range(1, 200, 7)]; "
        f"t = socket.create_connection(('{ip1}', 53)); t.sendall(b'\\xff\\xff' + b'x' * 99)"
    )
    lab.run(vm1.ns, sys.executable, "-c", junk)
    assert wait_until(lambda: "dropping junk DNS packets" in vm1.log_text(), 10, what="junk log")
    assert dig(lab, vm1.ns, ip1, name2) == ("NOERROR", [ip2])

    # The hosts-file fallback: the namespace's resolver finds the name without DNS.
    assert wait_until(
        lambda: f"{ip2}\t{name2}" in files[1].read_text(), 10, what="vm1's hosts block"
    )
    r = lab.run(vm1.ns, "getent", "hosts", name2)
    assert r.stdout.split() == [ip2, name2]
    assert files[1].read_text().startswith("127.0.0.1\tlocalhost\n")

    # A third host joins: resolvable at once from vm1, and in vm1's hosts block.
    vm3 = agents(3)[-1]
    _join(vm3, mesh_controller.url, token, files[3], monkeypatch)
    ip3 = vm3.overlay_ip()
    name3 = f"vm3.{DOMAIN}"
    assert wait_until(
        lambda: dig(lab, vm1.ns, ip1, name3) == ("NOERROR", [ip3]), 30, what="vm3's name"
    ), vm1.log_text()
    assert wait_until(lambda: name3 in files[1].read_text(), 10, what="vm3 in vm1's block")
    assert wait_until(lambda: BEGIN in files[3].read_text(), 10, what="vm3's own block")

    status = json.loads(
        lab.run(
            vm1.ns,
            sys.executable,
            "-m",
            "agent.main",
            "status",
            "--state-dir",
            str(vm1.state_dir),
            "--backend",
            "userspace",
        ).stdout
    )[0]["dns"]
    assert status["mode"] == "hosts" and status["name"] == f"vm1.{DOMAIN}", status
    assert status["server"] == f"{ip1}:53" and status["error"] is None, status

    # An admin removes vm3 while its agent runs: the agent takes its block away;
    # vm1 answers NXDOMAIN for it and drops it from its own block.
    with mesh_controller.client() as admin:
        listed = admin.get("/v1/networks/mesh/hosts").json()
        host_id = next(h["id"] for h in listed if h["name"] == "vm3")
        assert admin.delete(f"/v1/hosts/{host_id}").status_code in (200, 204)
    assert wait_until(
        lambda: dig(lab, vm1.ns, ip1, name3)[0] == "NXDOMAIN", 30, what="vm3 gone from DNS"
    )
    assert wait_until(lambda: name3 not in files[1].read_text(), 10, what="vm3 out of vm1's block")
    assert wait_until(lambda: BEGIN not in files[3].read_text(), 10, what="vm3's block removed")
    assert files[3].read_text() == "127.0.0.1\tlocalhost\n"

    # vm2 leaves with the CLI while its agent is stopped: its block goes too.
    vm2.stop()
    r = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            vm2.ns,
            sys.executable,
            "-m",
            "agent.main",
            "leave",
            "--state-dir",
            str(vm2.state_dir),
            "--backend",
            "userspace",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert files[2].read_text() == "127.0.0.1\tlocalhost\n"
    assert wait_until(
        lambda: dig(lab, vm1.ns, ip1, name2)[0] == "NXDOMAIN", 30, what="vm2 gone from DNS"
    )

    # Nothing outside the test's own files changed; no resolv.conf anywhere.
    assert {p: _digest(p) for p in before} == before
    assert not any((f.parent / "resolv.conf").exists() for f in files.values())
