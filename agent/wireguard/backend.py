"""The interface every WireGuard implementation offers the agent."""

from __future__ import annotations

from typing import Protocol

from cladnet.mesh import DeviceChanges, DeviceState

MAX_IFNAME = 15  # Linux IFNAMSIZ - 1


class WireGuardError(Exception):
    """A WireGuard device could not be created, read or changed."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def check_name(name: str) -> str:
    """Return ``name`` if it can be a Linux interface name, else raise ``WireGuardError``."""
    if (
        not name
        or len(name) > MAX_IFNAME
        or "/" in name
        or name in (".", "..")
        or any(c.isspace() for c in name)
    ):
        raise WireGuardError(f"invalid interface name {name!r}")
    return name


class WireGuardBackend(Protocol):
    """A WireGuard implementation: kernel (netlink) or userspace (wireguard-go UAPI).

    Every method is idempotent, so a reconcile loop may call it again at any time.
    """

    kind: str  # "kernel" or "userspace"

    async def create(self, name: str) -> None:
        """Create the device ``name`` unless it already exists."""
        ...

    async def destroy(self, name: str) -> None:
        """Remove the device ``name``; no error if it does not exist."""
        ...

    async def exists(self, name: str) -> bool:
        """Whether the device ``name`` exists and answers."""
        ...

    async def get(self, name: str) -> DeviceState:
        """What the device reports: listen port, own public key, peers with counters."""
        ...

    async def set_private_key(self, name: str, private_key: str) -> None:
        """Set the device's private key (base64); setting the same key again is a no-op."""
        ...

    async def apply(
        self, name: str, changes: DeviceChanges, private_key: str | None = None
    ) -> None:
        """Change exactly what ``changes`` lists; peers not listed are left untouched."""
        ...
