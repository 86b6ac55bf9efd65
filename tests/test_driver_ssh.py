"""The ssh driver against a real sshd in a network namespace (the "existing host").

The namespace shares our filesystem, so the remote side's files (remote_dir, unit_dir,
the fake agent's event log) are plain paths under tmp_path we can look at.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.drivers import load
from controller.drivers.base import RUNNING, SUSPENDED, DriverError, NoSuchVm, VmSpec
from lab.components import free_port, wait_until
from lab.netns import Lab, sh
from tests.support import need_root

TOKEN = f"clj_{secrets.token_hex(16)}"


@dataclass
class Remote:
    """A namespace running sshd, and where its "host" keeps things."""

    lab: Lab
    ns: str
    address: str
    port: int
    key: Path  # authorized for root
    wrong_key: Path  # not authorized
    host_pub: str  # the sshd host key, "ssh-ed25519 AAAA…"
    tmp: Path
    events: Path  # what the fake agent was asked to do, one line each

    def options(self, **extra: Any) -> dict[str, Any]:
        """Driver options: host h1 is this sshd, the others fail in known ways."""
        closed = next(p for p in iter(free_port, None) if p != self.port)
        hosts = {
            "h1": {"address": self.address, "port": self.port, "region": "lab"},
            "badkey": {"address": self.address, "port": self.port, "region": "badkey"},
            # Nothing listens there: refused at once, inside our namespace.
            "closed": {"address": self.address, "port": closed, "region": "closed"},
        }
        hosts["h1"]["identity_file"] = str(self.key)
        hosts["badkey"]["identity_file"] = str(self.wrong_key)
        hosts["closed"]["identity_file"] = str(self.key)
        return {
            "hosts": hosts,
            "state_dir": str(self.tmp / "state"),
            "agent_command": str(self.tmp / "fake-agent"),
            "unit_dir": str(self.tmp / "units"),
            "remote_dir": str(self.tmp / "remote"),
            "connect_timeout": 3,
            "command_timeout": 30,
            **extra,
        }

    def user_data(self, marker: Path) -> str:
        """Joins like real user-data would; the token stays inside the script."""
        return (
            "#!/bin/sh\n"
            f"token='{TOKEN}'\n"
            "addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}')\n"
            f'printf \'vm=%s token=%s addr=%s\\n\' "$CLADNET_VM" "$token" "$addr" > {marker}\n'
            f"exec {self.tmp / 'fake-agent'} run\n"
        )

    def agent_pid(self, name: str) -> int:
        return int((self.tmp / "remote" / name / "agent.pid").read_text().split()[0])

    def event_lines(self) -> list[str]:
        return self.events.read_text().splitlines() if self.events.exists() else []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def keygen(path: Path) -> Path:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cladnet-test", "-f", str(path))
    return path


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    need_root()
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("sshd is not installed (apt-get install openssh-server)")
    host_key, key = keygen(tmp_path / "host_key"), keygen(tmp_path / "id_test")
    (tmp_path / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    port = free_port()
    cfg = tmp_path / "sshd_config"
    cfg.write_text(
        f"Port {port}\nHostKey {host_key}\nPidFile {tmp_path / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    events = tmp_path / "events"
    agent = tmp_path / "fake-agent"
    agent.write_text(
        f'#!/bin/sh\necho "$1 $CLADNET_VM" >> {events}\n'
        'if [ "$1" = run ]; then exec sleep 300; fi\n'
    )
    agent.chmod(0o755)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    lab = Lab()
    sshd: subprocess.Popen[bytes] | None = None
    try:
        ns = lab.add_host(1)
        with (tmp_path / "sshd.log").open("wb") as sshd_log:
            sshd = lab.popen(ns, ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=sshd_log)
        address = lab.address(1)

        def listening() -> bool:
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex((address, port)) == 0

        wait_until(listening, timeout=10, what="sshd in the namespace")
        yield Remote(
            lab=lab,
            ns=ns,
            address=address,
            port=port,
            key=key,
            wrong_key=keygen(tmp_path / "id_wrong"),
            host_pub=" ".join(Path(f"{host_key}.pub").read_text().split()[:2]),
            tmp=tmp_path,
            events=events,
        )
    finally:
        # Whatever still runs in the namespace was started by this test (sshd, its
        # sessions, detached agents): end each by its pid, then remove the lab.
        if sshd is not None:
            sshd.kill()
            sshd.wait(timeout=10)
        for ns in lab.namespaces:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        lab.cleanup()


@pytest.fixture
def command_lines() -> Iterator[set[str]]:
    """Every process command line seen while the test runs (polled from /proc)."""
    seen: set[str] = set()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.003):
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        seen.add(Path(entry.path, "cmdline").read_bytes().decode(errors="replace"))
                    except OSError:
                        pass

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join()


@pytest.mark.root
async def test_lifecycle_on_a_real_host(
    remote: Remote, command_lines: set[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    driver = load("ssh", remote.options())
    assert [r.name for r in await driver.regions()] == ["badkey", "closed", "lab"]
    marker = remote.tmp / "marker"
    spec = VmSpec(name="vm1", region="lab", user_data=remote.user_data(marker))

    vm = await driver.create(spec)
    assert (vm.power, vm.private_ip, vm.public_ip) == (RUNNING, remote.address, None)
    assert vm.details["mode"] == "detached" and "systemd is not running" in vm.details["note"]
    state = remote.tmp / "state" / "vms.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["vm1"]["host"] == "h1"
    # accept-new recorded the host key in the driver's own known_hosts.
    assert remote.host_pub in (remote.tmp / "state" / "known_hosts").read_text()
    vm_dir = remote.tmp / "remote" / "vm1"
    assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((vm_dir / "user-data").stat().st_mode) == 0o700
    assert (remote.tmp / "units" / "cladnet-agent.service").read_text().startswith("[Unit]")
    assert (remote.tmp / "units" / "cladnet-agent-commands.service").exists()  # not enabled
    # The user-data ran on the "host": in its namespace, with the VM's environment.
    wait_until(marker.exists, what="the user-data's marker")
    addr = f"{remote.address}/24"
    assert marker.read_text() == f"vm=vm1 token={TOKEN} addr={addr}\n"
    pid = remote.agent_pid("vm1")
    assert sh("ip", "netns", "identify", str(pid)).stdout.strip() == remote.ns
    wait_until(lambda: remote.event_lines() == ["run vm1"], what="the agent started")

    # Idempotent: the same name is the same VM, nothing runs twice.
    assert await driver.create(spec) == vm
    assert remote.agent_pid("vm1") == pid and remote.event_lines() == ["run vm1"]
    with pytest.raises(DriverError, match="all 1 hosts of region 'lab' are in use"):
        await driver.create(VmSpec(name="vm2", region="lab"))

    suspended = await driver.suspend("vm1")
    assert suspended.power == SUSPENDED and not alive(pid)
    assert (await driver.get("vm1")).power == SUSPENDED

    resumed = await driver.resume("vm1")
    assert resumed.power == RUNNING
    wait_until(lambda: remote.event_lines() == ["run vm1", "run vm1"], what="agent run again")
    pid2 = remote.agent_pid("vm1")
    assert pid2 != pid and alive(pid2)
    assert sh("ip", "netns", "identify", str(pid2)).stdout.strip() == remote.ns

    await driver.reboot("vm1")
    pid3 = remote.agent_pid("vm1")
    assert pid3 != pid2 and alive(pid3) and not alive(pid2)

    # A driver built again (controller restart) finds the VM in its state file.
    again = load("ssh", remote.options())
    assert [v.name for v in await again.list()] == ["vm1"]
    assert (await again.create(spec)).name == "vm1"

    await driver.terminate("vm1")
    assert not alive(pid3)
    assert remote.event_lines()[-1] == "leave vm1"
    assert not vm_dir.exists() and not (remote.tmp / "units" / "cladnet-agent.service").exists()
    assert not (remote.tmp / "units" / "cladnet-agent-commands.service").exists()
    assert json.loads(state.read_text()) == {}
    await driver.terminate("vm1")  # gone is fine
    with pytest.raises(NoSuchVm):
        await driver.get("vm1")
    assert await driver.list() == []

    assert "vm1 runs on h1 (detached)" in caplog.text  # our logs were captured
    assert TOKEN not in caplog.text
    assert not [c for c in command_lines if TOKEN in c]
    assert any("sh -s" in c for c in command_lines)  # the poller did see our ssh calls


@pytest.mark.root
async def test_unreachable_hosts_give_readable_errors(
    remote: Remote, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    driver = load("ssh", remote.options())
    user_data = remote.user_data(remote.tmp / "marker")
    cases = {
        "badkey": r"\(ssh\): .*Permission denied \(publickey\)",
        "closed": r"\(ssh\): .*Connection refused",
    }
    for region, message in cases.items():
        with pytest.raises(DriverError, match=message) as e:
            await driver.create(VmSpec(name=f"vm-{region}", region=region, user_data=user_data))
        assert TOKEN not in str(e.value)
    # A failed create does not keep the host.
    assert await driver.list() == []
    with pytest.raises(DriverError, match="no region 'mars'"):
        await driver.create(VmSpec(name="vm-x", region="mars"))

    # A known_hosts file without this host's key: refused, nothing runs.
    known = remote.tmp / "known_hosts"
    known.write_text("")
    strict = load("ssh", remote.options(known_hosts=str(known)))
    with pytest.raises(DriverError, match="Host key verification failed"):
        await strict.create(VmSpec(name="vm-strict", region="lab", user_data=user_data))
    assert not (remote.tmp / "marker").exists()
    # With the key in it, the same create works.
    known.write_text(f"[{remote.address}]:{remote.port} {remote.host_pub}\n")
    assert (
        await strict.create(VmSpec(name="vm-strict", region="lab", user_data=user_data))
    ).power == RUNNING
    await strict.terminate("vm-strict")
    assert TOKEN not in caplog.text


async def test_bad_options_and_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="bad address"):
        load("ssh", {"hosts": {"h": {"address": "-oProxyCommand=x"}}, "state_dir": str(tmp_path)})
    with pytest.raises(DriverError, match="bad options"):
        load("ssh", {"hosts": {"h": {}}, "state_dir": str(tmp_path), "nonsense": 1})
    driver = load("ssh", {"hosts": {"h": {}}, "state_dir": str(tmp_path)})
    with pytest.raises(DriverError, match="bad VM name"):
        await driver.create(VmSpec(name="../etc", region="default"))
