"""``cladnet demo``: a multi-cloud on this machine (root), from nothing to a full mesh.

``up`` starts etcd, Mosquitto, the collector and the controller (with the ``local``
driver), then asks the controller for a group of VMs over three clouds — two of them
with the same private subnet — and waits for the full mesh. Every process it starts
is recorded by PID in the demo directory; ``down`` stops exactly those, removes the
VMs, clouds and the internet bridge, and the directory. Running ``up`` twice is
harmless; a failed ``up`` cleans up after itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cladnet.api_client import ApiClientError, SyncClient
from cladnet.api_client import endpoints as ep
from cladnet.cli.api import CliError
from cladnet.cli.groups import find

demo_app = typer.Typer(
    help="A local multi-cloud demo on this machine (root).", no_args_is_help=True
)

GROUP = "demo"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TOOLS = ("etcd", "mosquitto", "mosquitto_ctrl", "wireguard-go", "wg", "ip", "nft", "ping")
ETCD_PORT, MQTT_PORT, COLLECTOR_PORT, CONTROLLER_PORT = 23790, 18830, 8471, 8470
MQTT_ADMIN_PORT = MQTT_PORT + 1  # loopback only: the controller's and collector's
Dir = Annotated[
    Path, typer.Option("--dir", envvar="CLADNET_DEMO_DIR", help="where the demo keeps its state")
]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]
MEMBERS = [
    {"driver": "local", "region": "a-west", "count": 2},
    {"driver": "local", "region": "b-east", "count": 2},
    {"driver": "local", "region": "c-north", "count": 2},
]


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _internet(used: str) -> str:
    """A 172.x.0.0/16 for the demo's internet that no address of this machine is in."""
    for second in range(29, 32):
        if f" 172.{second}." not in used:
            return f"172.{second}.0.0/16"
    raise CliError("no free 172.29-31.0.0/16 for the demo's internet")


class Demo:
    """The demo's files: settings, PIDs, logs, secrets — all under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "demo.json"

    def load(self) -> dict[str, Any]:
        return json.loads(self.file.read_text()) if self.file.exists() else {}

    def save(self, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.file.write_text(json.dumps(data, indent=1))
        self.file.chmod(0o600)

    def ca_pem(self) -> str | None:
        """The cluster CA, as the controller wrote it (read locally: the demo's own)."""
        ca = self.root / "controller" / "tls" / "ca.crt"
        return ca.read_text() if ca.exists() else None

    def api(self) -> SyncClient:
        data = self.load()
        if not data.get("controller"):
            raise CliError(f"the demo is not up (nothing in {self.root}); run: cladnet demo up")
        return SyncClient(data["controller"], data["token"], "controller", ca_pem=self.ca_pem())

    def driver(self) -> Any:
        from controller.drivers.local import Driver

        return Driver(**self.load()["driver"])


def _alive(pid: int, binary: str) -> bool:
    """Whether ``pid`` is still the process we started (not a reused PID)."""
    try:
        return binary in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _start(demo: Demo, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
    data = demo.load()
    pid = data.get("pids", {}).get(name)
    if pid and _alive(pid, Path(args[0]).name):
        return
    with (demo.root / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # outlives this command
        )
    data.setdefault("pids", {})[name] = proc.pid
    data.setdefault("binaries", {})[name] = Path(args[0]).name
    demo.save(data)


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (CliError, ApiClientError, OSError):
            result = None
        if result:
            return result
        time.sleep(0.3)
    raise CliError(f"timed out after {timeout:.0f}s waiting for {what}")


def _port_open(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _services(demo: Demo) -> None:
    """etcd, Mosquitto (dynamic security), collector and controller, each once.

    What the VMs reach (the controller, the broker) listens on the bridge with TLS
    from the cluster CA; what only this machine uses (etcd, the broker's admin
    listener, the collector) stays on loopback."""
    data = demo.load()
    gw = data["gateway"]
    secret = data["secrets"]
    etcd_url = f"http://127.0.0.1:{ETCD_PORT}"
    peer = f"http://127.0.0.1:{ETCD_PORT + 1}"
    _start(
        demo,
        "etcd",
        [
            shutil.which("etcd") or "etcd",
            "--name",
            "cl-demo",
            "--data-dir",
            str(demo.root / "etcd"),
            "--listen-client-urls",
            etcd_url,
            "--advertise-client-urls",
            etcd_url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"cl-demo={peer}",
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ],
    )

    mq = demo.root / "mosquitto"
    mq.mkdir(exist_ok=True, mode=0o700)
    dynsec = mq / "dynamic-security.json"
    mq_env = {
        "CLADNET_MQTT_ADMIN_PASSWORD": secret["mqtt_admin"],
        "CLADNET_MQTT_PASSWORD": secret["mqtt_collector"],
    }
    init = str(DEPLOY / "mosquitto" / "init-dynsec.sh")
    if not dynsec.exists():
        subprocess.run(
            ["bash", init, "init", str(dynsec)], env={**os.environ, **mq_env}, check=True
        )
    # The broker's certificate from the cluster CA (the first call creates the CA).
    _wait(lambda: _port_open("127.0.0.1", ETCD_PORT), 15, "etcd")
    subprocess.run(
        [
            _venv_bin("cladnet-controller"),
            "--etcd",
            etcd_url,
            "--state-dir",
            str(demo.root / "controller"),
            "--issue-cert",
            str(mq / "tls"),
            "--tls-name",
            gw,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    conf = (DEPLOY / "mosquitto" / "cladnet.conf").read_text()
    conf = conf.replace(
        "listener 1883",
        f"listener {MQTT_ADMIN_PORT} 127.0.0.1\nlistener {MQTT_PORT} {gw}\n"
        f"certfile {mq}/tls/server.crt\nkeyfile {mq}/tls/server.key\ncafile {mq}/tls/ca.crt",
    )
    conf = conf.replace("/var/lib/mosquitto/dynamic-security.json", str(dynsec))
    conf = conf.replace("/var/lib/mosquitto/", f"{mq}/")
    (mq / "mosquitto.conf").write_text("user root\n" + conf)
    mosquitto = shutil.which("mosquitto") or "mosquitto"
    _start(demo, "mosquitto", [mosquitto, "-c", str(mq / "mosquitto.conf")])
    _wait(lambda: _port_open("127.0.0.1", MQTT_ADMIN_PORT), 15, "Mosquitto")
    if not (mq / ".collector").exists():
        subprocess.run(
            ["bash", init, "collector", "127.0.0.1", str(MQTT_ADMIN_PORT)],
            env={**os.environ, **mq_env},
            check=True,
            capture_output=True,
        )
        (mq / ".collector").touch()

    collector_url = f"http://127.0.0.1:{COLLECTOR_PORT}"
    _start(
        demo,
        "collector",
        [
            _venv_bin("cladnet-collector"),
            "--mqtt-url",
            f"mqtt://127.0.0.1:{MQTT_ADMIN_PORT}",
            "--mqtt-user",
            "cladnet-collector",
            "--listen",
            f"127.0.0.1:{COLLECTOR_PORT}",
            "--state-dir",
            str(demo.root / "collector"),
        ],
        {
            "CLADNET_MQTT_PASSWORD": secret["mqtt_collector"],
            "CLADNET_COLLECTOR_TOKEN": secret["admin"],
        },
    )

    drivers = demo.root / "drivers.json"
    drivers.write_text(json.dumps({"local": data["driver"]}))
    url = data["controller"]
    _start(
        demo,
        "controller",
        [
            _venv_bin("cladnet-controller"),
            "--etcd",
            etcd_url,
            "--listen",
            f"{gw}:{CONTROLLER_PORT}",
            "--state-dir",
            str(demo.root / "controller"),
            "--drivers",
            str(drivers),
            "--advertise-url",
            url,
            "--mqtt-url",
            f"mqtts://{gw}:{MQTT_PORT}",
            "--mqtt-admin-url",
            f"mqtt://127.0.0.1:{MQTT_ADMIN_PORT}",
            "--collector-url",
            collector_url,
        ],
        {
            "CLADNET_ADMIN_TOKEN": secret["admin"],
            "CLADNET_LEADER_TTL": "3",
            "CLADNET_MQTT_ADMIN_PASSWORD": secret["mqtt_admin"],
            # The dashboard's monitoring goes through the controller's proxy.
            "CLADNET_COLLECTOR_TOKEN": secret["admin"],
        },
    )
    # Until the controller has written the CA, the check fails verification: retried.
    _wait(lambda: demo.api().call(ep.READY), 30, "the controller")


@demo_app.command("up")
def up(
    root: Dir = Path("/var/lib/cladnet-demo"),
    timeout: Annotated[float, typer.Option(help="seconds to wait for the mesh")] = 120,
) -> None:
    """Start everything, create the group over three clouds, wait for the full mesh."""
    from cladnet.cli import out

    if os.geteuid() != 0:
        raise CliError("the demo makes namespaces, bridges and WireGuard devices: run it as root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise CliError(f"missing {', '.join(missing)}: run deploy/setup.sh (apt-get) first")
    demo = Demo(root)
    data = demo.load()
    if not data:
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        internet = _internet(used)
        gateway = internet.replace(".0.0/16", ".0.1")
        prefix = ".".join(internet.split(".")[:2])
        data = {
            "gateway": gateway,
            "controller": f"https://{gateway}:{CONTROLLER_PORT}",
            "collector": f"http://127.0.0.1:{COLLECTOR_PORT}",
            "secrets": {
                k: secrets.token_urlsafe(24) for k in ("admin", "mqtt_admin", "mqtt_collector")
            },
            "driver": {
                "state_dir": str(root / "cloud"),
                "internet": internet,
                "clouds": {
                    "a": {"public": f"{prefix}.1.0/24", "regions": {"a-west": "192.168.1.0/24"}},
                    "b": {"public": f"{prefix}.2.0/24", "regions": {"b-east": "192.168.1.0/24"}},
                    "c": {"public": f"{prefix}.3.0/24", "regions": {"c-north": "10.77.0.0/24"}},
                },
            },
        }
        data["token"] = data["secrets"]["admin"]
        demo.save(data)
    try:
        asyncio.run(demo.driver().prepare())
        out.print(f"==> services (logs in {root})")
        _services(demo)
        api = demo.api()
        if find(api, GROUP) is None:
            out.print("==> group 'demo': 6 VMs over clouds a, b (both 192.168.1.0/24) and c")
            api.call(ep.GROUP_CREATE, {"name": GROUP, "members": MEMBERS, "keepalive": 5})
        _wait(lambda: api.call(ep.GROUP, name=GROUP)["state"] == "Running", timeout, "6 VMs")
        _wait(lambda: _matrix(demo)["complete"], timeout, "the full mesh")
        # Agents publish their peers' handshakes with their metrics: wait for them.
        _wait(lambda: _healthy(demo), timeout, "every agent to report its peers")
    except (CliError, ApiClientError, subprocess.CalledProcessError, OSError) as e:
        out.print(f"[red]demo up failed: {e}; cleaning up[/]")
        _down(demo)
        raise CliError(f"demo up failed: {e}") from e
    _write_context(demo)
    status(root, as_json=False)
    from cladnet.cli import _render_status

    out.print(_render_status(_views(demo)))
    token = data["token"]
    out.print(f"\ndashboard: {data['controller']}/ui  (token: {token[:6]}… in {demo.file})")
    out.print("try: cladnet demo suspend demo-1; cladnet demo resume demo-1; cladnet demo down")


def _views(demo: Demo) -> list[dict[str, Any]]:
    from cladnet.cli.status import summary, with_health

    api, data = demo.api(), demo.load()
    net = api.call(ep.NETWORK, ref=GROUP)
    health = SyncClient(data["collector"], data["token"], "collector").call(ep.PAIRS, name=GROUP)
    hosts = with_health(api.call(ep.NETWORK_HOSTS, ref=net["id"]), health["hosts"])
    return [summary(net, hosts, time.time())]


def _healthy(demo: Demo) -> bool:
    return bool(_views(demo)[0]["healthy"])


def _write_context(demo: Demo) -> None:
    """A CLI context named ``demo``, so ``cladnet status`` and friends work at once."""
    from cladnet.cli import config

    data = demo.load()
    conf = config.load()
    conf["contexts"]["demo"] = {
        "controller": data["controller"],
        "collector": data["collector"],
        "token": data["token"],
        "ca_pem": demo.ca_pem(),
    }
    conf["current"] = "demo"
    config.save(conf)


def _matrix(demo: Demo) -> dict[str, Any]:
    """Ping every VM's overlay address from every other running VM (in parallel)."""
    group = demo.api().call(ep.GROUP, name=GROUP)
    vms = [vm for vm in group["vms"] if vm["state"] == "Running"]
    probes = {}
    for a in vms:
        for b in vms:
            if a is not b and b["overlay_ip"] and a["details"].get("namespace"):
                cmd = [
                    "ip",
                    "netns",
                    "exec",
                    a["details"]["namespace"],
                    "ping",
                    "-c1",
                    "-W1",
                    "-q",
                    b["overlay_ip"],
                ]
                probes[(a["name"], b["name"])] = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                )
    pairs = []
    for (a, b), proc in probes.items():
        output, _ = proc.communicate(timeout=10)
        latency = None
        if proc.returncode == 0 and "rtt" in output:
            latency = float(output.rsplit("=", 1)[1].split("/")[1])
        pairs.append({"from": a, "to": b, "ok": proc.returncode == 0, "latency_ms": latency})
    expected = len(vms) * (len(vms) - 1)
    every_vm = len(vms) == len(group["vms"]) > 0
    complete = every_vm and len(pairs) == expected and all(p["ok"] for p in pairs)
    return {"group": group, "pairs": pairs, "complete": complete}


@demo_app.command("env")
def env(root: Dir = Path("/var/lib/cladnet-demo")) -> None:
    """Print ``export`` lines for the running demo's controller, collector, token and CA.

    ``eval "$(cladnet demo env)"`` and the README's walk-through works as written:
    curl with ``--cacert "$CLADNET_CACERT"``, the CLI through the same variables.
    """
    import shlex

    demo = Demo(root)
    data = demo.load()
    if not data.get("controller"):
        raise CliError(f"the demo is not up (nothing in {root}); run: cladnet demo up")
    ca = root / "controller" / "tls" / "ca.crt"
    values = {
        "CLADNET_CONTROLLER": data["controller"],
        "CLADNET_COLLECTOR": data["collector"],
        "CLADNET_TOKEN": data["token"],
        "CLADNET_CACERT": str(ca),
        "CLADNET_CONTEXT": "demo",
    }
    for name, value in values.items():
        print(f"export {name}={shlex.quote(value)}")


@demo_app.command("status")
def status(root: Dir = Path("/var/lib/cladnet-demo"), as_json: Json = False) -> None:
    """Every VM (cloud, region, state, addresses) and every pair's connectivity."""
    from cladnet.cli import _table, out

    m = _matrix(Demo(root))
    group = m["group"]
    if as_json:
        print(json.dumps({"group": group, "pairs": m["pairs"]}, indent=2, sort_keys=True))
    else:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(group["counts"].items()))
        columns = ["VM", "CLOUD", "REGION", "STATE", "PRIVATE", "PUBLIC", "OVERLAY"]
        rows = [
            [vm["name"], vm["details"].get("cloud", ""), vm["region"], vm["state"]]
            + [vm[k] or "-" for k in ("private_ip", "public_ip", "overlay_ip")]
            for vm in group["vms"]
        ]
        title = f"group {group['name']}: {group['state']} ({counts})"
        out.print(_table(title, columns, rows, drop=("PRIVATE", "REGION")))
        names = [vm["name"] for vm in group["vms"]]
        pairs = {(p["from"], p["to"]): p for p in m["pairs"]}
        grid = Table(title="overlay ping (ms)")
        grid.add_column("from \\ to")
        for n in names:
            grid.add_column(n)
        for a in names:
            row = []
            for b in names:
                p = pairs.get((a, b))
                if a == b:
                    row.append("·")
                elif p is None:
                    row.append("-")
                else:
                    row.append(f"[green]{p['latency_ms']:.1f}[/]" if p["ok"] else "[red]✗[/]")
            grid.add_row(a, *row)
        out.print(grid)
    if not m["complete"]:
        raise typer.Exit(3)


def _act(root: Path, vm: str, action: str) -> None:
    from cladnet.cli import out

    api = Demo(root).api()
    body: ep.ActionBody = {"action": action}
    api.call(ep.VM_ACTION, body, name=GROUP, vm=vm)

    def settled() -> dict[str, Any] | None:
        record = next(v for v in api.call(ep.GROUP, name=GROUP)["vms"] if v["name"] == vm)
        return record if record["state"] in ("Running", "Suspended", "Failed") else None

    record = _wait(settled, 120, f"{vm} to {action}")
    out.print(f"{vm}: {record['state']}, public address {record['public_ip'] or 'none'}")


@demo_app.command("suspend")
def suspend(vm: str, root: Dir = Path("/var/lib/cladnet-demo")) -> None:
    """Suspend one VM: its agent stops and its public address is released."""
    _act(root, vm, "suspend")


@demo_app.command("resume")
def resume(vm: str, root: Dir = Path("/var/lib/cladnet-demo")) -> None:
    """Resume it with a NEW public address; watch the mesh recover (demo status)."""
    _act(root, vm, "resume")


def _down(demo: Demo) -> None:
    data = demo.load()
    if data.get("controller"):
        try:
            api = demo.api()
            if find(api, GROUP) is not None:
                api.call(ep.GROUP_DELETE, name=GROUP)
                _wait(lambda: find(api, GROUP) is None, 60, "removal")
        except (CliError, ApiClientError):
            pass  # the controller is gone: the driver's records remove the rest
    for name in ("controller", "collector", "mosquitto", "etcd"):
        pid = data.get("pids", {}).get(name)
        if pid and _alive(pid, data["binaries"][name]):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid, data["binaries"][name]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid, data["binaries"][name]):
                os.kill(pid, signal.SIGKILL)
    if data.get("driver"):
        asyncio.run(demo.driver().teardown())
    shutil.rmtree(demo.root, ignore_errors=True)


@demo_app.command("down")
def down(root: Dir = Path("/var/lib/cladnet-demo")) -> None:
    """Remove the VMs, clouds, bridge, services and the demo's directory."""
    from cladnet.cli import config, out

    _down(Demo(root))
    conf = config.load()
    if conf["contexts"].pop("demo", None) is not None:
        if conf.get("current") == "demo":
            conf["current"] = next(iter(conf["contexts"]), None)
        config.save(conf)
    out.print("demo removed")
