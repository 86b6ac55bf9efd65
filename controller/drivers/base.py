"""The provisioning driver interface: one per provider, in the spirit of a multi-cloud SDK.

A driver creates and manages VMs by *name*; names are unique per driver and chosen by
the controller, so a call repeated after a crash finds the VM it already made instead
of making a second one (``create`` of an existing name returns it). Every method is
async and raises ``DriverError`` with a message an operator can act on.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any


class DriverError(Exception):
    """A provider call failed; the message says what and why."""


class NoSuchVm(DriverError):
    """The driver has no VM of that name."""


@dataclass(frozen=True)
class Region:
    name: str
    zones: tuple[str, ...] = ()
    details: dict[str, str] = field(default_factory=dict)  # e.g. subnet, provider notes


@dataclass(frozen=True)
class VmSpec:
    """What to create. ``user_data`` is a shell script the VM runs on its first boot."""

    name: str
    region: str
    image: str = "debian-12"
    size: str = "small"
    user_data: str = ""
    labels: dict[str, str] = field(default_factory=dict)


# The provider-side power states a driver reports; the controller's VM lifecycle
# (Creating, Suspending, … in cladnet.groups) is built on top of these.
RUNNING = "running"
SUSPENDED = "suspended"


@dataclass(frozen=True)
class Vm:
    name: str
    region: str
    power: str  # RUNNING or SUSPENDED
    private_ip: str | None = None
    public_ip: str | None = None
    details: dict[str, str] = field(default_factory=dict)  # provider ids, namespace, …

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Driver(abc.ABC):
    """One provider. Implementations live in ``controller/drivers/<name>.py`` as ``Driver``."""

    name: str = ""

    @abc.abstractmethod
    async def regions(self) -> list[Region]:
        """Where VMs can be created."""

    @abc.abstractmethod
    async def create(self, spec: VmSpec) -> Vm:
        """Create and boot a VM (idempotent by ``spec.name``)."""

    @abc.abstractmethod
    async def get(self, name: str) -> Vm:
        """The VM's current state; ``NoSuchVm`` when it does not exist."""

    @abc.abstractmethod
    async def list(self) -> list[Vm]:
        """Every VM this driver made."""

    @abc.abstractmethod
    async def suspend(self, name: str) -> Vm:
        """Stop the VM, keeping its disk; its public address is released."""

    @abc.abstractmethod
    async def resume(self, name: str) -> Vm:
        """Start a suspended VM again (it may come back with a new public address)."""

    @abc.abstractmethod
    async def reboot(self, name: str) -> Vm:
        """Restart the VM's processes, keeping its disk and addresses."""

    @abc.abstractmethod
    async def terminate(self, name: str) -> None:
        """Remove the VM and everything made for it (idempotent: gone is fine)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most drivers hold nothing
        """Release what the driver holds (connections); VMs keep running."""
