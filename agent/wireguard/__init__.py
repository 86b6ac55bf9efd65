"""WireGuard devices: the kernel module over netlink, or wireguard-go over its UAPI socket."""

from __future__ import annotations

from agent.wireguard.backend import WireGuardBackend, WireGuardError

__all__ = ["WireGuardBackend", "WireGuardError", "choose_backend"]


def choose_backend(force: str | None = None) -> WireGuardBackend:
    """The backend this host supports: kernel WireGuard if present, else wireguard-go.

    ``force`` is ``"kernel"`` or ``"userspace"`` to skip detection; forcing the kernel
    on a host without the module raises ``WireGuardError``.
    """
    if force not in (None, "kernel", "userspace"):
        raise WireGuardError(f"unknown WireGuard backend {force!r} (kernel or userspace)")
    if force != "userspace":
        from agent.wireguard import kernel

        if kernel.available():
            return kernel.KernelBackend()
        if force == "kernel":
            raise WireGuardError("the WireGuard kernel module is not available on this host")
    from agent.wireguard.userspace import UserspaceBackend

    return UserspaceBackend()
