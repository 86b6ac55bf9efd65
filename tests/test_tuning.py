"""``--tune-host``: the agent raises its namespace's UDP socket buffer sysctls (and so its
WireGuard device's socket buffers) and puts the old values back on leave."""

from __future__ import annotations

import re
import sys

import pytest

from agent.tuning import RECORD
from cladnet.mesh import DEFAULT_PORT as PORT
from cladnet.tuning import BUFFER_BYTES, SETTINGS, raised, to_restore
from lab.agents import Agent, full_mesh
from lab.api import make_network, make_token
from lab.netns import Lab


def test_only_smaller_values_are_raised() -> None:
    current = {"net.core.rmem_max": 212992, "net.core.wmem_max": 16 << 20}
    assert raised(current) == {"net.core.rmem_max": BUFFER_BYTES}  # never lowered


def test_only_values_still_ours_are_put_back() -> None:
    saved = {
        "net.core.rmem_max": {"before": 212992, "set": BUFFER_BYTES},
        "net.core.wmem_max": {"before": 212992, "set": BUFFER_BYTES},
        "net.core.rmem_default": {"before": 212992, "set": BUFFER_BYTES},
    }
    current = {"net.core.rmem_max": BUFFER_BYTES, "net.core.wmem_max": 1 << 30}
    # wmem_max was changed by someone since; rmem_default is missing on this kernel.
    assert to_restore(saved, current) == {"net.core.rmem_max": 212992}


def sysctls(lab: Lab, ns: str) -> dict[str, int]:
    return {
        name: int(lab.run(ns, "cat", f"/proc/sys/{name.replace('.', '/')}").stdout)
        for name in SETTINGS
    }


def device_buffers(lab: Lab, ns: str, port: int) -> set[tuple[int, int]]:
    """(receive, send) buffer sizes of the UDP sockets bound to ``port`` in ``ns``."""
    out = lab.run(ns, "ss", "-uanm", "sport", f"= :{port}").stdout
    return {(int(r), int(t)) for r, t in re.findall(r"rb(\d+),t\d+,tb(\d+)", out)}


def leave(a: Agent) -> None:
    a.stop()
    leave_args = ["leave", "--state-dir", str(a.state_dir), "--backend", "userspace"]
    r = a.lab.run(a.ns, sys.executable, "-m", "agent.main", *leave_args, check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.root
def test_tune_host_raises_the_buffers_and_leave_puts_them_back(
    mesh_controller, agents, lab
) -> None:
    """The tuned agent's wireguard-go sockets get 7 MiB buffers, the other agent's keep
    the default. The sysctls are raised and put back where this namespace may write
    them; Linux 6.x shows them read-only in a namespace (the host's values), and then
    nothing is changed or recorded."""
    plain, tuned = agents(2)
    before = sysctls(lab, tuned.ns)
    assert all(v < BUFFER_BYTES for v in before.values()), before  # else nothing to see
    path = "/proc/sys/net/core/rmem_max"
    writable = lab.run(tuned.ns, "test", "-w", path, check=False).returncode == 0
    with mesh_controller.client() as admin:
        make_network(admin, "mesh", cidr="10.213.0.0/24")
        token = make_token(admin, "mesh")
    plain.join(mesh_controller.url, token)
    tuned.join(mesh_controller.url, token, "--tune-host")
    full_mesh([plain, tuned])

    # setsockopt sizes are doubled by the kernel (bookkeeping overhead), defaults are not.
    assert device_buffers(lab, tuned.ns, PORT) == {(2 * BUFFER_BYTES, 2 * BUFFER_BYTES)}, (
        tuned.log_text()
    )
    assert device_buffers(lab, plain.ns, PORT) == {
        (before["net.core.rmem_default"], before["net.core.wmem_default"])
    }
    assert sysctls(lab, plain.ns) == before
    if writable:
        assert sysctls(lab, tuned.ns) == dict.fromkeys(SETTINGS, BUFFER_BYTES)
        assert (tuned.state_dir / RECORD).exists()
    else:
        assert sysctls(lab, tuned.ns) == before
        assert not (tuned.state_dir / RECORD).exists()

    leave(tuned)
    assert sysctls(lab, tuned.ns) == before
    assert not (tuned.state_dir / RECORD).exists()
