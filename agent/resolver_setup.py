"""Make the host's resolver ask the agent for its network's domain, and only for it.

Modes (``CLADNET_DNS``, default ``auto``):

- ``resolved``: systemd-resolved gets the agent's overlay IP as the DNS server of the
  WireGuard link and ``~<domain>`` as a routing-only domain, and the link is not a
  default route: only names under the domain go there. Set with ``resolvectl`` once
  per change; resolved forgets it when the link goes.
- ``hosts``: a marked block (``# BEGIN cladnet <network>`` … ``# END``) in the hosts
  file (``CLADNET_HOSTS_FILE``, default /etc/hosts), rewritten atomically when a name
  changes, removed on leave. Other lines are kept as they are.
- ``off``: neither (the DNS server on the overlay IP still answers).

``auto`` is ``resolved`` where resolved runs, else ``hosts``. /etc/resolv.conf is
never written in any mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path

from cladnet import hostsfile
from cladnet.files import write_atomic

log = logging.getLogger("cladnet.agent.dns")

MODES = ("auto", "resolved", "hosts", "off")
RESOLVED_RUNTIME = Path("/run/systemd/resolve")
RESOLVECTL_TIMEOUT = 10.0


class SetupError(Exception):
    """The host resolver could not be set up (reported in status, retried on change)."""


def configured_mode() -> str:
    """``CLADNET_DNS`` (auto when unset or unknown, said so in the log)."""
    mode = os.environ.get("CLADNET_DNS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        log.warning("unknown CLADNET_DNS, using auto", extra={"value": mode})
        return "auto"
    return mode


def hosts_path() -> Path:
    """``CLADNET_HOSTS_FILE`` or /etc/hosts."""
    return Path(os.environ.get("CLADNET_HOSTS_FILE") or "/etc/hosts")


def resolve_mode(mode: str) -> str:
    """``auto`` made concrete for this machine."""
    if mode != "auto":
        return mode
    if shutil.which("resolvectl") and RESOLVED_RUNTIME.is_dir():
        return "resolved"
    return "hosts"


async def _resolvectl(*args: str) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            "resolvectl",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), RESOLVECTL_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise SetupError(f"resolvectl {args[0]}: {exc!r}") from exc
    if proc.returncode != 0:
        raise SetupError(f"resolvectl {' '.join(args)}: {err.decode(errors='replace').strip()}")


async def register_resolved(iface: str, server_ip: str, domain: str) -> None:
    """``domain`` → ``server_ip`` on ``iface``, routing-only, not the default route."""
    await _resolvectl("dns", iface, server_ip)
    await _resolvectl("domain", iface, f"~{domain}")
    await _resolvectl("default-route", iface, "false")


async def unregister_resolved(iface: str) -> None:
    """Drop what :func:`register_resolved` set (a link that is gone has nothing left)."""
    with contextlib.suppress(SetupError):
        await _resolvectl("revert", iface)


def write_hosts_block(path: Path, network: str, names: dict[str, str]) -> bool:
    """Put ``network``'s block for ``names`` into ``path`` ({} removes it); True if changed.

    Written to a temporary file beside it and renamed over it, so a reader sees the
    old or the new file, never half of one. Where the file cannot be replaced (a
    bind mount, a read-only /etc with a writable hosts file) it is rewritten in place.
    """
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror}") from exc
    new = hostsfile.replace_block(old, network, hostsfile.render(network, names))
    if new == old:
        return False
    try:
        # The file keeps its mode (a hosts file is world-readable).
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        write_atomic(path, new, mode=mode)
    except OSError as exc:
        log.info(
            "cannot replace the hosts file, rewriting it in place",
            extra={"path": str(path), "error": exc.strerror},
        )
        try:
            with path.open("r+" if path.exists() else "w") as f:
                f.write(new)
                f.truncate()
        except OSError as exc2:
            raise SetupError(f"cannot write {path}: {exc2.strerror}") from exc2
    return True
