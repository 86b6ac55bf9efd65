"""What every benchmark reports the same way: machine facts, percentiles, process CPU."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import signal
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Agents a benchmark starts in namespaces must not write this machine's /etc/hosts.
os.environ.setdefault("CLADNET_DNS", "off")


def _interrupt(signum: int, _: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def clean_up_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so a benchmark stopped by ``kill`` still runs its
    ``finally`` blocks and stops the etcd, controllers and agents it started."""
    signal.signal(signal.SIGTERM, _interrupt)


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(*packages: str) -> dict[str, Any]:
    """What the figures were measured on (they mean little without it), with the
    versions of etcd and of ``packages``."""
    try:
        etcd_version = subprocess.run(
            ["etcd", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as exc:
        etcd_version = f"unknown ({exc!r})"
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "etcd_version": etcd_version,
        **{f"{p}_version": dist_version(p) for p in packages},
    }


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces; fields after the closing ')' are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wireguard_go_processes() -> dict[int, str]:
    """Every running wireguard-go: PID → the interface it serves (its last argument).
    It may outlive its namespace, so benchmarks stop theirs by PID."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = [c.decode(errors="replace") for c in raw if c]
        if len(cmd) > 1 and Path(cmd[0]).name == "wireguard-go":
            found[int(proc.name)] = cmd[-1]
    return found


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


_HIDE = """import sys
HIDDEN = {hidden!r}


class _Hidden:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"{{name}}: not a runtime dependency (hidden by bench)")
        return None


sys.meta_path.insert(0, _Hidden)
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_only_env(directory: Path, dist: str = "cladnet") -> dict[str, str]:
    """An environment for child Pythons that hides every installed distribution outside
    ``dist``'s runtime dependencies (the test extras, e.g. selenium's trio, which httpcore
    imports whenever it is installed), so a measured process imports what a production
    install imports. Writes a ``sitecustomize.py`` into ``directory``."""
    keep, todo = set(), [dist]
    while todo:
        name = _norm(todo.pop())
        if name in keep:
            continue
        keep.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):
            for req in metadata.requires(name) or []:
                if "extra ==" not in req:  # other markers: kept (a superset is safe)
                    todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    provided: dict[str, set[str]] = {}
    for d in metadata.distributions():
        tops = {
            f.parts[0].removesuffix(".py")
            for f in d.files or []
            if len(f.parts) and not f.parts[0].endswith((".dist-info", ".pth", "__pycache__", ".."))
        }
        provided.setdefault(_norm(d.metadata["Name"]), set()).update(tops)
    needed = set().union(*(m for n, m in provided.items() if n in keep))
    hidden = sorted(set().union(*(m for n, m in provided.items() if n not in keep)) - needed)
    (directory / "sitecustomize.py").write_text(_HIDE.format(hidden=hidden))
    return {**os.environ, "PYTHONPATH": str(directory)}
