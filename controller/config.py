"""Controller settings from command-line flags and ``CLADNET_*`` environment variables."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Settings:
    etcd: str = "http://127.0.0.1:2379"
    etcd_user: str | None = None  # etcd authentication; the password never from a flag
    etcd_password: str | None = None
    # etcd over TLS: the CA of etcd's certificate; a client pair for mutual TLS.
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    listen: str = "127.0.0.1:8470"
    state_dir: Path = Path("/var/lib/cladnet-controller")
    admin_token: str | None = None
    watch_keepalive: float = 15.0
    log_level: str = "info"
    # Metrics broker: the URL agents publish to, and how the controller administers
    # per-host users on it (Mosquitto dynamic security). No URL: no metrics.
    mqtt_url: str | None = None
    mqtt_admin_url: str | None = None
    mqtt_admin_user: str = "admin"
    mqtt_admin_password: str | None = None
    mqtt_ca: Path | None = None  # CA of an mqtts:// broker (default: the cluster CA)
    collector_url: str | None = None  # for the dashboard's charts and alarms
    collector_token: str | None = None  # the controller's token for it (env only)
    # Per client address. Generous for joins (a fleet behind one NAT joins at once),
    # strict for failed authentications (token guessing).
    # TLS (on unless listening on loopback only, or --insecure-http): a serving cert
    # from the cluster CA in etcd, in <state_dir>/tls (names: --tls-name), or given files.
    tls: bool = False
    tls_names: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    issue_cert: Path | None = None  # issue a certificate for --tls-name into it, and exit
    leader_ttl: int = 10  # seconds for another replica to take over background jobs
    janitor_interval: float = 60.0
    join_rate: float = 100.0
    join_burst: float = 1000.0
    auth_failure_rate: float = 1.0
    auth_failure_burst: float = 100.0
    rate_limit_sources: int = 10_000  # addresses each limiter remembers (~230 bytes each)
    # Request bodies: a status report of 10,000 peers is ~1.3 MB; a join is < 8 KiB.
    max_body_bytes: int = 2 * 1024 * 1024
    max_join_body: int = 64 * 1024
    # Provisioning: driver name → its options (from a JSON file), and the URL new VMs
    # join at (default: this controller's own listen address).
    drivers: dict[str, dict[str, Any]] = field(default_factory=dict)
    advertise_url: str | None = None
    driver_timeout: float = 300.0

    @property
    def controller_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return self.advertise_url or f"{scheme}://{self.listen}"

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def parse_args(argv: list[str] | None = None) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ
    defaults = Settings()
    p = argparse.ArgumentParser(prog="cladnet-controller", description="CLADNet controller")
    p.add_argument(
        "--etcd",
        default=env.get("CLADNET_ETCD", defaults.etcd),
        help="etcd endpoints, comma separated (env CLADNET_ETCD)",
    )
    p.add_argument(
        "--etcd-user",
        default=env.get("CLADNET_ETCD_USER"),
        help="etcd user (env CLADNET_ETCD_USER); password from env CLADNET_ETCD_PASSWORD "
        "or --etcd-password-file",
    )
    p.add_argument("--etcd-password-file", type=Path, help="file holding the etcd password")
    p.add_argument(
        "--etcd-ca",
        type=Path,
        default=_env_path("CLADNET_ETCD_CA"),
        help="CA (PEM) of etcd's certificate: talk to etcd over TLS (env CLADNET_ETCD_CA)",
    )
    p.add_argument(
        "--etcd-cert",
        type=Path,
        default=_env_path("CLADNET_ETCD_CERT"),
        help="client certificate (PEM) for etcd's --client-cert-auth (env CLADNET_ETCD_CERT)",
    )
    p.add_argument(
        "--etcd-key",
        type=Path,
        default=_env_path("CLADNET_ETCD_KEY"),
        help="its private key (PEM) (env CLADNET_ETCD_KEY)",
    )
    p.add_argument(
        "--listen",
        default=env.get("CLADNET_LISTEN", defaults.listen),
        help="HOST:PORT to serve the API on (env CLADNET_LISTEN)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(env.get("CLADNET_STATE_DIR", str(defaults.state_dir))),
        help="where the generated admin token is written (env CLADNET_STATE_DIR)",
    )
    p.add_argument(
        "--watch-keepalive",
        type=float,
        default=float(env.get("CLADNET_WATCH_KEEPALIVE", defaults.watch_keepalive)),
        help="seconds between keep-alive lines on idle watch streams",
    )
    p.add_argument("--log-level", default=env.get("CLADNET_LOG_LEVEL", defaults.log_level))
    p.add_argument(
        "--mqtt-url",
        "--mqtt",
        default=env.get("CLADNET_MQTT_URL"),
        help="broker URL agents publish metrics to, mqtt://host:port (env CLADNET_MQTT_URL)",
    )
    p.add_argument(
        "--mqtt-admin-url",
        default=env.get("CLADNET_MQTT_ADMIN_URL"),
        help="broker URL for the controller's dynsec admin (default: --mqtt-url)",
    )
    p.add_argument(
        "--mqtt-admin-user",
        default=env.get("CLADNET_MQTT_ADMIN_USER", defaults.mqtt_admin_user),
        help="dynsec admin user; its password comes from CLADNET_MQTT_ADMIN_PASSWORD",
    )
    p.add_argument(
        "--mqtt-ca",
        type=Path,
        default=_env_path("CLADNET_MQTT_CA"),
        help="CA (PEM) of an mqtts:// broker's certificate (default: the cluster CA) "
        "(env CLADNET_MQTT_CA)",
    )
    p.add_argument(
        "--collector-url",
        default=env.get("CLADNET_COLLECTOR_URL"),
        help="the collector's API, proxied for the dashboard under /v1/monitoring; its "
        "token from env CLADNET_COLLECTOR_TOKEN (env CLADNET_COLLECTOR_URL)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        default=env.get("CLADNET_TLS", "") in ("1", "true", "yes"),
        help="serve HTTPS also on loopback (off loopback it is the default) (env CLADNET_TLS=1)",
    )
    p.add_argument(
        "--insecure-http",
        action="store_true",
        default=env.get("CLADNET_INSECURE_HTTP", "") in ("1", "true", "yes"),
        help="serve plain HTTP on a non-loopback address: tokens and credentials travel "
        "in the clear (env CLADNET_INSECURE_HTTP=1)",
    )
    p.add_argument(
        "--tls-name",
        action="append",
        default=[n for n in env.get("CLADNET_TLS_NAMES", "").split(",") if n],
        help="DNS name or IP for the serving certificate (repeatable; default: the "
        "advertised and listen hosts)",
    )
    p.add_argument("--tls-cert", type=Path, help="serving certificate chain (PEM) to use instead")
    p.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="the CA that signed it (PEM), for agents to pin")
    p.add_argument(
        "--issue-cert",
        type=Path,
        metavar="DIR",
        help="issue a certificate for the --tls-name names from the cluster CA into DIR "
        "(server.crt, server.key, ca.crt), e.g. for an mqtts:// broker, and exit",
    )
    p.add_argument(
        "--drivers",
        type=Path,
        default=env.get("CLADNET_DRIVERS"),
        help='JSON file {"<driver>": {options}} of the provisioning drivers (env CLADNET_DRIVERS)',
    )
    p.add_argument(
        "--advertise-url",
        default=env.get("CLADNET_ADVERTISE_URL"),
        help="the URL VMs created by groups join at (default: http(s)://--listen)",
    )
    a = p.parse_args(argv)
    drivers: dict[str, dict[str, Any]] = {}
    if a.drivers:
        try:
            drivers = json.loads(a.drivers.read_text())
        except (OSError, ValueError) as e:
            p.error(f"--drivers {a.drivers}: {e}")
        if not isinstance(drivers, dict) or not all(isinstance(v, dict) for v in drivers.values()):
            p.error(f"--drivers {a.drivers}: expected an object of driver name → options")
    given = [a.tls_cert, a.tls_key, a.tls_ca]
    if any(given) and not all(given):
        p.error("--tls-cert, --tls-key and --tls-ca go together")
    if a.insecure_http and (a.tls or any(given)):
        p.error("--insecure-http contradicts --tls / --tls-cert")
    if a.issue_cert and not a.tls_name:
        p.error("--issue-cert needs at least one --tls-name")
    if bool(a.etcd_cert) != bool(a.etcd_key):
        p.error("--etcd-cert and --etcd-key go together")
    if a.etcd_cert and not a.etcd_ca:
        p.error("--etcd-cert needs --etcd-ca (the CA of etcd's certificate)")
    etcd_password = env.get("CLADNET_ETCD_PASSWORD") or None
    if a.etcd_password_file:
        try:  # one line; a trailing newline is not part of the password
            etcd_password = a.etcd_password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            p.error(f"--etcd-password-file: {exc}")
    if bool(a.etcd_user) != bool(etcd_password):
        p.error("an etcd user needs a password and a password a user")
    if ":" not in a.listen:
        p.error(f"--listen must be HOST:PORT, got {a.listen!r}")
    listen_host = a.listen.rsplit(":", 1)[0].strip("[]")
    tls = a.tls or all(given) or not (a.insecure_http or is_loopback(listen_host))
    return Settings(
        etcd=a.etcd,
        etcd_user=a.etcd_user or None,
        etcd_password=etcd_password,
        etcd_ca=a.etcd_ca,
        etcd_cert=a.etcd_cert,
        etcd_key=a.etcd_key,
        listen=a.listen,
        state_dir=a.state_dir,
        admin_token=env.get("CLADNET_ADMIN_TOKEN") or None,
        watch_keepalive=a.watch_keepalive,
        log_level=a.log_level,
        mqtt_url=a.mqtt_url,
        mqtt_admin_url=a.mqtt_admin_url or a.mqtt_url,
        mqtt_admin_user=a.mqtt_admin_user,
        mqtt_admin_password=env.get("CLADNET_MQTT_ADMIN_PASSWORD") or None,
        mqtt_ca=a.mqtt_ca,
        collector_url=a.collector_url,
        collector_token=env.get("CLADNET_COLLECTOR_TOKEN") or None,
        tls=tls,
        tls_names=tuple(a.tls_name),
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_ca=a.tls_ca,
        issue_cert=a.issue_cert,
        leader_ttl=int(env.get("CLADNET_LEADER_TTL", defaults.leader_ttl)),
        janitor_interval=float(env.get("CLADNET_JANITOR_INTERVAL", defaults.janitor_interval)),
        join_rate=float(env.get("CLADNET_JOIN_RATE", defaults.join_rate)),
        join_burst=float(env.get("CLADNET_JOIN_BURST", defaults.join_burst)),
        auth_failure_rate=float(env.get("CLADNET_AUTH_FAILURE_RATE", defaults.auth_failure_rate)),
        auth_failure_burst=float(
            env.get("CLADNET_AUTH_FAILURE_BURST", defaults.auth_failure_burst)
        ),
        rate_limit_sources=int(env.get("CLADNET_RATE_LIMIT_SOURCES", defaults.rate_limit_sources)),
        max_body_bytes=int(env.get("CLADNET_MAX_BODY_BYTES", defaults.max_body_bytes)),
        max_join_body=int(env.get("CLADNET_MAX_JOIN_BODY_BYTES", defaults.max_join_body)),
        drivers=drivers,
        advertise_url=a.advertise_url,
        driver_timeout=float(env.get("CLADNET_DRIVER_TIMEOUT", defaults.driver_timeout)),
    )
