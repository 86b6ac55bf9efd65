"""``--tune-host`` (env ``CLADNET_TUNE_HOST=1``): raise the UDP socket buffer sysctls of
the agent's network namespace (see :mod:`cladnet.tuning`) and put them back on leave.

The values found before the first change are kept in ``<state dir>/host-tuning.json``,
written before anything is changed and never overwritten by a later run (whose "before"
would be our own values). ``restore`` writes them back (only where the value is still
ours) and removes the file: ``leave`` of the last network, or a ``run`` without the
switch, calls it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
from pathlib import Path

from agent.wireguard.userspace import SOCKET_DIR
from cladnet.files import write_atomic
from cladnet.tuning import BUFFER_BYTES, SETTINGS, raised, to_restore

log = logging.getLogger("cladnet.agent")

RECORD = "host-tuning.json"
PROC_SYS = Path("/proc/sys")
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (5.6+)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # past rmem_max/wmem_max, with CAP_NET_ADMIN


def _path(name: str) -> Path:
    return PROC_SYS / name.replace(".", "/")


def read(names: tuple[str, ...] | list[str] = SETTINGS) -> dict[str, int]:
    """The current values of ``names`` that exist here (an older kernel may lack some)."""
    values = {}
    for name in names:
        try:
            values[name] = int(_path(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return values


def _load(state_root: Path) -> dict[str, dict[str, int]]:
    try:
        saved = json.loads((state_root / RECORD).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("unreadable host tuning record", extra={"error": str(exc)})
        return {}
    return saved if isinstance(saved, dict) else {}


def tune(state_root: Path) -> dict[str, int]:
    """Raise the buffer sysctls; return what was written. Failures are logged, not
    raised: the tunnels work without it (a read-only /proc/sys in a container, say)."""
    saved = _load(state_root)
    current = read()
    changes = raised(current)
    # In a network namespace other than the host's these are read-only copies of the
    # host's values (Linux 6.x); the device's own buffers are still raised.
    fixed = [name for name in changes if not os.access(_path(name), os.W_OK)]
    if fixed:
        log.info("host settings not writable here", extra={"settings": fixed})
    changes = {name: value for name, value in changes.items() if name not in fixed}
    if not changes:
        return {}
    for name, value in changes.items():
        saved.setdefault(name, {"before": current[name], "set": value})["set"] = value
    try:  # recorded first: a crash half-way still knows what to put back
        write_atomic(state_root / RECORD, json.dumps(saved, indent=1))
    except OSError as exc:  # without the record nothing could be put back: change nothing
        log.error("cannot tune the host", extra={"error": str(exc)})
        return {}
    written = {}
    for name, value in changes.items():
        try:
            _path(name).write_text(str(value))
            written[name] = value
        except OSError as exc:
            log.error("cannot tune the host", extra={"setting": name, "error": str(exc)})
    if written:
        log.info("host tuned (--tune-host)", extra={"set": written})
    return written


def restore(state_root: Path) -> dict[str, int]:
    """Put back what :func:`tune` changed (where it is still ours); return what was
    written. Without a record, nothing is done."""
    saved = _load(state_root)
    if not saved:
        return {}
    back = to_restore(saved, read(list(saved)))
    written = {}
    for name, value in back.items():
        try:
            _path(name).write_text(str(value))
            written[name] = value
        except OSError as exc:
            log.error("cannot restore a host setting", extra={"setting": name, "error": str(exc)})
            return written  # the record stays: a later leave or run tries again
    (state_root / RECORD).unlink(missing_ok=True)
    if written:
        log.info("host settings restored", extra={"restored": written})
    return written


def wireguard_go_pid(iface: str) -> int:
    """The process serving ``iface``'s UAPI socket (whoever started it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(SOCKET_DIR / f"{iface}.sock"))
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[:4], "little")


def tune_device(pid: int, port: int, size: int = BUFFER_BYTES) -> int:
    """Raise the receive and send buffers of the UDP sockets process ``pid`` (a
    wireguard-go) has bound to ``port`` to ``size``: through a duplicate of each socket
    (``pidfd_getfd``), whose options are the socket's. Returns how many sockets. A
    rebind (listen port change) makes new sockets: call it again then."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    count = 0
    try:
        for entry in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:"):
                    continue
            except OSError:  # closed meanwhile
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(entry), 0)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
            with socket.socket(fileno=fd) as sock:  # closes our duplicate only
                if sock.type != socket.SOCK_DGRAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    continue
                if sock.getsockname()[1] != port:
                    continue
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
                count += 1
    finally:
        os.close(pidfd)
    return count
