"""Remote commands on this host: fetched from the controller, run with ``/bin/sh -c``.

Only a network joined with ``--allow-commands`` (a group created with
``allow_commands``) runs this loop; one that did not never asks, and the controller
reports its VM as refusing. Under systemd the loop runs in its own process,
``cladnet-agent commands`` (``cladnet-agent-commands.service``): the agent's unit keeps
only ``CAP_NET_ADMIN`` on a read-only system, where no package could be installed. One
command runs at a time, in its own process group (killed whole at its timeout or when
the runner stops), with output kept up to a bound in memory. Command text and output
are never logged: they may hold secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

from agent.state import Membership, StateDir
from cladnet.api_client import NETWORK_ERRORS, ApiClientError, AsyncClient
from cladnet.api_client.endpoints import QueuedCommand
from cladnet.backoff import Backoff
from cladnet.tasks import cancel_and_wait

log = logging.getLogger("cladnet.agent.commands")

OUTPUT_LIMIT = 64 * 1024  # bytes of stdout and of stderr kept (the controller's limit)
DRAIN = 2.0  # after a kill, how long to wait for the pipes to close
REPORT_ATTEMPTS = 5


class _Capture:
    """The first ``limit`` bytes of a stream; the rest is read and dropped."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data, self.truncated = limit, bytearray(), False

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            room = self.limit - len(self.data)
            if len(chunk) > room:
                self.truncated = True
            self.data += chunk[: max(room, 0)]

    def text(self) -> str:
        # A cut may split a UTF-8 sequence; replaced, then bounded in characters too.
        return self.data.decode("utf-8", "replace")[: self.limit]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_shell(
    command: str, time_limit: float, env: Mapping[str, str] | None = None, keep: int = OUTPUT_LIMIT
) -> dict[str, Any]:
    """Run ``command``; a report: state done|timeout, exit_code, stdout, stderr, truncated.

    The shell gets a new session (so a process group of its own): after ``time_limit`` s,
    or if this coroutine is cancelled, the whole group is killed, children included.
    """
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        cwd="/",
        env=None if env is None else dict(env),
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capture(keep), _Capture(keep)
    work = asyncio.gather(out.drain(proc.stdout), err.drain(proc.stderr), proc.wait())
    state = "done"
    try:
        try:
            await asyncio.wait_for(asyncio.shield(work), time_limit)
        except TimeoutError:
            state = "timeout"
            _kill_group(proc.pid)
            try:  # the pipes close when the group is dead; keep what it wrote
                await asyncio.wait_for(asyncio.shield(work), DRAIN)
            except TimeoutError:  # a child left the group and holds a pipe open
                work.cancel()
    finally:
        if proc.returncode is None:  # cancelled: leave nothing running behind
            _kill_group(proc.pid)
            work.cancel()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
    code = proc.returncode
    if state == "timeout" or code is None:
        code = None
    elif code < 0:  # killed by a signal: as a shell shows it, 128 + signal
        code = 128 - code
    return {
        "state": state,
        "exit_code": code,
        "stdout": out.text(),
        "stderr": err.text(),
        "truncated": out.truncated or err.truncated,
    }


class NotOptedIn(Exception):
    """No joined network of this host accepts remote commands."""


def command_env(m: Membership) -> dict[str, str]:
    """What a command is told about the host it runs on."""
    return {
        "CLADNET_HOST": str(m.me["name"]),
        "CLADNET_OVERLAY_IP": str(m.me["overlay_ip"]),
        "CLADNET_NETWORK": str(m.network["name"]),
    }


async def serve(states: StateDir, poll: float = 5.0) -> None:
    """Run the commands of every joined network that opted in, until cancelled.

    Raises ``NotOptedIn`` when none did: the admin's commands stay refused.
    """
    runners = []
    for net_id in states.network_ids():
        m, credential, _ = states.load(net_id)
        if not m.allow_commands:
            log.info("network does not accept commands", extra={"network": m.network["name"]})
            continue
        client = AsyncClient(m.controller, credential, verify=m.ca_file or True)
        runners.append(CommandRunner(client, m.host_id, command_env(m), poll=poll))
    if not runners:
        raise NotOptedIn(
            f"no network in {states.root} accepts remote commands "
            "(join with --allow-commands; groups: allow_commands)"
        )
    tasks = [asyncio.create_task(r.run(), name=f"commands-{r.host_id}") for r in runners]
    try:
        await asyncio.gather(*tasks)
    finally:
        await cancel_and_wait(tasks)
        for runner in runners:
            await runner.client.close()


class CommandRunner:
    """Polls this host's commands and runs them one at a time."""

    def __init__(
        self,
        client: AsyncClient,
        host_id: str,
        env: Mapping[str, str],
        poll: float = 5.0,
        retry_max: float = 30.0,
    ) -> None:
        self.client, self.host_id, self.env = client, host_id, dict(env)
        self.poll, self.retry_max = poll, retry_max

    async def run(self) -> None:
        """Forever: ask for commands, run them; back off while the controller fails."""
        backoff = Backoff(self.poll, self.retry_max)
        while True:
            delay = self.poll
            try:
                pending = await self.client.pending_commands(self.host_id)
                backoff.reset()
                for command in pending:
                    await self.execute(command)
            except ApiClientError as exc:
                # The daemon's watch and heartbeat report the standing, once per change.
                log.debug("controller refused the command poll", extra={"error": str(exc)})
                delay = backoff.next_delay()
            except NETWORK_ERRORS as exc:
                log.debug("command poll failed", extra={"error": repr(exc)})
                delay = backoff.next_delay()
            await asyncio.sleep(delay)

    async def execute(self, command: QueuedCommand) -> None:
        """Claim ``command`` (it may already be taken), run it and report the outcome."""
        command_id = str(command["id"])
        try:
            await self.client.report_command(self.host_id, command_id, {"state": "running"})
        except ApiClientError as exc:
            if exc.status in (404, 409):  # started before (a restart) or gone: skip it
                log.info("command not taken", extra={"id": command_id, "error": exc.code})
                return
            raise
        log.info("running a command", extra={"id": command_id, "timeout": command["timeout"]})
        env = {**os.environ, **self.env, "CLADNET_COMMAND_ID": command_id}
        try:
            report = await run_shell(str(command["command"]), float(command["timeout"]), env)
        except OSError as exc:  # no /bin/sh, out of processes…
            report = {"state": "error", "error": f"cannot start the command: {exc}"}
        log.info(
            "command ended",
            extra={
                "id": command_id,
                "state": report["state"],
                "exit_code": report.get("exit_code"),
            },
        )
        await self._report(command_id, report)

    async def _report(self, command_id: str, report: dict[str, Any]) -> None:
        backoff = Backoff(0.5, self.retry_max)
        for attempt in range(REPORT_ATTEMPTS):
            try:
                await self.client.report_command(self.host_id, command_id, report)
                return
            except ApiClientError as exc:
                log.warning("command result refused", extra={"id": command_id, "error": str(exc)})
                return
            except NETWORK_ERRORS as exc:
                if attempt == REPORT_ATTEMPTS - 1:
                    log.warning("command result lost", extra={"id": command_id, "error": repr(exc)})
                    return
                await backoff.wait()
