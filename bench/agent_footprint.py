#!/usr/bin/env python3
"""The agent's metrics path: resident memory and CPU, against a same-run baseline.

    /work/venv/bin/python bench/agent_footprint.py            # 30 s per process
    /work/venv/bin/python bench/agent_footprint.py --smoke    # 5 s (CI)

Each variant runs in its own fresh interpreter for the same time at a 1 s interval:

- ``baseline``: Python + asyncio + psutil taking ``cpu_percent()`` and
  ``virtual_memory()`` once a second (the least any psutil-based agent does);
- ``metrics``: the agent's real ``MetricsReporter`` (every host figure, spool on
  disk, Prometheus pull server) with an empty WireGuard device;
- ``agent-imports``: everything ``agent.daemon`` imports, idle (what the whole
  agent holds before it does anything).

Reported: RSS at the end (VmRSS) and CPU seconds used (utime + stime) per process,
and the ratios to the baseline. One JSON object on stdout, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BASELINE = """
import asyncio, psutil
async def main():
    while True:
        psutil.cpu_percent(); psutil.virtual_memory()
        await asyncio.sleep(1)
asyncio.run(main())
"""

METRICS = """
import asyncio, sys
from pathlib import Path
from agent.metrics.exposition import MetricsServer
from agent.metrics.reporter import MetricsReporter
from cladnet.mesh import DeviceState

async def device():
    return DeviceState(listen_port=51820, peers={})

async def main():
    server = MetricsServer("127.0.0.1", 0)
    reporter = MetricsReporter(network="bench", host="vm1", host_id="h-1",
        overlay_ip="127.0.0.1", spool_dir=Path(sys.argv[1]), interval=1.0,
        device=device, peers=dict, server=server)
    await asyncio.gather(server.run(), reporter.run())
asyncio.run(main())
"""

IMPORTS = """
import asyncio
import agent.daemon, agent.main  # noqa: F401
asyncio.run(asyncio.sleep(3600))
"""


def _status(pid: int) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds) of a process."""
    rss_kb = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return rss_kb / 1024, cpu


def run(name: str, code: str, seconds: float) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-c", code, tmp], cwd=REPO)
        try:
            time.sleep(1.5)  # imports done
            rss0, cpu0 = _status(proc.pid)
            time.sleep(seconds)
            rss, cpu = _status(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    return {
        "variant": name,
        "rss_mib": round(rss, 1),
        "rss_after_import_mib": round(rss0, 1),
        "cpu_s": round(cpu - cpu0, 3),
        "cpu_percent": round(100 * (cpu - cpu0) / seconds, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    seconds = 5.0 if args.smoke else 30.0
    results = [
        run("baseline", BASELINE, seconds),
        run("metrics", METRICS, seconds),
        run("agent-imports", IMPORTS, seconds),
    ]
    base = results[0]
    for r in results[1:]:
        r["rss_ratio"] = round(float(r["rss_mib"]) / float(base["rss_mib"]), 2)
    print(json.dumps({"seconds": seconds, "results": results}, indent=1))
    m = results[1]
    print(
        f"metrics path: {m['rss_mib']} MiB RSS ({m['rss_ratio']}x baseline "
        f"{base['rss_mib']} MiB), {m['cpu_percent']}% CPU vs {base['cpu_percent']}%; "
        f"whole agent idle: {results[2]['rss_mib']} MiB"
    )


if __name__ == "__main__":
    main()
