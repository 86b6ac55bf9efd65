#!/usr/bin/env python3
"""The agent's metrics path: resident memory and CPU, against a same-run baseline.

    /work/venv/bin/python bench/agent_footprint.py            # 30 s per process
    /work/venv/bin/python bench/agent_footprint.py --smoke    # 5 s (CI)

Each variant runs in its own fresh process for the same time at one interval
(``--interval``, default 2 s, the agent's default):

- ``baseline``: Python + asyncio + psutil taking ``cpu_percent()`` and
  ``virtual_memory()`` once an interval (the least any psutil-based agent does);
- ``metrics``: the agent's real ``MetricsReporter`` (every host figure, spool on
  disk, Prometheus pull server) with an empty WireGuard device;
- ``agent-imports``: everything ``agent.daemon`` imports, idle (what the whole
  agent holds before it does anything);
- ``node-exporter``: Debian's ``prometheus-node-exporter`` (default collectors) on a
  random loopback port, scraped by this process once an interval, as a Prometheus
  would (install it with ``apt-get install prometheus-node-exporter``; an instance
  the package started as a service is left alone).

Reported: RSS at the end (VmRSS) and CPU seconds used (utime + stime) per process,
the ratios to the baseline, and the metrics path against node_exporter. One JSON
object on stdout, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.components import free_port, wait_until  # noqa: E402

NODE_EXPORTER = "prometheus-node-exporter"

BASELINE = """
import asyncio, psutil, sys
async def main():
    while True:
        psutil.cpu_percent(); psutil.virtual_memory()
        await asyncio.sleep(float(sys.argv[2]))
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
        overlay_ip="127.0.0.1", spool_dir=Path(sys.argv[1]), interval=float(sys.argv[2]),
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


def run(
    name: str, cmd: list[str], seconds: float, interval: float, scrape: str | None = None
) -> dict[str, float | str]:
    """Start ``cmd``, let it settle, then measure it for ``seconds``.

    With ``scrape`` (a /metrics URL) this process scrapes it once every ``interval``
    meanwhile, so a pull exporter does the same work per interval as the agent.
    """
    # node_exporter logs every failing collector (e.g. systemd in a container) on stderr.
    quiet = subprocess.DEVNULL if scrape else None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=quiet)
    scrapes, scraped_bytes, samples = 0, 0, 0
    try:
        if scrape is None:
            time.sleep(1.5)  # imports done
        else:
            wait_until(lambda: _answers(scrape), 10, what=f"{name} to serve {scrape}")
        rss0, cpu0 = _status(proc.pid)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if scrape is not None:
                text = httpx.get(scrape, timeout=interval).text
                scrapes, scraped_bytes = scrapes + 1, scraped_bytes + len(text)
                samples = sum(1 for line in text.splitlines() if line and line[0] != "#")
            time.sleep(min(left, interval))
        rss, cpu = _status(proc.pid)
    finally:
        proc.kill()  # ours, by its PID
        proc.wait(10)
    result: dict[str, float | str] = {
        "variant": name,
        "rss_mib": round(rss, 1),
        "rss_after_start_mib": round(rss0, 1),
        "cpu_s": round(cpu - cpu0, 3),
        "cpu_percent": round(100 * (cpu - cpu0) / seconds, 2),
    }
    if scrape is not None:
        result |= {
            "scrapes": scrapes,
            "samples_per_scrape": samples,
            "bytes_per_scrape": scraped_bytes // max(1, scrapes),
        }
    return result


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def python(code: str, tmp: str, interval: float) -> list[str]:
    return [sys.executable, "-c", code, tmp, str(interval)]


def main() -> None:
    """Measure every variant in turn; print the JSON report and the summary line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between collections")
    args = p.parse_args()
    seconds = 5.0 if args.smoke else 30.0
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run("baseline", python(BASELINE, tmp, args.interval), seconds, args.interval),
            run("metrics", python(METRICS, tmp, args.interval), seconds, args.interval),
            run("agent-imports", python(IMPORTS, tmp, args.interval), seconds, args.interval),
        ]
    base, m = results[0], results[1]
    for r in results[1:]:
        r["rss_ratio"] = round(float(r["rss_mib"]) / float(base["rss_mib"]), 2)
    binary = shutil.which(NODE_EXPORTER)
    exporter: dict[str, float | str]
    if binary is None:
        exporter = {"variant": "node-exporter", "skipped": f"apt-get install {NODE_EXPORTER}"}
    else:
        port = free_port()
        exporter = run(
            "node-exporter",
            [binary, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            seconds,
            args.interval,
            scrape=f"http://127.0.0.1:{port}/metrics",
        )
        # Below 1: the agent's metrics path is lighter than node_exporter.
        m["rss_vs_node_exporter"] = round(float(m["rss_mib"]) / float(exporter["rss_mib"]), 2)
        m["cpu_vs_node_exporter"] = round(
            float(m["cpu_s"]) / max(float(exporter["cpu_s"]), 0.001), 2
        )
    results.append(exporter)
    print(json.dumps({"seconds": seconds, "interval": args.interval, "results": results}, indent=1))
    versus = (
        f"; node_exporter {exporter['rss_mib']} MiB, {exporter['cpu_percent']}% "
        f"(agent/exporter: RSS x{m['rss_vs_node_exporter']}, CPU x{m['cpu_vs_node_exporter']})"
        if "rss_mib" in exporter
        else f"; node_exporter skipped ({exporter['skipped']})"
    )
    print(
        f"metrics path at {args.interval:g} s: {m['rss_mib']} MiB RSS ({m['rss_ratio']}x "
        f"baseline {base['rss_mib']} MiB), {m['cpu_percent']}% CPU vs {base['cpu_percent']}%; "
        f"whole agent idle: {results[2]['rss_mib']} MiB" + versus
    )


if __name__ == "__main__":
    main()
