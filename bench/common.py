"""What every benchmark reports the same way: machine facts, percentiles, process CPU."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import signal
import subprocess
import venv
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

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


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_only_python(directory: Path, extras: Sequence[str] = (), dist: str = "cladnet") -> str:
    """A Python whose site-packages holds only ``dist``'s runtime dependencies with
    ``extras`` (a role: ``("agent",)``), as after ``pip install 'cladnet[agent]'``: a fresh
    venv in ``directory`` with those distributions linked in from this one, and this
    checkout (not installed: on a ``.pth``) for ``dist`` itself. Everything else of the
    dev venv stays out (the other roles, the test tools). Returns the venv's
    interpreter."""
    keep, todo = set(), [dist]
    wanted = set(extras)
    for req in metadata.requires(dist) or []:  # `cladnet[a,b]` in an extra: a and b too
        self_ref = re.match(rf"{re.escape(dist)}\[([^\]]+)\];.*extra == \"(\w+)\"", req)
        if self_ref and self_ref.group(2) in wanted:
            wanted |= {e.strip() for e in self_ref.group(1).split(",")}
    while todo:
        name = _norm(todo.pop())
        if name in keep:
            continue
        keep.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):
            for req in metadata.requires(name) or []:
                extra = re.search(r"extra == [\"']([\w-]+)[\"']", req)
                # Other markers: kept (a superset is safe); extras only of dist's own.
                if extra is None or (name == _norm(dist) and extra.group(1) in wanted):
                    todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    keep.discard(_norm(dist))
    venv.EnvBuilder(symlinks=True).create(directory)
    python = directory / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    )
    for d in metadata.distributions():
        if _norm(d.metadata["Name"]) not in keep:
            continue
        tops = {f.parts[0] for f in d.files or [] if len(f.parts) > 1 or f.suffix == ".py"}
        tops |= {f.parts[0] for f in d.files or [] if f.suffix == ".so" and len(f.parts) == 1}
        for top in tops - {"..", "__pycache__"}:
            link = site / top
            if not link.exists():
                link.symlink_to(Path(str(d.locate_file(top))))
    (site / "cladnet-checkout.pth").write_text(f"{REPO}\n")
    return str(python)
