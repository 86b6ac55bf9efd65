"""deploy/, checked with the real tools: systemd-analyze, pip in a network-less
namespace, docker-compose (``config`` only, no daemon), busybox sh (the
eclipse-mosquitto image's shell), Mosquitto, etcd and VictoriaMetrics."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from lab.components import (
    MQTT_ADMIN_PASSWORD,
    MQTT_COLLECTOR_PASSWORD,
    REPO,
    Controller,
    Victoria,
    _stop,
    free_port,
    wait_until,
)
from tests.support import (
    DEPLOY,
    OPT_BIN,
    needs_systemd_analyze,
    run,
    unit_settings,
    verify_unit,
    with_real_binaries,
)


def output(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


# ---- systemd units ----------------------------------------------------------------------

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    assert OPT_BIN in unit.read_text()
    ok, text = verify_unit(with_real_binaries(unit, tmp_path))
    assert ok, text


@needs_systemd_analyze
def test_verify_catches_mistakes(tmp_path: Path) -> None:
    agent = DEPLOY / "systemd" / "cladnet-agent.service"
    copy = with_real_binaries(agent, tmp_path)
    copy.write_text(copy.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert not verify_unit(copy)[0]
    copy.write_text(agent.read_text().replace(OPT_BIN, "/nonexistent/"))
    assert not verify_unit(copy)[0]


def test_units_are_hardened() -> None:
    agent = unit_settings("cladnet-agent.service")
    assert agent["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_NET_BIND_SERVICE"
    assert agent["ReadWritePaths"] == "-/etc/hosts"  # not /etc/resolv.conf, not /etc
    assert "AmbientCapabilities" not in agent and "User" not in agent
    for name in ("cladnet-agent", "cladnet-controller", "cladnet-collector"):
        unit = unit_settings(f"{name}.service")
        assert unit["NoNewPrivileges"] == "yes" and unit["ProtectSystem"] == "strict", name
        assert unit["ProtectHome"] == "yes" and unit["PrivateTmp"] == "yes", name
    for name in ("cladnet-controller", "cladnet-collector"):  # no root at all
        assert unit_settings(f"{name}.service")["DynamicUser"] == "yes"


# ---- wheelhouse and offline install ------------------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/build-wheelhouse.sh, through pip's configured index (here: local mirrors),
    with the versions this venv runs pinned. ~20 s."""
    out = tmp_path_factory.mktemp("wheelhouse")
    pins = out.parent / "constraints.txt"
    freeze = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"]).stdout
    pins.write_text("\n".join(x for x in freeze.splitlines() if "==" in x) + "\n")
    env = {**os.environ, "PYTHON": sys.executable, "PIP_CONSTRAINT": str(pins)}
    r = run(["bash", str(DEPLOY / "build-wheelhouse.sh"), str(out)], timeout=900, env=env)
    assert r.returncode == 0, output(r)
    return out


def install(*args: str, network: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    """install-agent.sh with no pip configuration at all (this machine's names local
    indexes and find-links) and, unless ``network``, in a namespace with no network."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean.update(PIP_CONFIG_FILE=os.devnull, PYTHON=sys.executable, **env)
    offline = [] if network else ["unshare", "--net"]
    cmd = [*offline, "bash", str(DEPLOY / "install-agent.sh"), *args]
    return run(cmd, timeout=600, env=clean)


@pytest.fixture(scope="module")
def installed(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("unshare --net (an install with no network) needs root")
    prefix = tmp_path_factory.mktemp("prefix") / "cladnet"
    units = prefix.parent / "units"
    r = install("--wheels", str(wheelhouse), "--prefix", str(prefix), "--unit-dir", str(units))
    assert r.returncode == 0 and "installed cladnet-" in r.stdout, output(r)
    return prefix


def test_offline_install(installed: Path, wheelhouse: Path) -> None:
    """A fresh venv from the wheelhouse alone: the agent runs from the venv, pip finds
    every dependency satisfied, the unit starts that venv's agent and verifies."""
    venv = installed / "venv"
    r = run([str(venv / "bin/cladnet-agent"), "--help"])
    assert r.returncode == 0 and "join" in r.stdout, output(r)
    r = run([str(venv / "bin/python"), "-c", "import agent.daemon; print(agent.__file__)"])
    assert r.returncode == 0 and r.stdout.startswith(str(venv)), output(r)
    assert run([str(venv / "bin/pip"), "check"]).returncode == 0
    # The default wheelhouse is the agent's set: no server, etcd, gRPC or CLI wheels.
    manifest = (wheelhouse / "MANIFEST").read_text().lower()
    for server_side in ("fastapi", "uvicorn", "aetcd", "grpcio", "typer", "rich"):
        assert f"\n{server_side}-" not in f"\n{manifest}", manifest
    unit = installed.parent / "units" / "cladnet-agent.service"
    original = (DEPLOY / "systemd" / "cladnet-agent.service").read_text()
    assert unit.read_text() == original.replace(OPT_BIN, f"{venv}/bin/")
    if shutil.which("systemd-analyze"):
        ok, text = verify_unit(unit)
        assert ok, text
    commands = installed.parent / "units" / "cladnet-agent-commands.service"  # not enabled
    assert f"ExecStart={venv}/bin/cladnet-agent commands " in commands.read_text()
    again = install("--wheels", str(wheelhouse), "--prefix", str(installed), "--no-systemd")
    assert again.returncode == 0 and "already installed" in again.stdout, output(again)


def test_install_and_join(installed: Path, wheelhouse: Path, controller: Controller, admin):
    """--join against a real controller (join --no-run: no WireGuard needed), labels
    from the template's comma list; a second run does not join again."""
    assert admin.post("/v1/networks", json={"name": "deploy", "cidr": "10.77.0.0/24"}).is_success
    token = admin.post("/v1/networks/deploy/tokens", json={"max_uses": 5}).json()["token"]
    state = installed.parent / "state"
    args = ["--wheels", str(wheelhouse), "--prefix", str(installed), "--no-systemd"]
    args += ["--state-dir", str(state), "--join", controller.url, "--hostname", "vm-deploy"]
    args += ["--labels", "cloud=test, region=here", "--ca-hash", ""]
    for _ in range(2):  # the token from the environment keeps it out of `ps`
        r = install(*args, network=True, CLADNET_JOIN_TOKEN=token)
        assert r.returncode == 0, output(r)
    assert "already joined network 'deploy'" in r.stdout, output(r)
    hosts = admin.get("/v1/networks/deploy/hosts").json()
    assert [(h["name"], h["labels"]) for h in hosts] == [
        ("vm-deploy", {"cloud": "test", "region": "here"})
    ]


# ---- cloud-init, scripts -----------------------------------------------------------------

PLACEHOLDERS = ("CONTROLLER_URL", "JOIN_TOKEN", "CA_HASH", "LABELS", "WHEELHOUSE_URL")


def test_cloud_init_renders() -> None:
    """envsubst as the template's header says → valid YAML whose commands parse and
    pass install-agent.sh only options it has; the token only in a 0600 file."""
    template = (DEPLOY / "cloud-init" / "agent-user-data.yaml").read_text()
    names = " ".join(f"${{{n}}}" for n in PLACEHOLDERS)
    env = {**os.environ, **{n: f"test-{n.lower()}" for n in PLACEHOLDERS}}
    r = subprocess.run(["envsubst", names], input=template, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#cloud-config\n")
    assert not re.findall(r"\$\{[A-Z_]+\}", r.stdout)  # every placeholder is listed above
    doc = yaml.safe_load(r.stdout)
    assert {"wireguard-tools", "wireguard-go", "python3-venv"} <= set(doc["packages"])
    (secret,) = [f for f in doc["write_files"] if "test-join_token" in f["content"]]
    assert secret["permissions"] == "0600"
    scripts = [c[-1] for c in doc["runcmd"]]
    assert "test-join_token" not in "".join(scripts)
    for script in scripts:
        assert run(["bash", "-n", "-c", script]).returncode == 0, script
    call = re.search(r"bash \S*/install-agent\.sh(?:.*\\\n)*.*", "".join(scripts))
    assert call, scripts
    used = set(re.findall(r"\s(--[a-z-]+)", call.group(0)))
    known = set(re.findall(r"^\s+(--[a-z-]+)\)", (DEPLOY / "install-agent.sh").read_text(), re.M))
    assert used and used <= known, used - known


def test_scripts_parse() -> None:
    for script in [*DEPLOY.glob("*.sh"), *DEPLOY.glob("*/*.sh")]:
        shell = "bash" if "bash" in script.read_text().splitlines()[0] else "sh"
        assert run([shell, "-n", str(script)]).returncode == 0, script


def test_init_dynsec_file_is_private(tmp_path: Path) -> None:
    if shutil.which("mosquitto_ctrl") is None:
        pytest.skip("mosquitto_ctrl missing (Debian: mosquitto-clients)")
    dynsec = tmp_path / "dynamic-security.json"
    r = run(
        [
            "bash",
            "-c",
            'umask 022 && exec "$0" init "$1"',
            DEPLOY / "mosquitto/init-dynsec.sh",
            str(dynsec),
        ],
        env={**os.environ, "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD},
    )
    assert r.returncode == 0, output(r)
    assert dynsec.stat().st_mode & 0o777 == 0o600


# ---- compose -----------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose"


def test_compose_validates() -> None:
    """docker-compose config (no daemon needed) with .env.example and the secrets; the
    controller and collector get only variables their code reads."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose missing (Debian: docker-compose)")
    config = ["docker-compose", "--env-file", str(COMPOSE / ".env.example"), "-f"]
    config += [str(COMPOSE / "compose.yaml"), "config"]
    # The example's secrets are empty: compose refuses rather than run without them.
    r = run(config, cwd=COMPOSE)
    assert r.returncode != 0 and "CLADNET_MQTT_ADMIN_PASSWORD" in r.stderr, output(r)
    secrets = ("CLADNET_MQTT_ADMIN_PASSWORD", "CLADNET_MQTT_PASSWORD", "CLADNET_COLLECTOR_TOKEN")
    r = run(config, cwd=COMPOSE, env={**os.environ, **{k: "s3cret" for k in secrets}})
    assert r.returncode == 0 and not r.stderr.strip(), output(r)
    services = yaml.safe_load(r.stdout)["services"]
    assert set(services) == {
        "etcd",
        "mosquitto",
        "mosquitto-init",
        "victoria-metrics",
        "controller",
        "collector",
    }
    assert services["collector"]["environment"]["CLADNET_STORE"] == (
        "victoria:http://victoria-metrics:8428"
    )
    for name in ("controller", "collector"):
        code = "".join(p.read_text() for p in sorted((REPO / name).glob("**/*.py")))
        for key in services[name]["environment"]:
            assert f'"{key}"' in code, f"{name} does not read {key}"


def test_compose_broker_scripts(tmp_path: Path) -> None:
    """The compose broker under busybox sh (as in the Alpine image): mosquitto-start.sh
    runs cladnet.conf with dynsec made on first start; mosquitto-init.sh (twice: it is
    idempotent) lets the collector subscribe to its shared subscription."""
    busybox = shutil.which("busybox")
    plugins = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
    if busybox is None or not plugins or shutil.which("mosquitto") is None:
        pytest.skip("busybox or mosquitto missing (Debian: busybox, mosquitto)")
    port = free_port()
    env = {
        **os.environ,
        "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
        "CLADNET_MQTT_PASSWORD": MQTT_COLLECTOR_PASSWORD,
        "CLADNET_MOSQUITTO_CONF": str(DEPLOY / "mosquitto" / "cladnet.conf"),
        "MOSQUITTO_DATA": str(tmp_path / "data"),
        "MOSQUITTO_CONF_OUT": str(tmp_path / "mosquitto.conf"),
        "MOSQUITTO_DYNSEC_PLUGIN": str(plugins[0]),
        "MOSQUITTO_LISTENER": f"{port} 127.0.0.1",
        "MOSQUITTO_USER": "root",  # the mosquitto user could not write tmp_path
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(port),
    }
    sh = [busybox, "sh"]
    log = (tmp_path / "mosquitto.log").open("w")
    broker = subprocess.Popen(
        [*sh, str(COMPOSE / "mosquitto-start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        import socket

        def up() -> bool:
            assert broker.poll() is None, (tmp_path / "mosquitto.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, what="mosquitto-start.sh")
        assert (tmp_path / "data" / "dynamic-security.json").stat().st_mode & 0o077 == 0
        for _ in range(2):
            r = run([*sh, str(COMPOSE / "mosquitto-init.sh")], env=env, timeout=60)
            assert r.returncode == 0 and "ready" in r.stdout, output(r)

        def subscribe(topic: str) -> subprocess.CompletedProcess[str]:
            return run(
                [
                    "mosquitto_sub",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-V",
                    "5",
                    "-E",
                    "-u",
                    "cladnet-collector",
                    "-P",
                    MQTT_COLLECTOR_PASSWORD,
                    "-t",
                    topic,
                ],
                timeout=20,
            )

        ok = subscribe("$share/collectors/cladnet/metrics/#")
        assert ok.returncode == 0 and "denied" not in ok.stderr, output(ok)
        assert "denied" in subscribe("other/#").stderr
    finally:
        _stop(broker)


# ---- etcd cluster example ---------------------------------------------------------------


def test_etcd_example_names_real_flags() -> None:
    text = (DEPLOY / "etcd" / "cluster-3.env.example").read_text()
    env = dict(x.split("=", 1) for x in text.splitlines() if x and not x.startswith("#"))
    members = dict(m.split("=", 1) for m in env["ETCD_INITIAL_CLUSTER"].split(","))
    assert (
        len(members) == 3 and members[env["ETCD_NAME"]] == env["ETCD_INITIAL_ADVERTISE_PEER_URLS"]
    )
    if shutil.which("etcd") is None:
        pytest.skip("etcd missing (Debian: etcd-server)")
    r = run(["etcd", "--help"])
    flags = set(re.findall(r"^\s+--([a-z0-9-]+)", r.stdout + r.stderr, re.M))
    for key in env:
        assert key[5:].lower().replace("_", "-") in flags, f"{key}: etcd has no such flag"


# ---- Grafana dashboard -------------------------------------------------------------------

DASHBOARD = json.loads((DEPLOY / "grafana" / "cladnet-dashboard.json").read_text())
EXPRS = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
VARIABLES = [v["query"]["query"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]


def agent_batches(tmp_path: Path, now: float) -> list:
    """Batches built by the agent's own code (MetricsReporter.build + peer_samples) for
    two hosts that see each other, 15 s apart, decoded as the collector does."""
    from agent.metrics.overlay import peer_samples
    from agent.metrics.reporter import MetricsReporter
    from cladnet import metrics
    from cladnet.mesh import DeviceState, PeerState

    batches = []

    async def device() -> DeviceState:
        raise AssertionError("build() does not read the device")

    for me, other, key in (("vm1", "vm2", "key-2"), ("vm2", "vm1", "key-1")):
        peers = {f"h-{other}": {"public_key": key, "name": other, "overlay_ip": "10.9.0.2"}}
        reporter = MetricsReporter(
            network="deploy",
            host=me,
            host_id=f"h-{me}",
            overlay_ip="10.9.0.1",
            spool_dir=tmp_path / f"spool-{me}",
            interval=2.0,
            device=device,
            peers=lambda peers=peers: peers,
        )
        reporter.rtt = {other: 0.42}
        for ts in (now - 30, now - 15):
            batch = reporter.build(ts)
            peer = PeerState(
                public_key=key,
                allowed_ips=("10.9.0.2/32",),
                endpoint=None,
                keepalive=25,
                last_handshake=ts - 40,
                rx_bytes=1000,
                tx_bytes=2000,
            )
            peer_samples(batch, DeviceState(listen_port=51820, peers={key: peer}), peers, ts)
            batches.append(metrics.decode(batch.encode(), metrics.topic("deploy", me)))
    return batches


def test_dashboard_uses_what_agents_send(tmp_path: Path) -> None:
    sent = {name for b in agent_batches(tmp_path, time.time()) for name, _, _ in b.samples}
    used = {n for q in EXPRS + VARIABLES for n in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{", q)}
    used |= {m for q in VARIABLES for m in re.findall(r"label_values\((\w+),", q)}
    assert len(EXPRS) >= 10 and used, EXPRS
    assert used <= sent, f"not sent by agents: {used - sent}"
    for expr in EXPRS:  # every panel follows the dashboard's network and host choice
        assert 'network=~"$network", host=~"$host"' in expr, expr


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[Victoria]:
    if shutil.which("victoria-metrics") is None:
        pytest.skip("victoria-metrics missing (Debian: victoria-metrics)")
    vm = Victoria(data_dir=tmp_path / "vm", port=free_port())
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()


def test_dashboard_queries_return_data(victoria: Victoria, tmp_path: Path) -> None:
    """Every panel query and variable, on a real VictoriaMetrics holding what the
    collector's store wrote from agent batches, returns data."""
    from collector.store.victoria import VictoriaStore

    now = time.time()

    async def store() -> None:
        vm = VictoriaStore(victoria.url)
        try:
            for batch in agent_batches(tmp_path, now):
                await vm.write(batch.flat())
            await vm.flush()
        finally:
            await vm.close()

    asyncio.run(store())
    fill = {"$network": "deploy", "$host": ".*", "$__rate_interval": "1m"}
    with httpx.Client(base_url=victoria.url, timeout=10) as http:
        for expr in EXPRS:
            for k, v in fill.items():
                expr = expr.replace(k, v)
            r = http.get("/api/v1/query", params={"query": expr, "time": now, "nocache": "1"})
            assert r.status_code == 200 and r.json()["data"]["result"], (expr, r.text)
        for query in VARIABLES:
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, query
            match = m.group(1).replace("$network", "deploy")
            params = {"match[]": match, "start": now - 3600, "end": now}
            r = http.get(f"/api/v1/label/{m.group(2)}/values", params=params)
            want = {"deploy"} if m.group(2) == "network" else {"vm1", "vm2"}
            assert r.status_code == 200 and set(r.json()["data"]) == want, (query, r.text)
