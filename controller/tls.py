"""The controller's TLS: one cluster CA kept in etcd, a serving certificate per replica.

The first replica to start creates the CA in an etcd transaction that compares
``create_revision == 0``, so replicas starting at once agree on one CA; the others
read it. Each replica then issues its own serving certificate (for its own names)
from that CA at every start. Agents and the CLI pin the CA, so they can move between
replicas without a TLS error.

Agents need no prior trust: the join token comes with the CA's public-key hash
(``sha256:<hex of the SubjectPublicKeyInfo>``, as ``kubeadm join
--discovery-token-ca-cert-hash``), the agent fetches the CA from ``/v1/ca`` over an
unverified connection once, checks it against the hash, pins it, and from then on
verifies every connection with it.

The CA's private key lives in etcd, which only the controller can read (as the
Kubernetes API server's secrets do); it is never served or written to disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aetcd import transactions as tx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cladnet.files import write_atomic
from cladnet.keys import ca_hash
from controller import keyspace
from controller.config import Settings
from controller.etcd import Etcd

log = logging.getLogger("cladnet.controller.tls")

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class TlsFiles:
    """A serving certificate chain, its key, and the CA clients are to pin."""

    cert: Path
    key: Path
    ca: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()

    @property
    def ca_hash(self) -> str:
        return ca_hash(self.ca_pem)


@dataclass(frozen=True)
class ClusterCa:
    """The cluster CA: certificate and private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def hash(self) -> str:
        return ca_hash(self.cert_pem)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # unique, in order
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_ca(common_name: str = "CLADNet cluster CA") -> ClusterCa:
    """A fresh CA (P-256, ten years) that may sign end-entity certificates only."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ClusterCa(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def issue(
    ca: ClusterCa,
    names: list[str],
    directory: Path,
    stem: str = "server",
    client: bool = False,
) -> TlsFiles:
    """A certificate for ``names`` signed by ``ca``, written to ``directory`` as
    ``<stem>.crt`` (with the CA appended), ``<stem>.key`` (0600) and ``ca.crt``.

    ``client`` adds client authentication to its uses (e.g. for an mTLS peer)."""
    names = names or ["localhost"]
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the cluster CA key is not an EC key")
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] * client)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=397))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TlsFiles(directory / f"{stem}.crt", directory / f"{stem}.key", directory / "ca.crt")
    # Atomic: a replica restarting never serves half a file.
    write_atomic(files.key, _pem_key(key))
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem
    write_atomic(files.cert, chain, mode=0o644)
    write_atomic(files.ca, ca.cert_pem, mode=0o644)
    return files


async def cluster_ca(etcd: Etcd, candidate: ClusterCa | None = None) -> ClusterCa:
    """The cluster CA from etcd; the first replica to ask stores ``candidate`` (by
    default a new CA)."""
    key = keyspace.cluster_ca()
    candidate = candidate or new_ca()
    value = json.dumps(
        {"cert": candidate.cert_pem.decode(), "key": candidate.key_pem.decode()}
    ).encode()
    succeeded, responses = await etcd.txn(
        [tx.Create(key) == 0], [tx.Put(key, value)], [tx.Get(key)]
    )
    if succeeded:
        log.info("cluster CA created", extra={"ca_hash": candidate.hash})
        return candidate
    stored: Any = json.loads(responses[0][0][0])
    ca = ClusterCa(stored["cert"].encode(), stored["key"].encode())
    log.info("cluster CA loaded", extra={"ca_hash": ca.hash})
    return ca


def _local_addresses() -> list[str]:
    import psutil  # only for a wildcard listen address

    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                found.append(a.address.split("%", 1)[0])  # no IPv6 zone
    return found


def serving_names(settings: Settings) -> list[str]:
    """The names the serving certificate is for: ``--tls-name``, else the advertised
    host and the listen host (for a wildcard: this machine's name and addresses)."""
    if settings.tls_names:
        return list(settings.tls_names)
    names = []
    if settings.advertise_url and urlsplit(settings.advertise_url).hostname:
        names.append(str(urlsplit(settings.advertise_url).hostname))
    if settings.host in WILDCARD_HOSTS:
        names += [socket.gethostname(), "localhost", *_local_addresses()]
    else:
        names.append(settings.host)
    return names


def serving_files(settings: Settings) -> TlsFiles | None:
    """The files the controller serves with: the operator's, or those ``prepare``
    issued into ``<state_dir>/tls``; None without TLS."""
    if not settings.tls:
        return None
    if settings.tls_cert and settings.tls_key and settings.tls_ca:
        return TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca)
    directory = settings.state_dir / "tls"
    return TlsFiles(directory / "server.crt", directory / "server.key", directory / "ca.crt")


def _legacy_ca(directory: Path) -> ClusterCa | None:
    """The CA an older controller made on its own disk (``ca.crt`` + ``ca.key``)."""
    cert, key = directory / "ca.crt", directory / "ca.key"
    if cert.exists() and key.exists():
        return ClusterCa(cert.read_bytes(), key.read_bytes())
    return None


async def prepare(settings: Settings, etcd: Etcd) -> TlsFiles | None:
    """Before serving: issue this replica's certificate from the cluster CA (unless
    the operator gave certificate files, or TLS is off).

    Upgrading from per-replica CAs, the first replica offers its own CA as the cluster
    CA, so agents that pinned it keep trusting the controller; the key then leaves
    the disk (it is in etcd)."""
    files = serving_files(settings)
    if files is None or settings.tls_cert:
        return files
    directory = settings.state_dir / "tls"
    legacy = _legacy_ca(directory)
    ca = await cluster_ca(etcd, legacy)
    if legacy is not None:
        if ca != legacy:
            log.warning(
                "this replica's own CA is replaced by the cluster CA",
                extra={"old": legacy.hash, "ca_hash": ca.hash},
            )
        (directory / "ca.key").unlink()
    names = serving_names(settings)
    log.info("serving certificate issued", extra={"names": names, "ca_hash": ca.hash})
    return issue(ca, names, directory)
