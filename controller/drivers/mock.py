"""An in-memory driver for tests of the orchestration: no VMs, just their records.

``state_file`` keeps the records on disk so several controller processes (and a
test) see the same "cloud"; ``delay`` makes every call return that much after its
change is made, so a controller can be killed between the two; ``failures`` maps a
VM name to the operations that fail for it (``*`` for every VM), as a flaky
provider would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cladnet.files import write_atomic
from controller.drivers import base


class Driver(base.Driver):
    def __init__(
        self,
        regions: list[str] | None = None,
        state_file: str | None = None,
        delay: float = 0.0,
        failures: dict[str, list[str]] | None = None,
    ) -> None:
        self.region_names = regions or ["mock-1", "mock-2"]
        self.state_file = Path(state_file) if state_file else None
        self.delay = delay
        self.failures = failures or {}
        self._vms: dict[str, dict[str, str]] = {}
        self.calls: list[tuple[str, str]] = []  # (operation, vm) in call order

    def _load(self) -> dict[str, dict[str, str]]:
        if self.state_file and self.state_file.exists():
            self._vms = json.loads(self.state_file.read_text())
        return self._vms

    def _save(self) -> None:
        if self.state_file:
            write_atomic(self.state_file, json.dumps(self._vms), durable=False)

    async def _begin(self, op: str, name: str) -> dict[str, dict[str, str]]:
        self.calls.append((op, name))
        if op in self.failures.get(name, []) or op in self.failures.get("*", []):
            raise base.DriverError(f"mock: {op} of {name} failed (as configured)")
        return self._load()

    def _vm(self, name: str) -> base.Vm:
        record = self._load().get(name)
        if record is None:
            raise base.NoSuchVm(f"mock: no VM {name!r}")
        return base.Vm(
            name=name,
            region=record["region"],
            power=record["power"],
            private_ip=record["private_ip"],
            public_ip=record["public_ip"],
            details={"boots": record["boots"]},
        )

    async def regions(self) -> list[base.Region]:
        return [base.Region(name) for name in self.region_names]

    async def create(self, spec: base.VmSpec) -> base.Vm:
        vms = await self._begin("create", spec.name)
        if spec.region not in self.region_names:
            raise base.DriverError(f"mock: no region {spec.region!r}")
        if spec.name not in vms:
            n = len(vms) + 1
            vms[spec.name] = {
                "region": spec.region,
                "power": base.RUNNING,
                "private_ip": f"10.0.{n // 250}.{n % 250 + 2}",
                "public_ip": f"198.51.100.{n % 250 + 2}",  # documentation range, never used
                "boots": "1",
                "user_data": spec.user_data,  # what the VM would boot with (tests read it)
            }
            self._save()
        await asyncio.sleep(self.delay)
        return self._vm(spec.name)

    async def get(self, name: str) -> base.Vm:
        return self._vm(name)

    async def list(self) -> list[base.Vm]:
        return [self._vm(name) for name in self._load()]

    async def _set(self, op: str, name: str, power: str, reboot: bool = False) -> base.Vm:
        vms = await self._begin(op, name)
        if name not in vms:
            raise base.NoSuchVm(f"mock: no VM {name!r}")
        vms[name]["power"] = power
        if reboot:
            vms[name]["boots"] = str(int(vms[name]["boots"]) + 1)
        self._save()
        await asyncio.sleep(self.delay)
        return self._vm(name)

    async def suspend(self, name: str) -> base.Vm:
        return await self._set("suspend", name, base.SUSPENDED)

    async def resume(self, name: str) -> base.Vm:
        return await self._set("resume", name, base.RUNNING, reboot=True)

    async def reboot(self, name: str) -> base.Vm:
        return await self._set("reboot", name, base.RUNNING, reboot=True)

    async def terminate(self, name: str) -> None:
        vms = await self._begin("terminate", name)
        if vms.pop(name, None) is not None:
            self._save()
        await asyncio.sleep(self.delay)
