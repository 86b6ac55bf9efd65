"""Real components for tests and benchmarks: etcd and controllers on random loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class Etcd:
    url: str
    data_dir: Path
    client_port: int
    peer_port: int
    proc: subprocess.Popen | None = None
    log: Path = field(default_factory=Path)

    def start(self) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is missing (Debian etcd-server): run deploy/setup.sh")
        self.log = self.data_dir.with_suffix(".log")
        self.proc = subprocess.Popen(
            [
                binary,
                "--name",
                "cl-test",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster",
                f"cl-test=http://127.0.0.1:{self.peer_port}",
                "--log-level",
                "warn",
                "--logger",
                "zap",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_until(self.healthy, what="etcd to be healthy")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def ctl(self, *args: str) -> str:
        """Run etcdctl against this etcd (v3 API)."""
        out = subprocess.run(
            ["etcdctl", "--endpoints", self.url, *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout


@dataclass
class Controller:
    etcd_url: str
    state_dir: Path
    port: int
    admin_token: str | None = ADMIN_TOKEN
    host: str = "127.0.0.1"
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        env = {**os.environ, **self.extra_env, "CLADNET_ETCD": self.etcd_url}
        env.pop("CLADNET_ADMIN_TOKEN", None)
        if self.admin_token:
            env["CLADNET_ADMIN_TOKEN"] = self.admin_token
        self.log = self.state_dir.with_suffix(f".{self.port}.log")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller.main",
                "--listen",
                f"{self.host}:{self.port}",
                "--state-dir",
                str(self.state_dir),
                "--watch-keepalive",
                env.get("CLADNET_WATCH_KEEPALIVE", "1"),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_until(self.ready, what=f"controller on port {self.port}")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"controller exited: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)
            self.proc = None

    def client(self, token: str | None = ADMIN_TOKEN, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10, **kw)

    def aclient(self, token: str | None = ADMIN_TOKEN, **kw) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kw)
