"""Groups of VMs: their records in etcd, and the reconciler that makes the drivers match.

The API only writes what is wanted (a VM in ``Creating``, ``Suspending``, …). The
reconciler runs on the elected leader: it picks every VM in a transitional state,
calls its driver and writes the result with a compare on the revision it read — so a
request that arrives meanwhile (terminate while creating) is never overwritten, and a
leader killed mid-call leaves the VM transitional for the next leader to redo
(drivers are idempotent by VM name). Nothing is created that etcd does not track.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from aetcd import exceptions as etcd_errors
from aetcd import transactions as tx

from cladnet import groups as lifecycle
from cladnet.models import Group, GroupCreate, NetworkCreate, TokenCreate, Vm
from cladnet.tasks import cancel_and_wait
from controller import keyspace as ks
from controller.drivers import Driver, DriverError, load
from controller.drivers.base import VmSpec
from controller.errors import ApiError, bad_request, conflict, not_found
from controller.etcd import Etcd, prefix_end
from controller.store import Store
from controller.telemetry import GROUP_OPERATIONS
from controller.watch import WatchGone, open_watch

log = logging.getLogger("cladnet.controller.groups")

MAX_VMS = 100  # per group: one etcd transaction writes them all (etcd's limit is 128 ops)
VM_TOKEN_TTL = 3600


class Drivers:
    """The drivers this controller is configured with, built on first use."""

    def __init__(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        self.config = config
        self._built: dict[str, Driver] = {}

    def get(self, name: str) -> Driver:
        if name not in self.config:
            configured = ", ".join(sorted(self.config)) or "none"
            raise ApiError(
                404,
                "unknown_driver",
                f"driver {name!r} is not configured (configured: {configured})",
            )
        if name not in self._built:
            try:
                self._built[name] = load(name, dict(self.config[name]))
            except DriverError as e:
                raise ApiError(503, "driver_unavailable", str(e)) from e
        return self._built[name]

    async def close(self) -> None:
        for driver in self._built.values():
            await driver.close()


class GroupStore:
    """Group and VM records; every change is a guarded etcd transaction."""

    def __init__(self, etcd: Etcd, store: Store, drivers: Drivers) -> None:
        self.etcd, self.store, self.drivers = etcd, store, drivers

    async def create(self, req: GroupCreate) -> Group:
        """Record the group and its VMs (all ``Creating``); the reconciler makes them."""
        total = sum(m.count for m in req.members)
        if total > MAX_VMS:
            raise bad_request("too_many_vms", f"a group has at most {MAX_VMS} VMs, not {total}")
        for member in req.members:
            regions = {r.name for r in await self.call(self.drivers.get(member.driver).regions())}
            if member.region not in regions:
                raise ApiError(
                    404,
                    "unknown_region",
                    f"driver {member.driver!r} has no region {member.region!r} "
                    f"(regions: {', '.join(sorted(regions))})",
                )
        try:
            await self.store.get_network(req.name)
        except ApiError:
            pass
        else:
            raise conflict("network_exists", f"a network named {req.name!r} already exists")
        now = time.time()
        group = Group(
            name=req.name,
            network=req.name,
            members=req.members,
            cidr=req.cidr,
            keepalive=req.keepalive,
            metrics_interval=req.metrics_interval,
            allow_commands=req.allow_commands,
            created_at=now,
        )
        puts = [tx.Put(ks.group(req.name), _dump(group))]
        names = lifecycle.vm_names(req.name, [m.count for m in req.members])
        for member, member_names in zip(req.members, names, strict=True):
            for name in member_names:
                vm = Vm(
                    name=name,
                    group=req.name,
                    driver=member.driver,
                    region=member.region,
                    state=lifecycle.CREATING,
                    labels=member.labels,
                    image=member.image,
                    size=member.size,
                    updated_at=now,
                )
                puts.append(tx.Put(ks.vm(req.name, name), _dump(vm)))
        ok, _ = await self.etcd.txn(compare=[tx.Create(ks.group(req.name)) == 0], success=puts)
        if not ok:
            raise conflict("group_exists", f"a group named {req.name!r} already exists")
        log.info("group created", extra={"group": req.name, "vms": total})
        return await self.get(req.name)

    async def call(self, coro: Any) -> Any:
        """Await a driver call; its ``DriverError`` becomes a 502 for the client."""
        try:
            return await coro
        except DriverError as e:
            raise ApiError(502, "driver_error", str(e)) from e

    async def load_group(self, name: str) -> tuple[Group, int]:
        kv = await self.etcd.get(ks.group(name))
        if kv is None:
            raise not_found("group", name)
        return Group.model_validate_json(kv.value), kv.mod_revision

    async def vms(self, group: str) -> list[tuple[Vm, int]]:
        res = await self.etcd.get_prefix(ks.prefix("vms", group))
        return [(Vm.model_validate_json(kv.value), kv.mod_revision) for kv in res]

    async def vm(self, group: str, name: str) -> tuple[Vm, int] | None:
        """One VM's record and its revision, or None when it is gone."""
        kv = await self.etcd.get(ks.vm(group, name))
        return None if kv is None else (Vm.model_validate_json(kv.value), kv.mod_revision)

    async def get(self, name: str) -> Group:
        """The group with its VMs (overlay addresses from the network) and derived state."""
        group, _ = await self.load_group(name)
        return await self._view(group)

    async def _view(self, group: Group) -> Group:
        vms = [vm for vm, _ in await self.vms(group.name)]
        vms.sort(key=lambda v: int(v.name.rsplit("-", 1)[1]))
        if group.network_id:
            try:
                hosts = await self.store.list_hosts(group.network_id)
            except ApiError:
                hosts = []
            overlay = {h.name: h.overlay_ip for h in hosts}
            for vm in vms:
                vm.overlay_ip = overlay.get(vm.name)
        group.vms = vms
        group.state, group.counts = lifecycle.group_state([v.state for v in vms])
        return group

    async def list(self) -> list[Group]:
        res = await self.etcd.get_prefix(ks.prefix("groups"))
        return [await self._view(Group.model_validate_json(kv.value)) for kv in res]

    async def act(self, name: str, action: str, vm_name: str | None = None) -> Group:
        """Ask for ``action`` on one VM, or on every VM of the group it applies to."""
        group, _ = await self.load_group(name)
        if group.deleting and action != "terminate":
            raise conflict("group_deleting", f"group {name!r} is being deleted")
        vms = await self.vms(name)
        if vm_name is not None:
            vms = [(vm, rev) for vm, rev in vms if vm.name == vm_name]
            if not vms:
                raise not_found("vm", vm_name)
        changed = 0
        for vm, rev in vms:
            try:
                state = lifecycle.next_state(vm.state, action, vm.failed_op)
            except lifecycle.ActionRefused as e:
                if vm_name is not None:
                    raise conflict("action_refused", f"{vm.name}: {e}") from e
                continue
            updated = vm.model_copy(
                update={"state": state, "error": None, "updated_at": time.time()}
            )
            if await self.replace(vm, rev, updated):
                changed += 1
            elif vm_name is not None:
                raise conflict("vm_changed", f"{vm.name} changed meanwhile; try again")
        if changed == 0 and vm_name is None and action != "terminate":
            raise conflict("action_refused", f"no VM of group {name!r} can {action} now")
        log.info("group action", extra={"group": name, "action": action, "vms": changed})
        return await self.get(name)

    async def delete(self, name: str) -> Group:
        """Terminate every VM; the reconciler then removes the group and its network."""
        group, rev = await self.load_group(name)
        if not group.deleting:
            group.deleting = True
            ok, _ = await self.etcd.txn(
                compare=[tx.Mod(ks.group(name)) == rev],
                success=[tx.Put(ks.group(name), _dump(group))],
            )
            if not ok:
                raise conflict("group_changed", f"group {name!r} changed meanwhile; try again")
        return await self.act(name, "terminate")

    async def replace(self, vm: Vm, revision: int, updated: Vm) -> bool:
        """Write ``updated`` if the record is still at ``revision``."""
        key = ks.vm(vm.group, vm.name)
        ok, _ = await self.etcd.txn(
            compare=[tx.Mod(key) == revision], success=[tx.Put(key, _dump(updated))]
        )
        return bool(ok)

    async def set_network(self, name: str, network_id: str) -> None:
        group, rev = await self.load_group(name)
        group.network_id = network_id
        await self.etcd.txn(
            compare=[tx.Mod(ks.group(name)) == rev],
            success=[tx.Put(ks.group(name), _dump(group))],
        )

    async def remove(self, name: str) -> None:
        """Delete the records of a group whose VMs are all terminated."""
        await self.etcd.txn(
            compare=[],
            success=[
                tx.Delete(ks.group(name)),
                tx.Delete(ks.prefix("vms", name), prefix_end(ks.prefix("vms", name))),
            ],
        )


class Reconciler:
    """Drives every VM in a transitional state to its result (runs on the leader only)."""

    def __init__(
        self,
        groups: GroupStore,
        store: Store,
        controller_url: str,
        ca_hash: str | None = None,
        timeout: float = 300,
    ) -> None:
        self.groups, self.store = groups, store
        # Called when a group's hosts went with it (the broker janitor's wake-up).
        self.hosts_removed: Callable[[], None] | None = None
        self.controller_url, self.ca_hash = controller_url, ca_hash
        self.timeout = timeout
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._groups: dict[str, Group] = {}  # as last seen by the scan or the watch
        self._network_locks: dict[str, asyncio.Lock] = {}

    async def run(self, interval: float = 1.0) -> None:
        """Scan once, then follow groups and VMs through etcd watches: work per change,
        not a rescan of every group and VM each second. A broken or compacted watch
        means one more scan (at most every ``interval``)."""
        try:
            while True:
                try:
                    await self._follow(await self.scan())
                except (WatchGone, etcd_errors.ClientError, ConnectionError) as exc:
                    log.warning("group watch broke, scanning again", extra={"error": repr(exc)})
                await asyncio.sleep(interval)
        finally:
            await cancel_and_wait(list(self._tasks.values()))
            self._tasks.clear()

    async def scan(self) -> tuple[int, int]:
        """Start work for every transitional VM; the revisions of the two reads."""
        res = await self.groups.etcd.get_prefix(ks.prefix("groups"))
        records = await self.groups.etcd.get_prefix(ks.prefix("vms"))
        by_group: dict[str, list[Vm]] = {}
        for kv in records:
            vm = Vm.model_validate_json(kv.value)
            by_group.setdefault(vm.group, []).append(vm)
        self._groups = {}
        for kv in res:
            group = Group.model_validate_json(kv.value)
            self._groups[group.name] = group
            vms = by_group.get(group.name, [])
            for vm in vms:
                self._start(group, vm)
            if group.deleting and all(vm.state == lifecycle.TERMINATED for vm in vms):
                await self._remove(group)
        return res.header.revision, records.header.revision

    def _start(self, group: Group, vm: Vm) -> None:
        key = (group.name, vm.name)
        if vm.state in lifecycle.TRANSITIONAL and key not in self._tasks:
            task = asyncio.create_task(self._drive(group, vm.name), name=f"vm {vm.name}")
            self._tasks[key] = task
            task.add_done_callback(partial(self._forget, key))

    async def _follow(self, revisions: tuple[int, int]) -> None:
        """Handle each group and VM change as etcd reports it, until a watch breaks."""
        etcd = self.groups.etcd
        events: asyncio.Queue[tuple[bytes, Any] | BaseException] = asyncio.Queue()

        async def pump(prefix: bytes, revision: int) -> None:
            watch = await open_watch(etcd, prefix, revision + 1)
            try:
                async for event in watch:
                    events.put_nowait((prefix, event))
                events.put_nowait(ConnectionError("etcd watch stream ended"))
            except Exception as exc:
                events.put_nowait(exc)
            finally:
                with contextlib.suppress(Exception):
                    await watch.cancel()

        groups_prefix, vms_prefix = ks.prefix("groups"), ks.prefix("vms")
        pumps = [
            asyncio.create_task(pump(groups_prefix, revisions[0])),
            asyncio.create_task(pump(vms_prefix, revisions[1])),
        ]
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                prefix, event = item
                if event.kind == "DELETE":
                    if prefix == groups_prefix:
                        self._groups.pop(ks.last_segment(event.kv.key), None)
                    continue
                if prefix == groups_prefix:
                    group = Group.model_validate_json(event.kv.value)
                    self._groups[group.name] = group
                    if group.deleting:
                        await self._remove_if_done(group)
                    continue
                vm = Vm.model_validate_json(event.kv.value)
                known = self._groups.get(vm.group)
                if known is None:
                    # Written with its group, whose event may come on the other watch later.
                    try:
                        known, _ = await self.groups.load_group(vm.group)
                    except ApiError:
                        continue  # the group is gone
                    self._groups[known.name] = known
                self._start(known, vm)
                if vm.state == lifecycle.TERMINATED and known.deleting:
                    await self._remove_if_done(known)
        finally:
            await cancel_and_wait(pumps)

    async def _remove_if_done(self, group: Group) -> None:
        """Remove a group being deleted once all its VMs are terminated."""
        vms = await self.groups.vms(group.name)
        if all(vm.state == lifecycle.TERMINATED for vm, _ in vms):
            await self._remove(group)

    def _forget(self, key: tuple[str, str], _: object) -> None:
        self._tasks.pop(key, None)

    async def _remove(self, group: Group) -> None:
        if group.network_id:
            try:
                await self.store.delete_network(group.network_id, force=True)
            except ApiError as e:
                if e.status != 404:
                    raise
        await self.groups.remove(group.name)
        if self.hosts_removed is not None:
            self.hosts_removed()
        self._groups.pop(group.name, None)
        log.info("group removed", extra={"group": group.name})

    async def _drive(self, group: Group, name: str) -> None:
        """Do the VM's pending operation until its record shows no more work."""
        while True:
            record = await self.groups.vm(group.name, name)
            if record is None:
                return
            vm, rev = record
            op = lifecycle.OPERATION.get(vm.state)
            if op is None:
                return
            update: dict[str, Any]
            try:
                update = await asyncio.wait_for(self._operate(group, vm, op), self.timeout)
                update |= {"state": lifecycle.RESULT[op], "error": None, "failed_op": None}
                GROUP_OPERATIONS.labels(op, "ok").inc()
            except (DriverError, ApiError, TimeoutError) as e:
                message = str(e) or type(e).__name__
                log.warning("vm operation failed", extra={"vm": name, "op": op, "error": message})
                update = {"state": lifecycle.FAILED, "error": message, "failed_op": op}
                GROUP_OPERATIONS.labels(op, "failed").inc()
            update["updated_at"] = time.time()
            if await self.groups.replace(vm, rev, vm.model_copy(update=update)):
                log.info("vm state", extra={"vm": name, "state": update["state"]})
            # Else someone asked for something else meanwhile: read again and do that.

    async def _operate(self, group: Group, vm: Vm, op: str) -> dict[str, Any]:
        """One driver call; returns the VM fields it learned (addresses, ids)."""
        driver = self.groups.drivers.get(vm.driver)
        if op == "create":
            network_id = await self._network(group)
            created = await self.store.create_token(
                network_id,
                TokenCreate(ttl_seconds=VM_TOKEN_TTL, max_uses=1, description=f"vm {vm.name}"),
            )
            region = next((r for r in await driver.regions() if r.name == vm.region), None)
            details = region.details if region else {}
            labels = {
                "group": group.name,
                "cloud": details.get("cloud", vm.driver),
                "region": vm.region,
                "vpc": details.get("vpc", vm.region),
                **vm.labels,
            }
            spec = VmSpec(
                name=vm.name,
                region=vm.region,
                image=vm.image,
                size=vm.size,
                labels=labels,
                user_data=lifecycle.user_data(
                    self.controller_url,
                    created.token,
                    vm.name,
                    labels,
                    self.ca_hash,
                    allow_commands=group.allow_commands,
                ),
            )
            result = await driver.create(spec)
        elif op == "terminate":
            await driver.terminate(vm.name)
            return {}
        else:
            result = await getattr(driver, op)(vm.name)
        return {
            "private_ip": result.private_ip,
            "public_ip": result.public_ip,
            "details": result.details,
        }

    async def _network(self, group: Group) -> str:
        """The group's network id, creating the network on first need (once)."""
        lock = self._network_locks.setdefault(group.name, asyncio.Lock())
        async with lock:
            current, _ = await self.groups.load_group(group.name)
            if current.network_id:
                return current.network_id
            try:
                net = await self.store.get_network(group.network)
            except ApiError:
                total = sum(m.count for m in group.members)
                net = await self.store.create_network(
                    NetworkCreate(
                        name=group.network,
                        cidr=group.cidr,
                        expected_hosts=max(4, total),
                        keepalive=group.keepalive,
                        metrics_interval=group.metrics_interval,
                    )
                )
            await self.groups.set_network(group.name, net.id)
            return net.id


def _dump(record: Group | Vm) -> bytes:
    """The stored form: without what is derived when read."""
    derived = {"state", "counts", "vms"} if isinstance(record, Group) else {"overlay_ip"}
    return record.model_dump_json(exclude=derived).encode()
