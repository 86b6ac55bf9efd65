"""TLS everywhere off loopback: the controller API (one cluster CA kept in etcd, a
certificate per replica), the agent's and the CLI's pinning of that CA, MQTT over TLS
with the same CA, and the controller's etcd client over (mutual) TLS."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import ssl
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import aetcd
import httpx
import pytest

from agent.metrics.publisher import Broker
from agent.metrics.reporter import MetricsReporter
from cladnet.api_client import AsyncClient, TrustError, fetch_pinned_ca
from cladnet.keys import ca_hash, generate_keypair
from controller import tls
from controller.config import parse_args
from controller.etcd import Etcd, parse_endpoints
from controller.etcd_tls import UPSTREAM_CONNECT_SHA256, EtcdTls
from lab.api import join, make_network, make_token
from lab.components import (
    ADMIN_TOKEN,
    MQTT_ADMIN_PASSWORD,
    REPO,
    Collector,
    Controller,
    Mosquitto,
    Pki,
    free_port,
    wait_until,
)
from lab.components import Etcd as EtcdServer
from tests.support import no_device, until


@pytest.fixture
def tls_controller(make_controller) -> Controller:
    return make_controller(extra_env={"CLADNET_TLS": "1"})


def _etcd_ca(etcd: EtcdServer) -> dict:
    out = etcd.ctl("get", "/cladnet/tls/ca", "--print-value-only")
    return json.loads(out)


# --- the controller API ----------------------------------------------------------------


def test_tls_is_the_default_off_loopback_and_plain_http_an_explicit_opt_out() -> None:
    assert parse_args(["--listen", "0.0.0.0:8470"]).tls
    assert parse_args(["--listen", "10.1.2.3:8470"]).tls
    assert parse_args(["--listen", "[::]:8470"]).controller_url.startswith("https://")
    assert not parse_args(["--listen", "127.0.0.1:8470"]).tls
    assert not parse_args(["--listen", "localhost:8470"]).tls
    assert parse_args(["--listen", "127.0.0.1:8470", "--tls"]).tls
    assert not parse_args(["--listen", "10.1.2.3:8470", "--insecure-http"]).tls
    with pytest.raises(SystemExit):
        parse_args(["--listen", "10.1.2.3:8470", "--insecure-http", "--tls"])
    # A wildcard listener's certificate names this machine and its addresses.
    names = tls.serving_names(parse_args(["--listen", "0.0.0.0:8470"]))
    assert "127.0.0.1" in names and "localhost" in names
    given = parse_args(["--listen", "0.0.0.0:8470", "--tls-name", "ctl.example"])
    assert tls.serving_names(given) == ["ctl.example"]


def test_the_controller_serves_https_with_a_certificate_from_the_cluster_ca(
    tls_controller: Controller, etcd: EtcdServer
) -> None:
    tls_dir = tls_controller.state_dir / "tls"
    assert (tls_dir / "server.key").stat().st_mode & 0o777 == 0o600
    # The CA's key is in etcd only: never on a replica's disk, never served.
    stored = _etcd_ca(etcd)
    assert stored["cert"].encode() == tls_controller.ca_file.read_bytes()
    assert sorted(p.name for p in tls_dir.iterdir()) == ["ca.crt", "server.crt", "server.key"]
    with tls_controller.client() as admin:  # verifies against the cluster CA
        make_network(admin, "sec", cidr="10.232.0.0/24")
        created = admin.post("/v1/networks/sec/tokens", json={}).json()
        published = admin.get("/v1/ca").json()
    assert created["ca_cert_hash"] == ca_hash(stored["cert"])
    assert published["ca_hash"] == created["ca_cert_hash"]
    assert "PRIVATE KEY" not in published["ca_pem"]
    # Without the CA, a client refuses the certificate; plain HTTP gets nothing useful.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_controller.url}/healthz")
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_controller.url.replace("https", "http") + "/healthz")


def test_an_upgraded_replica_offers_its_own_ca_as_the_cluster_ca(
    make_controller, etcd: EtcdServer, tmp_path: Path
) -> None:
    """Agents that pinned a replica's own CA (before the cluster CA) keep trusting it."""
    old = tls.new_ca("CLADNet controller CA")
    legacy = tmp_path / "controller-0" / "tls"  # make_controller's first state dir
    legacy.mkdir(parents=True)
    (legacy / "ca.crt").write_bytes(old.cert_pem)
    (legacy / "ca.key").write_bytes(old.key_pem)
    ctl = make_controller(extra_env={"CLADNET_TLS": "1"})
    assert ctl.state_dir == legacy.parent
    assert _etcd_ca(etcd)["cert"].encode() == old.cert_pem
    assert not (legacy / "ca.key").exists()  # the key now lives in etcd only
    with ctl.client() as admin:  # verified with the old CA
        assert admin.get("/v1/ca").json()["ca_hash"] == old.hash


async def test_replicas_starting_at_once_agree_on_one_ca(etcd: EtcdServer) -> None:
    clients = [Etcd(parse_endpoints(etcd.url)) for _ in range(4)]
    try:
        cas = await asyncio.gather(*(tls.cluster_ca(c) for c in clients))
    finally:
        for c in clients:
            await c.close()
    assert len({ca.cert_pem for ca in cas}) == 1
    assert len({ca.key_pem for ca in cas}) == 1


async def test_agents_pinned_to_the_cluster_ca_fail_over_between_replicas(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # Two replicas started at the same time on one etcd.
    replicas = [
        Controller(etcd.url, tmp_path / f"replica-{i}", free_port(), extra_env={"CLADNET_TLS": "1"})
        for i in range(2)
    ]
    threads = [threading.Thread(target=r.start) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        await _two_replicas(*replicas)
    finally:
        for r in replicas:
            r.stop()


async def _two_replicas(a: Controller, b: Controller) -> None:
    assert a.ca_file.read_bytes() == b.ca_file.read_bytes()
    # … each with its own serving certificate.
    leaf = [(r.state_dir / "tls" / "server.crt").read_bytes() for r in (a, b)]
    assert leaf[0] != leaf[1]
    with a.client() as admin:
        make_network(admin, "ha", cidr="10.235.0.0/24")
        created = admin.post("/v1/networks/ha/tokens", json={}).json()
    urls = f"{a.url},{b.url}"
    pem = await fetch_pinned_ca(urls, created["ca_cert_hash"])
    client = AsyncClient(urls, verify=ssl.create_default_context(cadata=pem))
    try:
        joined = await client.join(
            created["token"], hostname="vm1", public_key=generate_keypair()[1]
        )
        a.stop()
        # The next call goes to replica b, verified with the same pinned CA.
        beat = await client.heartbeat(joined["host_id"])
        assert beat is not None and client.url == b.url
        net = await client.network(joined["network"]["id"])
        assert net["name"] == "ha"
    finally:
        await client.close()
    # With a down, the CA still comes from b.
    assert await fetch_pinned_ca(urls, created["ca_cert_hash"]) == pem
    # A client that pinned another CA is refused by every replica.
    other = tls.new_ca("someone else's CA")
    stranger = AsyncClient(b.url, verify=ssl.create_default_context(cadata=other.cert_pem.decode()))
    try:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await stranger.network(joined["network"]["id"])
    finally:
        await stranger.close()


async def test_an_agent_trusts_the_controller_only_with_the_right_hash(
    tls_controller: Controller,
) -> None:
    with tls_controller.client() as admin:
        make_network(admin, "sec", cidr="10.233.0.0/24")
        created = admin.post("/v1/networks/sec/tokens", json={}).json()
    pem = await fetch_pinned_ca(tls_controller.url, created["ca_cert_hash"])
    client = AsyncClient(tls_controller.url, verify=ssl.create_default_context(cadata=pem))
    try:
        joined = await client.join(
            created["token"], hostname="vm1", public_key=generate_keypair()[1]
        )
        assert joined["overlay_ip"].startswith("10.233.0.")
    finally:
        await client.close()
    with pytest.raises(TrustError, match="does not match"):
        await fetch_pinned_ca(tls_controller.url, "sha256:" + "0" * 64)


def test_agent_join_pins_the_ca_and_refuses_a_wrong_hash(
    tls_controller: Controller, tmp_path: Path
) -> None:
    with tls_controller.client() as admin:
        make_network(admin, "sec", cidr="10.234.0.0/24")
        created = admin.post("/v1/networks/sec/tokens", json={}).json()

    def agent_join(state: Path, ca: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.main",
                "join",
                "--controller",
                tls_controller.url,
                "--ca-hash",
                ca,
                "--state-dir",
                str(state),
                "--no-run",
                "--hostname",
                "vm-cli",
            ],
            cwd=REPO,
            env={**os.environ, "CLADNET_JOIN_TOKEN": created["token"]},
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad = agent_join(tmp_path / "bad", "sha256:" + "ab" * 32)
    assert bad.returncode == 1 and "refusing to trust" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    ok = agent_join(tmp_path / "ok", created["ca_cert_hash"])
    assert ok.returncode == 0, ok.stderr
    membership = json.loads(next((tmp_path / "ok").glob("networks/*/membership.json")).read_text())
    pinned = Path(membership["ca_file"])
    assert pinned.read_bytes() == tls_controller.ca_file.read_bytes()
    assert pinned.stat().st_mode & 0o777 == 0o600


# --- the CLI ---------------------------------------------------------------------------


def _cladnet(config_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLADNET_")}
    env["XDG_CONFIG_HOME"] = str(config_home)
    return subprocess.run(
        [sys.executable, "-m", "cladnet.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_login_pins_the_ca_like_a_kubeconfig(
    tls_controller: Controller, tmp_path: Path
) -> None:
    home = tmp_path / "config"
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    with tls_controller.client() as admin:
        make_network(admin, "cli", cidr="10.236.0.0/24")
    good = ca_hash(tls_controller.ca_file.read_bytes())
    url = tls_controller.url

    # A private CA is not trusted without its hash: one line saying what to do.
    r = _cladnet(home, "login", url, "--token-file", str(token_file))
    assert r.returncode == 1 and "not trusted" in r.stderr and "--ca-hash" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0
    # A wrong hash (someone in the middle, or a typo) is refused and nothing is saved.
    r = _cladnet(
        home, "login", url, "--token-file", str(token_file), "--ca-hash", "sha256:" + "1" * 64
    )
    assert r.returncode == 1 and "refusing to trust" in r.stderr, r.stderr
    assert not (home / "cladnet" / "config.toml").exists()

    r = _cladnet(home, "login", url, "--token-file", str(token_file), "--ca-hash", good)
    assert r.returncode == 0, r.stderr
    config = (home / "cladnet" / "config.toml").read_text()
    assert "BEGIN CERTIFICATE" in config and ADMIN_TOKEN in config
    assert (home / "cladnet" / "config.toml").stat().st_mode & 0o777 == 0o600
    # Later commands verify the controller with the pinned CA.
    r = _cladnet(home, "net", "list", "--json")
    assert r.returncode == 0, r.stderr
    assert [n["name"] for n in json.loads(r.stdout)] == ["cli"]


# --- MQTT over TLS with the cluster CA --------------------------------------------------


async def test_metrics_travel_over_mqtt_tls_verified_with_the_cluster_ca(
    make_controller, etcd: EtcdServer, tmp_path: Path
) -> None:
    mqtt_port, mqtts_port = free_port(), free_port()
    # Agents publish to mqtts://; the controller administers users on loopback.
    ctl = make_controller(
        extra_env={
            "CLADNET_TLS": "1",
            "CLADNET_MQTT_URL": f"mqtts://127.0.0.1:{mqtts_port}",
            "CLADNET_MQTT_ADMIN_URL": f"mqtt://127.0.0.1:{mqtt_port}",
            "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
        }
    )
    # The broker's certificate, issued from the cluster CA by the controller's CLI.
    issued = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "controller.main",
            "--etcd",
            etcd.url,
            "--state-dir",
            str(tmp_path / "issuer"),
            "--issue-cert",
            str(tmp_path / "broker-tls"),
            "--tls-name",
            "127.0.0.1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issued.returncode == 0, issued.stderr
    files = json.loads(issued.stdout)
    assert files["ca_hash"] == ca_hash(ctl.ca_file.read_bytes())
    broker = Mosquitto(
        data_dir=tmp_path / "mosquitto",
        port=mqtt_port,
        tls_port=mqtts_port,
        tls_files=(Path(files["cert"]), Path(files["key"]), Path(files["ca"])),
    )
    broker.start()
    collector = Collector(
        broker,
        tmp_path / "collector",
        free_port(),
        extra_args=["--mqtt-url", broker.tls_url, "--mqtt-ca", str(ctl.ca_file)],
    )
    try:
        collector.start()
        with ctl.client() as admin:
            make_network(admin, "mon", cidr="10.237.0.0/24", metrics_interval=1)
            token = make_token(admin, "mon")
        body = join(ctl, token, "vm1").json()
        with ctl.client(token=body["credential"]) as host:
            creds = host.post(f"/v1/hosts/{body['host_id']}/metrics-credentials").json()
        assert creds["broker"] == broker.tls_url
        # Without the cluster CA (the system's CAs) the broker is not trusted.
        untrusted = Broker(creds["broker"], creds["username"], creds["password"])
        with pytest.raises(Exception, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            async with untrusted.client("cl-untrusted"):
                pass
        reporter = MetricsReporter(
            network="mon",
            host="vm1",
            host_id=body["host_id"],
            overlay_ip="127.0.0.1",
            spool_dir=tmp_path / "spool",
            interval=1.0,
            device=no_device,
            peers=dict,
            broker=Broker(
                creds["broker"], creds["username"], creds["password"], ca_file=str(ctl.ca_file)
            ),
            ack_topic=creds["ack_topic"],
        )
        task = asyncio.create_task(reporter.run())
        try:

            def arrived() -> bool:
                with collector.client() as c:
                    hosts = c.get("/v1/metrics/latest", params={"network": "mon"}).json()
                return "vm1" in hosts["hosts"]

            await until(arrived, 30, what="vm1's metrics over mqtts")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        collector.stop()
        broker.stop()


# --- etcd over (mutual) TLS -------------------------------------------------------------


def test_aetcd_connect_is_the_one_etcd_tls_copies() -> None:
    """controller/etcd_tls.py copies aetcd 1.0.0's Client.connect: a new aetcd must be
    read and the copy updated (then this hash and the pin in pyproject.toml)."""
    assert metadata.version("aetcd") == "1.0.0"
    source = inspect.getsource(aetcd.Client.connect)
    assert hashlib.sha256(source.encode()).hexdigest() == UPSTREAM_CONNECT_SHA256
    assert "rpc.insecure_channel(target" in source


@pytest.fixture
def mtls_etcd(tmp_path: Path):
    pki = Pki.create(tmp_path / "pki")
    port = free_port()
    server = EtcdServer(
        url=f"https://127.0.0.1:{port}",
        data_dir=tmp_path / "etcd-tls",
        client_port=port,
        peer_port=free_port(),
        pki=pki,
        client_cert_auth=True,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_the_etcd_client_speaks_mutual_tls(mtls_etcd: EtcdServer) -> None:
    pki = mtls_etcd.pki
    assert pki is not None
    endpoints = parse_endpoints(mtls_etcd.url)
    good = Etcd(endpoints, tls=EtcdTls(pki.ca, pki.client_cert, pki.client_key))
    try:
        await good.put(b"/cladnet/probe", b"1")
        assert (await good.get(b"/cladnet/probe")).value == b"1"
    finally:
        await good.close()
    # Without a client certificate etcd refuses the handshake.
    no_cert = Etcd(endpoints, timeout=2.0, tls=EtcdTls(pki.ca))
    try:
        with pytest.raises(aetcd.exceptions.ClientError):
            await no_cert.get(b"/cladnet/probe")
    finally:
        await no_cert.close()


def test_a_controller_on_mutual_tls_etcd_and_one_without_a_client_certificate(
    mtls_etcd: EtcdServer, tmp_path: Path
) -> None:
    pki = mtls_etcd.pki
    assert pki is not None
    env = {
        "CLADNET_ETCD_CA": str(pki.ca),
        "CLADNET_ETCD_CERT": str(pki.client_cert),
        "CLADNET_ETCD_KEY": str(pki.client_key),
    }
    ctl = Controller(mtls_etcd.url, tmp_path / "ctl", free_port(), extra_env=env)
    ctl.start()
    try:
        with ctl.client() as admin:
            make_network(admin, "mtls", cidr="10.238.0.0/24")
        assert "/cladnet/network-names/mtls" in mtls_etcd.ctl(
            "get", "/cladnet/", "--prefix", "--keys-only"
        )
    finally:
        ctl.stop()
    # The CA alone (no client certificate), or no TLS at all: etcd refuses the
    # controller, which serves but is not ready and writes nothing.
    for i, env in enumerate(({"CLADNET_ETCD_CA": str(pki.ca)}, {})):
        refused = Controller(mtls_etcd.url, tmp_path / f"refused-{i}", free_port(), extra_env=env)
        refused.start(wait=False)
        try:

            def answers(url: str = refused.url) -> httpx.Response | None:
                try:
                    return httpx.get(f"{url}/readyz", timeout=5)
                except httpx.TransportError:
                    return None

            ready = wait_until(answers, 60, what="the refused controller to answer")
            assert ready.status_code == 503 and ready.json()["error"] == "etcd_unavailable"
            with refused.client() as admin:
                r = admin.post("/v1/networks", json={"name": "nope", "cidr": "10.239.0.0/24"})
            assert r.status_code == 503, r.text
        finally:
            refused.stop()
    keys = mtls_etcd.ctl("get", "/cladnet/", "--prefix", "--keys-only")
    assert "nope" not in keys
