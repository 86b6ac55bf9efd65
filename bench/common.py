"""What every benchmark reports the same way: machine facts, percentiles, process CPU."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
