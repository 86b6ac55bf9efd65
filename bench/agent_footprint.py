#!/usr/bin/env python3
"""The agent's resident memory and CPU, against baselines measured in the same run.

    python -m bench.agent_footprint            # intervals 1 and 2 s, 10 peers, 30 s each
    python -m bench.agent_footprint --smoke    # 2 s, 2 peers, 5 s (CI)

At each metrics interval (``--intervals``; 2 s is the agent's default), each variant
runs in its own fresh process for the same time:

- ``baseline``: Python + asyncio + psutil taking ``cpu_percent()`` and
  ``virtual_memory()`` once an interval (the least any psutil-based agent does);
- ``metrics``: the agent's real ``MetricsReporter`` (every host figure, spool on
  disk, Prometheus pull server) with an empty WireGuard device;
- ``agent-imports``: everything ``agent.daemon`` imports, idle (what the whole
  agent holds before it does anything), with the userspace backend (wireguard-go);
- ``agent-imports-kernel``: the same plus the kernel backend's code path: pyroute2's
  ``WireGuard`` and ``IPRoute`` imported and one netlink lookup made, as
  ``agent.wireguard.kernel`` does on a host with the kernel module;
- ``agent``: the whole ``cladnet-agent`` (root) in a network namespace with
  ``--peers`` real peers (every one a real agent on wireguard-go), joined through a real
  controller and etcd, pushing to a real Mosquitto and collector; joined with
  ``join --no-run`` and then run as ``cladnet-agent run``, as the systemd unit does. The
  process measured is one agent's Python process once its mesh is complete; its
  wireguard-go is reported next to it (the data plane: node_exporter has no counterpart);
- ``node-exporter``: Debian's ``prometheus-node-exporter`` (default collectors) on a
  random loopback port, scraped by this process once an interval, as a Prometheus
  would (install it with ``apt-get install prometheus-node-exporter``; an instance
  the package started as a service is left alone).

Every measured Python process sees only the agent's install, ``cladnet[agent]`` (the
dev venv's other roles and test tools are left out, see
``bench.common.runtime_only_python``): with rich installed, httpx imports its own CLI,
and with selenium's trio, httpcore imports trio; neither is on a VM.

The agent's wheelhouse: ``pip wheel`` of ``cladnet[agent]`` (what
``deploy/build-wheelhouse.sh`` ships to VMs) against every role's set
(``cladnet[agent,controller,collector,cli,relay]``, what a VM installed before installs
by role), through pip's configured index with the versions of this venv pinned.

Reported: RSS at the end (VmRSS) and CPU seconds used (utime + stime) per process,
the ratios to the baseline and to node_exporter, the wheelhouses' sizes, the whole
agent's RSS with the kernel backend estimated as the measured agent plus what the
kernel path adds to the idle imports (this machine may have no WireGuard module), and
the issue's target (whole agent at 2 s: at most 40 MB RSS and 0.5 % of a core). One
JSON object on stdout, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import (
    clean_up_on_sigterm,
    cpu_seconds,
    machine_facts,
    rss_bytes,
    runtime_only_python,
    wireguard_go_processes,
)
from lab.agents import Agent
from lab.api import make_network, make_token
from lab.components import (
    MQTT_ADMIN_PASSWORD,
    Collector,
    Controller,
    Etcd,
    Mosquitto,
    free_port,
    wait_until,
)
from lab.netns import Lab

REPO = Path(__file__).resolve().parent.parent

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

IMPORTS_KERNEL = """
import asyncio
import agent.daemon, agent.main  # noqa: F401
from pyroute2 import IPRoute, WireGuard  # noqa: F401  (what KernelBackend loads)
from agent.wireguard.kernel import KernelBackend

async def main():
    await KernelBackend().exists("lo")  # one netlink round trip, in the worker thread
    await asyncio.sleep(3600)
asyncio.run(main())
"""

# What VMs installed before installs by role: every role but the ec2 driver's SDK.
ALL_ROLES = "agent,controller,collector,cli,relay"


def _status(pid: int) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds) of a process."""
    return rss_bytes(pid) / 2**20, cpu_seconds(pid)


def _measure(
    name: str, pid: int, seconds: float, interval: float, scrape: str | None = None
) -> dict[str, float | str]:
    """RSS and CPU of a running process over ``seconds``.

    With ``scrape`` (a /metrics URL) this process scrapes it once every ``interval``
    meanwhile, so a pull exporter does the same work per interval as the agent.
    """
    scrapes, scraped_bytes, samples = 0, 0, 0
    rss0, cpu0 = _status(pid)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if scrape is not None:
            text = httpx.get(scrape, timeout=interval).text
            scrapes, scraped_bytes = scrapes + 1, scraped_bytes + len(text)
            samples = sum(1 for line in text.splitlines() if line and line[0] != "#")
        time.sleep(min(left, interval))
    rss, cpu = _status(pid)
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


def run(
    name: str, cmd: list[str], seconds: float, interval: float, scrape: str | None = None
) -> dict[str, float | str]:
    """Start ``cmd`` in a fresh process, let it settle, then measure it."""
    # node_exporter logs every failing collector (e.g. systemd in a container) on stderr.
    quiet = subprocess.DEVNULL if scrape else None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=quiet)
    try:
        if scrape is None:
            time.sleep(1.5)  # imports done
        else:
            wait_until(lambda: _answers(scrape), 10, what=f"{name} to serve {scrape}")
        return _measure(name, proc.pid, seconds, interval, scrape)
    finally:
        proc.kill()  # ours, by its PID
        proc.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def python(interpreter: str, code: str, tmp: str, interval: float) -> list[str]:
    return [interpreter, "-c", code, tmp, str(interval)]


class AgentMesh:
    """etcd, Mosquitto, a collector and a controller for real agents in namespaces."""

    def __init__(self, tmp: Path, python: str) -> None:
        self.tmp, self.python = tmp, python  # the agents' interpreter
        self.lab = Lab()
        self.etcd = Etcd.serving(tmp / "etcd")
        self.broker = Mosquitto(data_dir=tmp / "mosquitto", port=free_port(), host=self.lab.gateway)
        self.collector = Collector(self.broker, tmp / "collector", free_port())
        self.ctl = Controller(
            etcd_url=self.etcd.url,
            state_dir=tmp / "controller",
            port=free_port(),
            host=self.lab.gateway,
            extra_env={
                "CLADNET_MQTT_URL": self.broker.url,
                "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
            },
        )
        self.hosts = 0

    def __enter__(self) -> AgentMesh:
        try:
            for part in (self.etcd, self.broker, self.ctl, self.collector):
                part.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for part in (self.collector, self.ctl, self.broker, self.etcd):
            part.stop()
        self.lab.cleanup()

    def measure(self, interval: float, peers: int, seconds: float) -> list[dict[str, float | str]]:
        """One agent and its wireguard-go, in a full mesh with ``peers`` other agents."""
        name = f"fp{self.hosts}"
        with self.ctl.client() as admin:
            make_network(admin, name, cidr=f"10.217.{self.hosts}.0/24", metrics_interval=interval)
            token = make_token(admin, name)
        agents = []
        for _ in range(peers + 1):
            self.hosts += 1
            ns = self.lab.add_host(self.hosts)
            a = Agent(
                self.lab,
                self.hosts,
                ns,
                self.tmp / f"agent{self.hosts}",
                f"cl-{self.lab.tag}w{self.hosts}",
                log_level="info",
                python=self.python,
            )
            agents.append(a)
        try:
            # As deployed: a one-shot join, then `cladnet-agent run` as the service.
            for a in agents:
                a.join(self.ctl.url, token, "--no-run")
            for a in agents:
                assert a.proc is not None
                if a.proc.wait(60) != 0:
                    raise RuntimeError(f"join failed: {a.log_text()}")
                a.start("run")
            me = agents[0]
            ips = [a.overlay_ip(60) for a in agents[1:]]
            for ip in ips:
                wait_until(lambda ip=ip: self.lab.ping(me.ns, ip), 60, what=f"ping {ip}")
            # Past the start: the first status report and metrics batches are out.
            time.sleep(max(3 * interval, 5))
            assert me.proc is not None
            wg = next(p for p, i in wireguard_go_processes().items() if i == me.interface)
            measured = _measure("agent", me.proc.pid, seconds, interval)
            measured |= {"peers": len(me.wg_peers()), "wireguard_go": _measure_now(wg)}
            return [measured]
        finally:
            for a in agents:
                a.stop()
            # wireguard-go outlives its agent (tunnels survive restarts): ours, by PID.
            ours = {a.interface for a in agents}
            for pid, interface in wireguard_go_processes().items():
                if interface in ours:
                    os.kill(pid, signal.SIGTERM)
            for a in agents:
                Path(f"/var/run/wireguard/{a.interface}.sock").unlink(missing_ok=True)


def wheelhouses(tmp: Path) -> dict[str, dict[str, float | int | str]]:
    """Size of the agent's wheelhouse and of every role's, built by pip with this venv's
    versions pinned; the two builds share one pip cache in ``tmp``."""
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    pins = tmp / "constraints.txt"
    pins.write_text("\n".join(x for x in freeze.splitlines() if "==" in x) + "\n")
    env = {
        **os.environ,
        "PIP_CONSTRAINT": str(pins),
        "PIP_CACHE_DIR": str(tmp / "pip-cache"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    sizes: dict[str, dict[str, float | int | str]] = {}
    for name, extras in (("agent", "agent"), ("all_roles", ALL_ROLES)):
        out = tmp / f"wheelhouse-{name}"
        wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(out)]
        built = subprocess.run(
            [*wheel, f"{REPO}[{extras}]"], capture_output=True, text=True, timeout=1800, env=env
        )
        if built.returncode != 0:
            raise RuntimeError(f"pip wheel of cladnet[{extras}] failed: {built.stderr[-2000:]}")
        wheels = sorted(out.glob("*.whl"))
        sizes[name] = {
            "extras": extras,
            "wheels": len(wheels),
            "mib": round(sum(w.stat().st_size for w in wheels) / 2**20, 1),
        }
    sizes["agent"]["ratio_to_all_roles"] = round(
        float(sizes["agent"]["mib"]) / float(sizes["all_roles"]["mib"]), 2
    )
    return sizes


def _measure_now(pid: int) -> dict[str, float]:
    rss, cpu = _status(pid)
    return {"rss_mib": round(rss, 1), "cpu_s_total": round(cpu, 3)}


def main() -> None:
    """Measure every variant in turn; print the JSON report and the summary line."""
    clean_up_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="2 s only, 2 peers, 5 s (CI)")
    p.add_argument("--intervals", default="1,2", help="metrics intervals in seconds")
    p.add_argument("--peers", type=int, default=10, help="peers of the measured agent")
    p.add_argument("--seconds", type=float, default=30.0, help="measured time per variant")
    args = p.parse_args()
    intervals = [2.0] if args.smoke else [float(i) for i in args.intervals.split(",")]
    seconds, peers = (5.0, 2) if args.smoke else (args.seconds, args.peers)
    exporter_binary = shutil.which(NODE_EXPORTER)
    by_interval: dict[str, list[dict[str, float | str]]] = {}
    with tempfile.TemporaryDirectory(prefix="cl-bench-") as tmp:
        # Every Python measured (agents included) sees only runtime dependencies, as
        # after `pip install cladnet`; the services the agents talk to see all.
        runtime = runtime_only_python(Path(tmp) / "runtime-venv", ("agent",))
        sizes = wheelhouses(Path(tmp))
        with AgentMesh(Path(tmp), runtime) as mesh:
            imports = run("agent-imports", python(runtime, IMPORTS, tmp, 2), seconds, 2)
            kernel = run(
                "agent-imports-kernel", python(runtime, IMPORTS_KERNEL, tmp, 2), seconds, 2
            )
            for interval in intervals:
                results = [
                    run("baseline", python(runtime, BASELINE, tmp, interval), seconds, interval),
                    run("metrics", python(runtime, METRICS, tmp, interval), seconds, interval),
                    *mesh.measure(interval, peers, seconds),
                ]
                if exporter_binary is not None:
                    port = free_port()
                    results.append(
                        run(
                            "node-exporter",
                            [
                                exporter_binary,
                                f"--web.listen-address=127.0.0.1:{port}",
                                "--log.level=warn",
                            ],
                            seconds,
                            interval,
                            scrape=f"http://127.0.0.1:{port}/metrics",
                        )
                    )
                _ratios(results)
                by_interval[f"{interval:g}"] = results
    default = {r["variant"]: r for r in by_interval.get("2", next(iter(by_interval.values())))}
    agent = default["agent"]
    target = {
        "interval_s": 2,
        "rss_bytes_max": TARGET_RSS_BYTES,
        "cpu_percent_max": TARGET_CPU_PERCENT,
        "met": float(agent["rss_mib"]) * 2**20 <= TARGET_RSS_BYTES
        and float(agent["cpu_percent"]) <= TARGET_CPU_PERCENT,
    }
    # The kernel backend adds pyroute2 to the same agent: its share of the idle imports.
    pyroute2_mib = round(float(kernel["rss_mib"]) - float(imports["rss_mib"]), 1)
    report = {
        "benchmark": "cladnet.agent_footprint",
        "inputs": {"seconds": seconds, "intervals": intervals, "peers": peers, "smoke": args.smoke},
        "machine": machine_facts("psutil", "aiomqtt", "pyroute2"),
        "node_exporter": exporter_binary and _version(exporter_binary),
        "wheelhouse": sizes,
        "agent_imports": imports,
        "agent_imports_kernel": kernel,
        "kernel_backend": {
            "pyroute2_mib": pyroute2_mib,
            "agent_rss_mib_estimate": round(float(agent["rss_mib"]) + pyroute2_mib, 1),
        },
        "by_interval": by_interval,
        "target": target,
    }
    print(json.dumps(report, indent=1))
    line = []
    for interval, results in by_interval.items():
        v = {r["variant"]: r for r in results}
        a = v["agent"]
        exporter = v.get("node-exporter")
        versus = (
            f" vs node_exporter {exporter['rss_mib']} MiB {exporter['cpu_percent']}% "
            f"(x{a['rss_vs_node_exporter']} RSS, x{a['cpu_vs_node_exporter']} CPU)"
            if exporter
            else f" (node_exporter missing: apt-get install {NODE_EXPORTER})"
        )
        line.append(
            f"at {interval} s agent with {a['peers']} peers {a['rss_mib']} MiB "
            f"{a['cpu_percent']}% CPU{versus}"
        )
    verdict = "met" if target["met"] else "NOT met"
    wheel_agent, wheel_all = sizes["agent"], sizes["all_roles"]
    line.append(
        f"kernel backend (pyroute2) +{pyroute2_mib} MiB → agent ≈"
        f"{report['kernel_backend']['agent_rss_mib_estimate']} MiB"
    )
    line.append(
        f"agent wheelhouse {wheel_agent['mib']} MiB ({wheel_agent['wheels']} wheels) "
        f"vs every role {wheel_all['mib']} MiB ({wheel_all['wheels']})"
    )
    print("; ".join(line) + f"; target ≤40 MB, ≤0.5% at 2 s: {verdict}")


TARGET_RSS_BYTES = 40_000_000
TARGET_CPU_PERCENT = 0.5


def _ratios(results: list[dict[str, float | str]]) -> None:
    """Each variant against the psutil baseline and, when measured, node_exporter."""
    v = {r["variant"]: r for r in results}
    base, exporter = v["baseline"], v.get("node-exporter")
    for r in results[1:]:
        r["rss_ratio"] = round(float(r["rss_mib"]) / float(base["rss_mib"]), 2)
        if exporter is not None and r is not exporter:
            # Below 1: lighter than node_exporter.
            r["rss_vs_node_exporter"] = round(float(r["rss_mib"]) / float(exporter["rss_mib"]), 2)
            r["cpu_vs_node_exporter"] = round(
                float(r["cpu_s"]) / max(float(exporter["cpu_s"]), 0.001), 2
            )


def _version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0]


if __name__ == "__main__":
    main()
