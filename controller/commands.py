"""Remote commands: a shell command for every VM of a group, run by the VMs' agents.

The admin's request becomes one record per VM in etcd, all on one lease so results
expire after a day. A VM whose agent can take it gets a queue entry under its host
id; the agent polls its own queue with its host credential (only its own: the route
checks the credential is that host's) and reports ``running``, then the outcome.
Every state change is a compare-and-swap on the VM's record, so a report is taken
once and only from the host the command was queued for.

Two opt-ins, both needed: the group (``allow_commands`` at creation; without it the
controller queues nothing, 409 ``commands_disabled``) and the VM's agent
(``--allow-commands``, which such groups' VMs join with): only such agents poll, and a
poll records that the host accepts commands. A VM whose agent never polled is
``refused``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aetcd import transactions as tx

from cladnet import groups as lifecycle
from cladnet import tokens
from cladnet.models import CommandReport, CommandRequest, CommandRun, VmCommand
from controller import keyspace as ks
from controller.auth import Principal
from controller.errors import ApiError, conflict, not_found
from controller.etcd import DailyLease, Etcd
from controller.groups import GroupStore
from controller.store import Store

log = logging.getLogger("cladnet.controller.commands")

RETENTION = 86400  # results are kept a day
PICKUP = 300  # seconds an agent has to start a command, else it is reported as an error
GRACE = 60  # beyond its timeout, how long a running command may go unreported
MARK_EVERY = 60  # a polling agent's "accepts commands" record is refreshed this often
FRESH = 3 * MARK_EVERY  # older than this, the agent is not polling any more
TXN_OPS = 100  # etcd allows 128 operations per transaction

PENDING, RUNNING, REFUSED, ERROR = "pending", "running", "refused", "error"
FINAL = frozenset({"done", "timeout", ERROR})


def require_agent(principal: Principal, host_id: str) -> None:
    """Only the host's own agent may fetch or report its commands (not even the admin:
    a forged result or a stolen command is worse than a 403)."""
    if principal.kind != "host" or principal.host_id != host_id:
        raise ApiError(403, "forbidden", "only this host's agent may use its commands")


class Commands:
    """Command runs and their per-VM results in etcd."""

    def __init__(self, etcd: Etcd, groups: GroupStore, store: Store) -> None:
        self.etcd, self.groups, self.store = etcd, groups, store
        self._marked: dict[str, float] = {}  # host id → when this replica last recorded it
        self._agents_lease = DailyLease(etcd, 86400)  # hosts' "accepts commands" records

    # --- the admin's side ----------------------------------------------------------------

    async def start(self, group_name: str, req: CommandRequest, by: str) -> CommandRun:
        """Queue ``req`` for every VM of the group whose agent accepts commands."""
        group = await self.groups.get(group_name)
        if not group.allow_commands:
            raise conflict(
                "commands_disabled",
                f"group {group_name!r} was not created with allow_commands: its VMs run no "
                "remote commands",
            )
        now = time.time()
        run = CommandRun(
            id=tokens.new_id("cmd-"),
            group=group_name,
            command=req.command,
            timeout=req.timeout,
            created_at=now,
            by=by,
        )
        hosts = await self._hosts(group.network_id)
        for vm in group.vms:
            run.vms[vm.name] = await self._first_state(vm.name, vm.state, hosts.get(vm.name), now)
        lease = await self.etcd.call(lambda c: c.lease(RETENTION))
        record = {**run.model_dump(exclude={"vms"}), "lease": lease.id}
        ops = [tx.Put(ks.command_run(run.id), json.dumps(record).encode(), lease=lease.id)]
        for name, result in run.vms.items():
            ops.append(tx.Put(ks.command_result(run.id, name), _dump(result), lease=lease.id))
            if result.state == PENDING and result.host_id:
                entry = {"id": run.id, "command": req.command, "timeout": req.timeout}
                entry["created_at"] = now
                key = ks.command_queue(result.host_id, run.id)
                ops.append(tx.Put(key, json.dumps(entry).encode(), lease=lease.id))
        # Results before queue entries (ops are in that order): an agent never reports
        # on a record that is not there yet.
        for i in range(0, len(ops), TXN_OPS):
            await self.etcd.txn(compare=[], success=ops[i : i + TXN_OPS])
        counts: dict[str, int] = {}
        for result in run.vms.values():
            counts[result.state] = counts.get(result.state, 0) + 1
        # The command text is in the audit log; output and text stay out of this line.
        log.info("command queued", extra={"id": run.id, "group": group_name, "vms": counts})
        return run

    async def _hosts(self, network_id: str | None) -> dict[str, str]:
        """Host name → host id in the group's network."""
        if not network_id:
            return {}
        res = await self.etcd.get_prefix(ks.prefix("hostnames", network_id))
        return {ks.last_segment(kv.key): kv.value.decode() for kv in res}

    async def _first_state(
        self, vm_name: str, vm_state: str, host_id: str | None, now: float
    ) -> VmCommand:
        if vm_state != lifecycle.RUNNING:
            return VmCommand(state=ERROR, error=f"{vm_name} is {vm_state}")
        if host_id is None:
            return VmCommand(state=ERROR, error=f"{vm_name} has not joined the network")
        kv = await self.etcd.get(ks.command_agent(host_id))
        if kv is None:
            return VmCommand(state=REFUSED, host_id=host_id, error="agent does not accept commands")
        age = now - float(json.loads(kv.value)["seen_at"])
        if age > FRESH:
            error = f"agent not reachable: it last asked for commands {age:.0f} s ago"
            return VmCommand(state=ERROR, host_id=host_id, error=error)
        return VmCommand(state=PENDING, host_id=host_id)

    async def get(self, group_name: str, command_id: str) -> CommandRun:
        """A command of the group with every VM's result; stale work shows as an error."""
        kv = await self.etcd.get(ks.command_run(command_id))
        if kv is None:
            raise not_found("command", command_id)
        record = json.loads(kv.value)
        if record["group"] != group_name:  # ids are global; answer within the group only
            raise not_found("command", command_id)
        record.pop("lease", None)
        run = CommandRun(**record)
        res = await self.etcd.get_prefix(ks.prefix("commands", "results", command_id))
        now = time.time()
        for item in res:
            result = VmCommand.model_validate_json(item.value)
            run.vms[ks.last_segment(item.key)] = _aged(result, run, now)
        return run

    # --- the agent's side ----------------------------------------------------------------

    async def pending(self, host_id: str) -> list[dict[str, Any]]:
        """The commands this host is to run, oldest first; records that it asked."""
        now = time.time()
        if now - self._marked.get(host_id, 0.0) >= MARK_EVERY:
            lease = await self._agents_lease.current(now)
            value = json.dumps({"seen_at": now}).encode()
            key = ks.command_agent(host_id)
            await self.etcd.call(lambda c: c.put(key, value, lease=lease))
            self._marked[host_id] = now
        res = await self.etcd.get_prefix(ks.prefix("commands", "queue", host_id))
        entries = [json.loads(kv.value) for kv in res]
        # Too late to start: the reader already reports it as an error.
        fresh = [e for e in entries if now - e["created_at"] <= PICKUP]
        return sorted(fresh, key=lambda e: e["created_at"])

    async def report(self, host_id: str, command_id: str, rep: CommandReport) -> None:
        """Take a host's report: pending → running → done|timeout|error, nothing else."""
        run_kv = await self.etcd.get(ks.command_run(command_id))
        if run_kv is None:
            raise not_found("command", command_id)
        lease = json.loads(run_kv.value)["lease"]
        vm_name = (await self.store.get_host(host_id)).name  # a group VM joins as its name
        key = ks.command_result(command_id, vm_name)
        kv = await self.etcd.get(key)
        current = VmCommand.model_validate_json(kv.value) if kv is not None else None
        if current is None or current.host_id != host_id:
            raise not_found("command", command_id)
        now = time.time()
        ops: list[Any] = []
        if rep.state == RUNNING and current.state == PENDING:
            updated = current.model_copy(update={"state": RUNNING, "started_at": now})
            ops.append(tx.Delete(ks.command_queue(host_id, command_id)))
        elif rep.state in FINAL and current.state == RUNNING:
            fields = rep.model_dump(exclude={"state"})
            updated = current.model_copy(update={**fields, "state": rep.state, "finished_at": now})
        else:
            raise conflict("command_state", f"command is {current.state}, not {rep.state}-able")
        ops.append(tx.Put(key, _dump(updated), lease=lease))
        ok, _ = await self.etcd.txn(compare=[tx.Mod(key) == kv.mod_revision], success=ops)
        if not ok:
            raise conflict("command_changed", "the command changed meanwhile")
        log.info("command state", extra={"id": command_id, "vm": vm_name, "state": rep.state})


def _aged(result: VmCommand, run: CommandRun, now: float) -> VmCommand:
    """Work an agent dropped (never started, or stopped reporting) shows as an error."""
    if result.state == PENDING and now - run.created_at > PICKUP:
        return result.model_copy(update={"state": ERROR, "error": "the agent did not start it"})
    started = result.started_at or run.created_at
    if result.state == RUNNING and now - started > run.timeout + GRACE:
        return result.model_copy(update={"state": ERROR, "error": "the agent stopped reporting"})
    return result


def _dump(result: VmCommand) -> bytes:
    return result.model_dump_json().encode()
