"""TLS for the controller API and the agent's trust on first contact via the CA hash."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agent.controller_client import ControllerClient, TrustError, fetch_pinned_ca
from cladnet.keys import ca_hash, generate_keypair
from tests.components import REPO, Controller
from tests.test_controller_api import make_network


@pytest.fixture
def tls_controller(make_controller) -> Controller:
    return make_controller(extra_env={"CLADNET_TLS": "1"})


def test_the_controller_makes_a_ca_and_serves_https(tls_controller: Controller) -> None:
    tls_dir = tls_controller.state_dir / "tls"
    for secret in ("ca.key", "server.key"):
        assert (tls_dir / secret).stat().st_mode & 0o777 == 0o600
    with tls_controller.client() as admin:  # verifies against the generated CA
        make_network(admin, "sec", cidr="10.232.0.0/24")
        created = admin.post("/v1/networks/sec/tokens", json={}).json()
        published = admin.get("/v1/ca").json()
    assert created["ca_cert_hash"] == ca_hash(tls_controller.ca_file.read_bytes())
    assert published["ca_hash"] == created["ca_cert_hash"]
    assert "PRIVATE KEY" not in published["ca_pem"]
    # Without the CA, a client refuses the certificate; plain HTTP gets nothing useful.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_controller.url}/healthz")
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_controller.url.replace("https", "http") + "/healthz")


async def test_an_agent_trusts_the_controller_only_with_the_right_hash(
    tls_controller: Controller,
) -> None:
    with tls_controller.client() as admin:
        make_network(admin, "sec", cidr="10.233.0.0/24")
        created = admin.post("/v1/networks/sec/tokens", json={}).json()
    pem = await fetch_pinned_ca(tls_controller.url, created["ca_cert_hash"])
    client = ControllerClient(tls_controller.url, verify=ssl.create_default_context(cadata=pem))
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
