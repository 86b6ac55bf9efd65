"""The controller on an etcd with authentication enabled (a real etcd, a real controller).

etcd gets a ``root`` user and a ``cladnet`` user whose role may touch ``/cladnet/``
only (the least privilege deploy/etcd/cluster-3.env.example sets up), then
``auth enable``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cladnet.keys import generate_keypair
from controller.config import parse_args
from lab.components import Controller, _stop, free_port, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None or shutil.which("etcdctl") is None,
    reason="etcd missing (Debian: etcd-server, etcd-client)",
)

ROOT_PASSWORD = "root-test-pw"
PASSWORD = "cladnet-test-pw"


class AuthEtcd:
    """One etcd member with users, a role for /cladnet/ and auth enabled."""

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{free_port()}"
        self.log = base / "etcd.log"
        self.proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                "cl-auth",
                "--data-dir",
                str(base / "etcd"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"cl-auth={peer}",
                "--log-level",
                "warn",
                "--logger",
                "zap",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )

    def ctl(self, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """etcdctl against this member, as ``user`` ("name:password") or anonymously."""
        login = [f"--user={user}"] if user else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
        return subprocess.run(
            ["etcdctl", f"--endpoints={self.url}", *login, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, "ETCDCTL_API": "3"},
        )

    def enable_auth(self) -> None:
        wait_until(lambda: self.ctl("endpoint", "health").returncode == 0, 20, what="etcd")
        for step in (
            ["user", "add", "root", f"--new-user-password={ROOT_PASSWORD}"],
            ["user", "grant-role", "root", "root"],
            ["role", "add", "cladnet"],
            ["role", "grant-permission", "cladnet", "--prefix=true", "readwrite", "/cladnet/"],
            ["user", "add", "cladnet", f"--new-user-password={PASSWORD}"],
            ["user", "grant-role", "cladnet", "cladnet"],
            ["auth", "enable"],
        ):
            r = self.ctl(*step)
            assert r.returncode == 0, (step, r.stdout, r.stderr)


@pytest.fixture
def etcd_auth(tmp_path: Path) -> Iterator[AuthEtcd]:
    server = AuthEtcd(tmp_path)
    try:
        server.enable_auth()
        yield server
    finally:
        _stop(server.proc)


def controller(etcd: AuthEtcd, tmp_path: Path, password: str) -> Controller:
    return Controller(
        etcd_url=etcd.url,
        state_dir=tmp_path / "controller",
        port=free_port(),
        extra_env={
            "CLADNET_ETCD_USER": "cladnet",
            "CLADNET_ETCD_PASSWORD": password,
        },
    )


def test_controller_logs_in(etcd_auth: AuthEtcd, tmp_path: Path) -> None:
    """With the credentials everything works, also after the auth token expired; an
    etcd client without them is refused."""
    c = controller(etcd_auth, tmp_path, PASSWORD)
    c.start()
    try:
        with c.client() as admin:
            r = admin.post("/v1/networks", json={"name": "auth", "cidr": "10.81.0.0/24"})
            assert r.status_code == 201, r.text
            token = admin.post("/v1/networks/auth/tokens", json={"max_uses": 2}).json()["token"]
            join = {
                "token": token,
                "hostname": "vm1",
                "public_key": generate_keypair()[1],
                "listen_port": 51820,
                "addresses": ["192.0.2.10/24"],
            }
            assert httpx.post(f"{c.url}/v1/join", json=join).status_code == 200
            # Turning auth off and on drops every token etcd handed out, as their TTL
            # does (--auth-token-ttl, 300 s idle by default): the controller logs in again.
            for step in ("disable", "enable"):
                r = etcd_auth.ctl("auth", step, user=f"root:{ROOT_PASSWORD}")
                assert r.returncode == 0, r.stderr
            r = admin.post("/v1/networks", json={"name": "later", "cidr": "10.82.0.0/24"})
            assert r.status_code == 201, r.text
            names = {n["name"] for n in admin.get("/v1/networks").json()}
            assert names == {"auth", "later"}
            assert admin.get("/readyz").status_code == 200
    finally:
        c.stop()
    assert "logging in again" in c.log.read_text()
    anonymous = etcd_auth.ctl("get", "/cladnet/", "--prefix", "--keys-only")
    assert anonymous.returncode != 0 and "user name is empty" in anonymous.stderr
    as_root = etcd_auth.ctl(
        "get", "/cladnet/networks/", "--prefix", "--keys-only", user=f"root:{ROOT_PASSWORD}"
    )
    assert as_root.returncode == 0 and as_root.stdout.count("/cladnet/networks/") >= 2
    assert PASSWORD not in c.log.read_text()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_login_through_grpc_proxy(etcd_auth: AuthEtcd, tmp_path: Path) -> None:
    """The documented way to a TLS cluster: a local ``etcd grpc-proxy``; the
    controller's login passes through it."""
    port = free_port()
    log = (tmp_path / "proxy.log").open("w")
    proxy = subprocess.Popen(
        [
            "etcd",
            "grpc-proxy",
            "start",
            f"--endpoints={etcd_auth.url}",
            f"--listen-addr=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    c = controller(etcd_auth, tmp_path, PASSWORD)
    c.etcd_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: listening(port), 20, what="grpc-proxy")
        c.start()
        with c.client() as admin:
            r = admin.post("/v1/networks", json={"name": "proxied", "cidr": "10.83.0.0/24"})
            assert r.status_code == 201, r.text
    finally:
        c.stop()
        _stop(proxy)


def test_wrong_password_stops_the_controller(etcd_auth: AuthEtcd, tmp_path: Path) -> None:
    c = controller(etcd_auth, tmp_path, "wrong-password")
    with pytest.raises(RuntimeError, match="controller exited"):
        c.start()
    log = c.log.read_text()
    assert "etcd refused the login of user 'cladnet'" in log, log[-2000:]
    assert "wrong-password" not in log


def test_password_only_from_env_or_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CLADNET_ETCD_PASSWORD", raising=False)
    secret = tmp_path / "etcd-password"
    secret.write_text("from-file\n")
    s = parse_args(["--etcd-user", "cladnet", "--etcd-password-file", str(secret)])
    assert (s.etcd_user, s.etcd_password) == ("cladnet", "from-file")
    monkeypatch.setenv("CLADNET_ETCD_PASSWORD", "from-env")
    assert parse_args(["--etcd-user", "cladnet"]).etcd_password == "from-env"
    with pytest.raises(SystemExit):  # no flag carries the password itself
        parse_args(["--etcd-user", "cladnet", "--etcd-password", "x"])
    monkeypatch.delenv("CLADNET_ETCD_PASSWORD")
    with pytest.raises(SystemExit):  # a user without a password is a mistake
        parse_args(["--etcd-user", "cladnet"])
