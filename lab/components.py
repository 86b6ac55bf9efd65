"""Real components for tests and benchmarks: etcd and controllers on random loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
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


@dataclass(frozen=True)
class Pki:
    """A test CA with an etcd/broker server pair (127.0.0.1, localhost) and a client pair."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path, client_name: str = "cladnet-controller") -> Pki:
        from controller import tls

        ca = tls.new_ca("CLADNet test CA")
        server = tls.issue(ca, ["127.0.0.1", "localhost"], directory, "server")
        client = tls.issue(ca, [client_name], directory, "client", client=True)
        return cls(server.ca, server.cert, server.key, client.cert, client.key)


@dataclass
class Etcd:
    url: str
    data_dir: Path
    client_port: int
    peer_port: int
    proc: subprocess.Popen | None = None
    log: Path = field(default_factory=Path)
    # Serve clients over TLS with these certificates; with client_cert_auth, only
    # clients with a certificate from pki.ca get in (etcd --client-cert-auth).
    pki: Pki | None = None
    client_cert_auth: bool = False

    @classmethod
    def serving(cls, data_dir: Path, host: str = "127.0.0.1") -> Etcd:
        """A plain-HTTP etcd on ``host`` with free client and peer ports (not started)."""
        port = free_port()
        return cls(f"http://{host}:{port}", data_dir, port, free_port())

    def start(self) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is missing (Debian etcd-server): run deploy/setup.sh")
        self.log = self.data_dir.with_suffix(".log")
        tls: list[str] = []
        if self.pki is not None:
            assert self.url.startswith("https://"), "a TLS etcd needs an https:// url"
            tls = [
                "--cert-file",
                str(self.pki.server_cert),
                "--key-file",
                str(self.pki.server_key),
                "--trusted-ca-file",
                str(self.pki.ca),
            ]
            if self.client_cert_auth:
                tls.append("--client-cert-auth")
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
                *tls,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_until(self.healthy, what="etcd to be healthy")

    def _tls_kw(self) -> dict:
        if self.pki is None:
            return {}
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return {"verify": ctx}

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited: {self.log.read_text()[-2000:]}")
        try:
            r = httpx.get(f"{self.url}/health", timeout=1, **self._tls_kw())
            return r.json().get("health") == "true"
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
        tls: list[str] = []
        if self.pki is not None:
            tls = [
                f"--cacert={self.pki.ca}",
                f"--cert={self.pki.client_cert}",
                f"--key={self.pki.client_key}",
            ]
        out = subprocess.run(
            ["etcdctl", "--endpoints", self.url, *tls, *args],
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
    def tls(self) -> bool:
        return self.extra_env.get("CLADNET_TLS") == "1"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self, wait: bool = True) -> None:
        """Start the process; with ``wait``, until /readyz says ready (etcd reachable)."""
        env = {**os.environ, **self.extra_env, "CLADNET_ETCD": self.etcd_url}
        env.pop("CLADNET_ADMIN_TOKEN", None)
        if self.admin_token:
            env["CLADNET_ADMIN_TOKEN"] = self.admin_token
        self.log = self.state_dir.with_suffix(f".{self.port}.log")
        # Off loopback the controller serves TLS by default; tests of other things on
        # a bridge keep plain HTTP unless they ask for TLS (test_tls.py, the demo do).
        insecure = [] if self.tls or self.host == "127.0.0.1" else ["--insecure-http"]
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
                *insecure,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        if wait:
            wait_until(self.ready, what=f"controller on port {self.port}")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"controller exited: {self.log.read_text()[-2000:]}")
        try:
            # Readiness only; the tests of trust itself verify properly.
            r = httpx.get(f"{self.url}/readyz", timeout=1, verify=False)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)
            self.proc = None

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "tls" / "ca.crt"

    def client(self, token: str | None = ADMIN_TOKEN, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.tls:
            kw.setdefault("verify", ssl.create_default_context(cafile=str(self.ca_file)))
        return httpx.Client(base_url=self.url, headers=headers, timeout=10, **kw)

    def aclient(self, token: str | None = ADMIN_TOKEN, **kw) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, **kw)


MQTT_ADMIN_PASSWORD = "test-mqtt-admin-pw"
MQTT_COLLECTOR_PASSWORD = "test-mqtt-collector-pw"


@dataclass
class Mosquitto:
    """A real Mosquitto with the dynamic-security plugin, set up by deploy/mosquitto."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    log: Path = field(default_factory=Path)
    # A second listener on tls_port with (cert, key, ca) PEM files; same users.
    tls_port: int | None = None
    tls_files: tuple[Path, Path, Path] | None = None
    persistence: bool = True  # False: a restart forgets every session and queued batch

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CLADNET_MQTT_ADMIN_PASSWORD": MQTT_ADMIN_PASSWORD,
            "CLADNET_MQTT_PASSWORD": MQTT_COLLECTOR_PASSWORD,
        }

    def start(self) -> None:
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is missing (Debian mosquitto): run deploy/setup.sh")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        dynsec = self.data_dir / "dynamic-security.json"
        script = str(REPO / "deploy" / "mosquitto" / "init-dynsec.sh")
        if not dynsec.exists():
            subprocess.run([script, "init", str(dynsec)], env=self.env, check=True, timeout=20)
        # The deploy config, with this test's port and file; `user` keeps the broker
        # from dropping to the mosquitto user, which could not write our temp dir.
        conf = (REPO / "deploy" / "mosquitto" / "cladnet.conf").read_text()
        conf = conf.replace("listener 1883", f"listener {self.port} {self.host}")
        conf = conf.replace("/var/lib/mosquitto/dynamic-security.json", str(dynsec))
        conf = conf.replace("/var/lib/mosquitto/", f"{self.data_dir}/")
        if self.tls_port is not None and self.tls_files is not None:
            cert, key, ca = self.tls_files
            conf += (
                f"\nlistener {self.tls_port} {self.host}\n"
                f"certfile {cert}\nkeyfile {key}\ncafile {ca}\n"
            )
        if not self.persistence:
            conf = conf.replace("persistence true", "persistence false")
        conf_path = self.data_dir / "mosquitto.conf"
        conf_path.write_text(f"user {os.environ.get('USER', 'root')}\n{conf}")
        self.log = self.data_dir / "mosquitto.log"
        first = self.proc is None and not (self.data_dir / ".collector").exists()
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_until(self.listening, what="mosquitto to listen")
        if first:
            subprocess.run(
                [script, "collector", self.host, str(self.port)],
                env=self.env,
                check=True,
                timeout=20,
                capture_output=True,
            )
            (self.data_dir / ".collector").touch()

    def listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex((self.host, self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL by PID: no clean shutdown, no final persistence save."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


@dataclass
class Collector:
    """``cladnet-collector`` as a process."""

    mqtt: Mosquitto
    state_dir: Path
    port: int
    token: str = ADMIN_TOKEN
    store: str = "sqlite"
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "CLADNET_COLLECTOR_TOKEN": self.token,
            "CLADNET_MQTT_PASSWORD": MQTT_COLLECTOR_PASSWORD,
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.state_dir.with_suffix(f".{self.port}.log")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "collector.main",
                "--mqtt-url",
                self.mqtt.url,
                "--mqtt-user",
                "cladnet-collector",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--state-dir",
                str(self.state_dir),
                "--store",
                self.store,
                *self.extra_args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_until(self.ready, what=f"collector on port {self.port}")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"collector exited: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)
            self.proc = None

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


@dataclass
class EtcdCluster:
    """Several etcd members on loopback forming one cluster (for fault tests)."""

    base_dir: Path
    size: int = 3
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, tuple[int, int]] = field(default_factory=dict)  # name → (client, peer)

    def __post_init__(self) -> None:
        for i in range(self.size):
            self.ports[f"cl-m{i}"] = (free_port(), free_port())

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{c}" for c, _ in self.ports.values()]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def start(self) -> None:
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, (_, p) in self.ports.items())
        for name in self.ports:
            self.start_member(name, initial)
        wait_until(lambda: all(self.healthy(n) for n in self.ports), 30, what="etcd cluster")

    def start_member(self, name: str, initial: str | None = None) -> None:
        client, peer = self.ports[name]
        initial = initial or ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, (_, p) in self.ports.items()
        )
        data = self.base_dir / name
        log = self.base_dir / f"{name}.log"
        self.procs[name] = subprocess.Popen(
            [
                "etcd",
                "--name",
                name,
                "--data-dir",
                str(data),
                "--listen-client-urls",
                f"http://127.0.0.1:{client}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{client}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                f"cl-{self.base_dir.name}",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                "--log-level",
                "warn",
                "--logger",
                "zap",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
        )

    def healthy(self, name: str) -> bool:
        client, _ = self.ports[name]
        try:
            r = httpx.get(f"http://127.0.0.1:{client}/health", timeout=1)
            return r.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def leader(self) -> str:
        """The name of the current leader."""
        for name, (client, _) in self.ports.items():
            if name not in self.procs or self.procs[name].poll() is not None:
                continue
            out = subprocess.run(
                [
                    "etcdctl",
                    "--endpoints",
                    f"http://127.0.0.1:{client}",
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                ],
                env={**os.environ, "ETCDCTL_API": "3"},
                capture_output=True,
                text=True,
                timeout=10,
            )
            if out.returncode == 0:
                status = json.loads(out.stdout)[0]["Status"]
                if status["header"]["member_id"] == status["leader"]:
                    return name
        raise RuntimeError("no leader found")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            _stop(proc)
        self.procs.clear()


@dataclass
class Victoria:
    """A real VictoriaMetrics (Debian ``victoria-metrics``) on a random loopback port."""

    data_dir: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if shutil.which("victoria-metrics") is None:
            raise RuntimeError("victoria-metrics is missing (Debian package): run deploy/setup.sh")
        self.proc = subprocess.Popen(
            [
                "victoria-metrics",
                f"-httpListenAddr=127.0.0.1:{self.port}",
                f"-storageDataPath={self.data_dir}",
                "-retentionPeriod=1d",
                "-search.latencyOffset=0s",  # tests query what they just wrote
                "-dedup.minScrapeInterval=1ms",  # a re-delivered sample is stored once
                "-loggerLevel=ERROR",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.data_dir.parent / "victoria.log").open("ab"),
        )
        wait_until(self.healthy, 20, what="VictoriaMetrics")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
