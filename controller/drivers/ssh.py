"""The ``ssh`` driver: "VMs" are machines that already exist, reached with the system ssh.

A VM name is mapped to a free host of the inventory (``hosts``); creating it runs the
VM's user-data there (the script that joins the agent) and installs the agent's unit.
Every remote step is a shell script sent on ssh's stdin (``sh -s``), so the user-data and
its join token are never on a command line, on either side, nor in our logs.

Where systemd runs (and ``unit_dir`` is /etc/systemd/system) the user-data runs to its
end (it should join with ``--no-run``, as deploy/install-agent.sh does) and the unit is
enabled; otherwise the user-data runs detached in its own session and suspend / resume
stop and start that process group (``<agent_command> run``), recorded in a pidfile.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shlex
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cladnet.files import write_atomic
from controller.drivers import base
from controller.drivers.base import RUNNING, SUSPENDED, DriverError, NoSuchVm, Region, Vm, VmSpec

log = logging.getLogger("cladnet.controller.drivers.ssh")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT_NAME = "cladnet-agent.service"
# Runs remote commands outside the agent's sandbox; enabled by groups with allow_commands.
COMMANDS_UNIT_NAME = "cladnet-agent-commands.service"
SYSTEMD_UNIT_DIR = "/etc/systemd/system"
# Names become remote paths: nothing that could climb out of remote_dir.
VM_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}")
VENV_AGENT = "/opt/cladnet/venv/bin/cladnet-agent"  # where install-agent.sh puts it

# Shell functions every remote script starts with. The pidfile holds the process group
# and the boot id, so a pid from before a reboot is never signalled.
PRELUDE = r"""
set -eu
umask 077
PIDFILE="$DIR/agent.pid"
die() { echo "$*" >&2; exit 1; }
systemd_here() { [ -d /run/systemd/system ] && [ "$UNIT_DIR" = /etc/systemd/system ]; }
running() {  # a process of the recorded group is alive (zombies do not count)
  [ -s "$PIDFILE" ] || return 1
  read -r pgid boot < "$PIDFILE" || return 1
  [ "$boot" = "$(cat /proc/sys/kernel/random/boot_id)" ] || return 1
  for f in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null < "$f" || continue
    set -- ${line##*") "}
    if [ "${3:-}" = "$pgid" ] && [ "$1" != Z ]; then return 0; fi
  done
  return 1
}
start_detached() {  # "$@" in a new session, output appended to the log
  setsid nohup "$@" </dev/null >>"$DIR/agent.log" 2>&1 &
  echo "$! $(cat /proc/sys/kernel/random/boot_id)" > "$PIDFILE"
}
stop_detached() {
  if running; then
    read -r pgid boot < "$PIDFILE"
    kill -TERM -"$pgid" 2>/dev/null || true
    i=0
    while running; do
      i=$((i + 1))
      if [ "$i" = 50 ]; then kill -KILL -"$pgid" 2>/dev/null || true; fi
      if [ "$i" -gt 70 ]; then die "the agent (process group $pgid) does not stop"; fi
      sleep 0.1
    done
  fi
  rm -f "$PIDFILE"
}
start_agent() { running || start_detached sh -c "exec $AGENT run"; }
load_env() { set -a; . "$DIR/env"; set +a; }
"""

CREATE = r"""
mkdir -p "$DIR" "$UNIT_DIR"
chmod 0700 "$DIR"
put "$DIR/env" 0600 "$ENV_B64"
put "$DIR/user-data" 0700 "$USER_DATA_B64"
put "$UNIT_DIR/cladnet-agent.service" 0644 "$UNIT_B64"
put "$UNIT_DIR/cladnet-agent-commands.service" 0644 "$COMMANDS_UNIT_B64"
if [ -n "$WHEELHOUSE" ]; then
  bash "$WHEELHOUSE/install-agent.sh" --wheels "$WHEELHOUSE" --no-systemd \
    >>"$DIR/install.log" 2>&1 || die "install-agent.sh failed; see $DIR/install.log on the host"
fi
load_env
if systemd_here; then
  if [ ! -e "$DIR/user-data.done" ]; then
    "$DIR/user-data" </dev/null >>"$DIR/user-data.log" 2>&1 \
      || die "the user-data failed (exit $?); see $DIR/user-data.log on the host"
    touch "$DIR/user-data.done"
  fi
  systemctl daemon-reload
  out=$(systemctl enable --now cladnet-agent.service 2>&1) \
    || die "systemctl enable --now cladnet-agent.service failed: $(echo "$out" | tail -n 1)"
  echo systemd
else
  running || start_detached "$DIR/user-data"
  echo detached
fi
"""

# What suspend / resume / reboot run, by mode.
POWER = {
    "suspend": (
        "systemctl stop cladnet-agent.service cladnet-agent-commands.service",
        "stop_detached",
    ),
    "resume": ("systemctl start cladnet-agent.service", "load_env; start_agent"),
    "reboot": ("systemctl restart cladnet-agent.service", "stop_detached; load_env; start_agent"),
}

TERMINATE = r"""
if systemd_here; then
  systemctl disable --now cladnet-agent.service cladnet-agent-commands.service >/dev/null 2>&1 \
    || true
fi
if [ -d "$DIR" ]; then
  stop_detached
  if [ -f "$DIR/env" ]; then load_env; fi
  timeout 60 sh -c "exec $AGENT leave" </dev/null >>"$DIR/agent.log" 2>&1 \
    || echo "cladnet-agent leave failed (ignored)" >&2
fi
rm -f "$UNIT_DIR/cladnet-agent.service" "$UNIT_DIR/cladnet-agent-commands.service"
if systemd_here; then systemctl daemon-reload; fi
rm -rf "$DIR"
"""

# Writes a file from base64 (no heredoc delimiter can clash with the content).
PUT = r"""
put() { printf '%s' "$3" | base64 -d > "$1.tmp"; chmod "$2" "$1.tmp"; mv -f "$1.tmp" "$1"; }
"""


@dataclass(frozen=True)
class Host:
    key: str
    address: str
    port: int
    user: str
    region: str
    identity_file: str | None
    public_ip: str | None

    @classmethod
    def parse(cls, key: str, entry: Mapping[str, Any]) -> Host:
        """One inventory entry; options an attacker could turn into ssh flags are refused."""
        address = str(entry.get("address") or key)
        user = str(entry.get("user", "root"))
        for what, value in (("address", address), ("user", user)):
            if not value or value.startswith("-") or any(c.isspace() for c in value):
                raise DriverError(f"ssh driver: host {key!r} has a bad {what} {value!r}")
        try:
            port = int(entry.get("port", 22))
        except (TypeError, ValueError) as e:
            raise DriverError(f"ssh driver: host {key!r} has a bad port") from e
        identity = entry.get("identity_file")
        public = entry.get("public_ip")
        return cls(
            key=key,
            address=address,
            port=port,
            user=user,
            region=str(entry.get("region", "default")),
            identity_file=str(identity) if identity else None,
            public_ip=str(public) if public else None,
        )


class Driver(base.Driver):
    """Existing hosts over ssh; the name → host mapping is kept in ``state_dir``."""

    def __init__(
        self,
        *,
        hosts: Mapping[str, Mapping[str, Any]],
        state_dir: str | os.PathLike[str],
        known_hosts: str | None = None,
        ssh: str = "ssh",
        agent_command: str = "cladnet-agent",
        wheelhouse: str | None = None,
        unit_dir: str = SYSTEMD_UNIT_DIR,
        remote_dir: str = "/var/lib/cladnet-ssh",
        connect_timeout: float = 10,
        command_timeout: float = 300,
    ) -> None:
        if not hosts:
            raise DriverError("ssh driver: the 'hosts' inventory is empty")
        self.hosts = {key: Host.parse(key, entry) for key, entry in hosts.items()}
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.known_hosts = known_hosts
        self.ssh = ssh
        # The wheelhouse installs into /opt/cladnet/venv, off the PATH.
        default_agent = wheelhouse is not None and agent_command == "cladnet-agent"
        self.agent_command = VENV_AGENT if default_agent else agent_command
        self.wheelhouse = Path(wheelhouse) if wheelhouse else None
        self.unit_dir = unit_dir
        self.remote_dir = remote_dir
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._state_file = self.state_dir / "vms.json"
        self._vms: dict[str, dict[str, str]] = self._load()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # ---- the mapping -------------------------------------------------------------------

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data: dict[str, dict[str, str]] = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise DriverError(f"ssh driver: cannot read {self._state_file}: {e}") from e
        return data

    def _save(self) -> None:
        # Written whole and renamed: a crash leaves the old or the new mapping, never half.
        write_atomic(self._state_file, json.dumps(self._vms, indent=2, sort_keys=True))

    def _record(self, name: str) -> dict[str, str]:
        record = self._vms.get(name)
        if record is None:
            raise NoSuchVm(f"ssh driver: no VM named {name!r}")
        return record

    def _host(self, record: dict[str, str]) -> Host:
        host = self.hosts.get(record["host"])
        if host is None:
            raise DriverError(f"ssh driver: host {record['host']!r} is no longer in the inventory")
        return host

    def _vm(self, name: str) -> Vm:
        record = self._record(name)
        host = self.hosts.get(record["host"])
        details = {"host": record["host"], "mode": record.get("mode", "")}
        if record.get("mode") == "detached":
            details["note"] = (
                "systemd is not running on the host: the agent runs detached, "
                f"log {self._dir(name)}/agent.log"
            )
        if not record.get("mode"):
            details["state"] = "creating"
        return Vm(
            name=name,
            region=record["region"],
            power=record["power"],
            private_ip=host.address if host else None,
            public_ip=host.public_ip if host else None,
            details=details,
        )

    # ---- ssh ---------------------------------------------------------------------------

    def _dir(self, name: str) -> str:
        return f"{self.remote_dir.rstrip('/')}/{name}"

    def _ssh_args(self, host: Host, remote_command: str) -> list[str]:
        if self.known_hosts:
            known, checking = self.known_hosts, "yes"
        else:
            known, checking = str(self.state_dir / "known_hosts"), "accept-new"
        args = [
            self.ssh,
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={max(1, round(self.connect_timeout))}",
            "-o",
            f"StrictHostKeyChecking={checking}",
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(host.port),
            "-l",
            host.user,
        ]
        if host.identity_file:
            args += ["-i", host.identity_file, "-o", "IdentitiesOnly=yes"]
        return [*args, "--", host.address, remote_command]

    async def _ssh(self, host: Host, what: str, stdin: bytes | int, remote: str = "sh -s") -> str:
        """Run ``remote`` on ``host`` with ``stdin`` (bytes, or a file descriptor); its stdout."""
        proc = await asyncio.create_subprocess_exec(
            *self._ssh_args(host, remote),
            stdin=asyncio.subprocess.PIPE if isinstance(stdin, bytes) else stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        data = stdin if isinstance(stdin, bytes) else None
        try:
            out, err = await asyncio.wait_for(proc.communicate(data), self.command_timeout)
        except TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise DriverError(
                f"ssh driver: {what} on {host.key} ({host.user}@{host.address}:{host.port}) "
                f"took more than {self.command_timeout:g}s"
            ) from e
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            where = "ssh" if proc.returncode == 255 else "remote script"
            raise DriverError(
                f"ssh driver: {what} on {host.key} ({host.user}@{host.address}:{host.port}) "
                f"failed ({where}): {reason}"
            )
        return out.decode(errors="replace").strip()

    async def _script(self, name: str, host: Host, what: str, body: str, **env: str) -> str:
        """Run ``body`` on ``host`` after the prelude, with the VM's variables set."""
        values = {
            "VM": name,
            "DIR": self._dir(name),
            "UNIT_DIR": self.unit_dir,
            "AGENT": self.agent_command,
            **env,
        }
        header = "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
        return await self._ssh(host, what, (header + PRELUDE + PUT + body).encode())

    # ---- the driver interface ----------------------------------------------------------

    async def regions(self) -> list[Region]:
        """The distinct regions of the inventory, with how many hosts each has."""
        count: dict[str, int] = {}
        for host in self.hosts.values():
            count[host.region] = count.get(host.region, 0) + 1
        return [Region(name=r, details={"hosts": str(n)}) for r, n in sorted(count.items())]

    async def create(self, spec: VmSpec) -> Vm:
        """Take a free host of ``spec.region`` and run the user-data there (idempotent)."""
        if not VM_NAME.fullmatch(spec.name):
            raise DriverError(f"ssh driver: bad VM name {spec.name!r} (letters, digits, . _ -)")
        async with self._locks[spec.name]:
            record = self._vms.get(spec.name)
            if record is not None and record.get("mode"):
                return self._vm(spec.name)
            if record is None:
                host = self._free_host(spec.region)
                # Recorded first: after a crash, a new create finds this host again.
                record = {"host": host.key, "region": spec.region, "power": SUSPENDED}
                self._vms[spec.name] = record
                self._save()
            host = self._host(record)
            try:
                mode = await self._install(spec, host)
            except DriverError:
                await self._forget(spec.name, host, best_effort=True)
                raise
            record.update(mode=mode, power=RUNNING)
            self._save()
            log.info("ssh driver: %s runs on %s (%s)", spec.name, host.key, mode)
            return self._vm(spec.name)

    def _free_host(self, region: str) -> Host:
        in_region = [h for h in self.hosts.values() if h.region == region]
        if not in_region:
            known = sorted({h.region for h in self.hosts.values()})
            raise DriverError(f"ssh driver: no region {region!r} (regions: {', '.join(known)})")
        used = {r["host"] for r in self._vms.values()}
        for host in in_region:
            if host.key not in used:
                return host
        raise DriverError(f"ssh driver: all {len(in_region)} hosts of region {region!r} are in use")

    async def _install(self, spec: VmSpec, host: Host) -> str:
        units = {}
        for name in (UNIT_NAME, COMMANDS_UNIT_NAME):
            unit_file = DEPLOY / "systemd" / name
            try:
                unit = unit_file.read_text()
            except OSError as e:
                raise DriverError(f"ssh driver: cannot read the unit {unit_file}: {e}") from e
            if self.agent_command.startswith("/") and " " not in self.agent_command:
                unit = unit.replace(VENV_AGENT, self.agent_command)
            units[name] = base64.b64encode(unit.encode()).decode()
        wheelhouse = ""
        if self.wheelhouse is not None:
            wheelhouse = f"{self.remote_dir.rstrip('/')}/wheelhouse"
            await self._upload_wheelhouse(host, wheelhouse)
        env = "".join(
            f"{k}={shlex.quote(v)}\n"
            for k, v in (("CLADNET_VM", spec.name), ("CLADNET_VM_DIR", self._dir(spec.name)))
        )
        out = await self._script(
            spec.name,
            host,
            "create",
            CREATE,
            ENV_B64=base64.b64encode(env.encode()).decode(),
            USER_DATA_B64=base64.b64encode(spec.user_data.encode()).decode(),
            UNIT_B64=units[UNIT_NAME],
            COMMANDS_UNIT_B64=units[COMMANDS_UNIT_NAME],
            WHEELHOUSE=wheelhouse,
        )
        mode = out.splitlines()[-1] if out else ""
        if mode not in ("systemd", "detached"):
            raise DriverError(f"ssh driver: create on {host.key} said something unexpected")
        return mode

    async def _upload_wheelhouse(self, host: Host, remote: str) -> None:
        wheels = self.wheelhouse
        if wheels is None or not wheels.is_dir():
            raise DriverError(f"ssh driver: no wheelhouse directory {wheels}")
        # install-agent.sh finds the unit next to itself (build-wheelhouse.sh adds both).
        extras = [DEPLOY / "install-agent.sh", DEPLOY / "systemd" / UNIT_NAME]
        with tempfile.TemporaryFile(dir=self.state_dir) as tar_file:

            def pack() -> None:
                with tarfile.open(fileobj=tar_file, mode="w") as tar:
                    tar.add(wheels, arcname=".")
                    for extra in extras:
                        if not (wheels / extra.name).exists():
                            tar.add(extra, arcname=extra.name)
                tar_file.seek(0)

            await asyncio.to_thread(pack)
            q = shlex.quote(remote)
            await self._ssh(
                host, "wheelhouse upload", tar_file.fileno(), f"mkdir -p {q} && tar -xf - -C {q}"
            )

    async def get(self, name: str) -> Vm:
        """The VM as last recorded (no ssh: the driver is what changes its power state)."""
        return self._vm(name)

    async def list(self) -> list[Vm]:
        """Every VM of the mapping."""
        return [self._vm(name) for name in sorted(self._vms)]

    async def _power(self, name: str, action: str, power: str) -> Vm:
        async with self._locks[name]:
            record = self._record(name)
            if not record.get("mode"):
                raise DriverError(f"ssh driver: {name!r} is still being created")
            host = self._host(record)
            systemd, detached = POWER[action]
            body = systemd if record["mode"] == "systemd" else detached
            await self._script(name, host, action, body + "\n")
            record["power"] = power
            self._save()
            log.info("ssh driver: %s %s on %s", action, name, host.key)
            return self._vm(name)

    async def suspend(self, name: str) -> Vm:
        """Stop the agent on the VM's host."""
        return await self._power(name, "suspend", SUSPENDED)

    async def resume(self, name: str) -> Vm:
        """Start the agent again (``<agent_command> run``, or the unit)."""
        return await self._power(name, "resume", RUNNING)

    async def reboot(self, name: str) -> Vm:
        """Restart the agent (a suspended VM comes back running, as a real reboot would)."""
        return await self._power(name, "reboot", RUNNING)

    async def terminate(self, name: str) -> None:
        """Stop the agent, let it leave, remove what create put on the host, free the host."""
        async with self._locks[name]:
            record = self._vms.get(name)
            if record is None:
                return
            await self._forget(name, self._host(record), best_effort=False)

    async def _forget(self, name: str, host: Host, *, best_effort: bool) -> None:
        try:
            await self._script(name, host, "terminate", TERMINATE)
        except DriverError:
            if not best_effort:
                raise  # the host keeps its agent: keep the mapping so terminate is retried
            log.warning("ssh driver: cleanup of %s on %s failed", name, host.key, exc_info=True)
        self._vms.pop(name, None)
        self._save()
        log.info("ssh driver: %s terminated, %s is free", name, host.key)
