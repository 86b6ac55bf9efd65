"""``cladnet.api_client`` against a real controller (real etcd): the typed calls of both
transports, the one error for every error answer, and CA pinning over TLS."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys

import httpx
import pytest

from cladnet.api_client import (
    ApiClientError,
    AsyncClient,
    SyncClient,
    TrustError,
    WatchGone,
    fetch_ca,
    fetch_pinned_ca,
    is_transient,
)
from cladnet.api_client import endpoints as ep
from cladnet.keys import generate_keypair
from controller import tls
from lab.components import ADMIN_TOKEN, REPO, Controller, free_port


@pytest.fixture
def tls_controller(make_controller) -> Controller:
    return make_controller(extra_env={"CLADNET_TLS": "1"})


def test_sync_calls_answer_with_the_documented_shapes(controller: Controller) -> None:
    api = SyncClient(controller.url, ADMIN_TOKEN)
    try:
        body: ep.NetworkCreateBody = {"name": "prod", "cidr": "10.81.0.0/24"}
        net = api.call(ep.NETWORK_CREATE, body)
        assert (net["name"], net["cidr"]) == ("prod", "10.81.0.0/24")
        assert [n["id"] for n in api.call(ep.NETWORKS)] == [net["id"]]
        # Path parameters are quoted as one segment: a name and an id reach the same network.
        assert api.call(ep.NETWORK, ref="prod") == api.call(ep.NETWORK, ref=net["id"])
        token = api.call(ep.TOKEN_CREATE, {"max_uses": 2}, ref="prod")
        assert token["max_uses"] == 2 and token["token"]
        assert [t["id"] for t in api.call(ep.TOKENS, ref="prod")] == [token["id"]]
        spaces = api.call(ep.ADDRESS_SPACES, query={"hosts": 10, "unused": None})
        assert spaces["recommended"]
        assert api.call(ep.TOKEN_REVOKE, ref="prod", token_id=token["id"]) is None  # 204
        assert api.call(ep.TOKENS, ref="prod") == []
    finally:
        api.close()


def test_sync_error_answers_carry_status_code_and_message(controller: Controller) -> None:
    api = SyncClient(controller.url, ADMIN_TOKEN)
    with pytest.raises(ApiClientError) as missing:
        api.call(ep.NETWORK, ref="nowhere")
    assert (missing.value.status, missing.value.code) == (404, "network_not_found")
    assert "nowhere" in missing.value.message
    api.call(ep.NETWORK_CREATE, {"name": "dup", "cidr": "10.82.0.0/24"})
    with pytest.raises(ApiClientError) as clash:
        api.call(ep.NETWORK_CREATE, {"name": "dup", "cidr": "10.83.0.0/24"})
    assert clash.value.status == 409 and clash.value.code and clash.value.message
    # A continue token from the future: 410, the error the agent lists again on.
    with pytest.raises(WatchGone) as gone:
        api.call(ep.NETWORK_PEERS, query={"limit": 1, "continue": "999999999.00"}, ref="dup")
    assert (gone.value.status, gone.value.code) == (410, "continue_expired")

    stranger = SyncClient(controller.url, "not-a-token")
    with pytest.raises(ApiClientError) as unauthorized:
        stranger.call(ep.NETWORKS)
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    # No HTTP answer at all: status 0, a message naming the server.
    dead = SyncClient(f"http://127.0.0.1:{free_port()}", ADMIN_TOKEN, what="collector")
    with pytest.raises(ApiClientError) as unreachable:
        dead.call(ep.ALARMS)
    assert (unreachable.value.status, unreachable.value.code) == (0, "unreachable")
    assert str(unreachable.value).startswith("cannot reach collector at http://127.0.0.1:")


async def test_async_calls_and_errors_share_the_endpoints(controller: Controller) -> None:
    with controller.client() as admin:
        SyncClient(controller.url, ADMIN_TOKEN).call(
            ep.NETWORK_CREATE, {"name": "edge", "cidr": "10.84.0.0/24"}
        )
        created = admin.post("/v1/networks/edge/tokens", json={}).json()
    agent = AsyncClient(controller.url)
    try:
        joined = await agent.join(
            created["token"], hostname="vm1", public_key=generate_keypair()[1]
        )
        assert agent.credential == joined["credential"]
        beat = await agent.heartbeat(joined["host_id"], addresses=["192.0.2.7/24"])
        assert beat["host_id"] == joined["host_id"]
        peers, revision = await agent.list_peers(joined["network"]["id"])
        assert [p["name"] for p in peers] == ["vm1"] and revision > 0
        assert (await agent.pending_commands(joined["host_id"])) == []
        # The same error type as the sync transport, from the same shape.
        with pytest.raises(ApiClientError) as refused:
            await agent.heartbeat("h-someone-else")
        assert refused.value.status == 403 and refused.value.code == "forbidden"
        assert not is_transient(refused.value)
        with pytest.raises(ApiClientError) as bad_token:
            await AsyncClient(controller.url).join("bogus", hostname="x", public_key="k")
        assert bad_token.value.status in (401, 422)
        await agent.leave(joined["host_id"])
        with pytest.raises(ApiClientError) as gone:
            await agent.heartbeat(joined["host_id"])
        assert gone.value.status in (401, 404)  # the agent never tears down on these
    finally:
        await agent.close()


async def test_tls_pinning_trusts_only_the_pinned_ca(tls_controller: Controller) -> None:
    with tls_controller.client() as admin:
        admin.post("/v1/networks", json={"name": "sec", "cidr": "10.85.0.0/24"})
        created = admin.post("/v1/networks/sec/tokens", json={}).json()
    ca_hash = created["ca_cert_hash"]
    # Sync (the CLI's login): the CA comes unverified and is kept only with the right hash.
    pem = fetch_ca(tls_controller.url, ca_hash)
    assert pem == await fetch_pinned_ca(tls_controller.url, ca_hash)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(TrustError, match="does not match"):
        fetch_ca(tls_controller.url, wrong)
    with pytest.raises(TrustError, match="does not match"):
        await fetch_pinned_ca(tls_controller.url, wrong)
    assert SyncClient(tls_controller.url, ADMIN_TOKEN, ca_pem=pem).call(ep.NETWORK, ref="sec")

    # A CA pinned is the only one trusted: another one is refused, for both transports.
    other = tls.new_ca("someone else's CA").cert_pem.decode()
    with pytest.raises(ApiClientError) as untrusted:
        SyncClient(tls_controller.url, ADMIN_TOKEN, ca_pem=other).call(ep.NETWORKS)
    assert untrusted.value.code == "untrusted_certificate" and "--ca-hash" in str(untrusted.value)
    stranger = AsyncClient(tls_controller.url, verify=ssl.create_default_context(cadata=other))
    try:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED") as refused:
            await stranger.join(created["token"], hostname="vm", public_key=generate_keypair()[1])
        assert not is_transient(refused.value)  # retrying a bad certificate never helps
    finally:
        await stranger.close()
    agent = AsyncClient(tls_controller.url, verify=ssl.create_default_context(cadata=pem))
    try:
        joined = await agent.join(created["token"], hostname="vm", public_key=generate_keypair()[1])
        assert joined["overlay_ip"].startswith("10.85.0.")
    finally:
        await agent.close()


def test_the_client_works_without_the_cli_extra() -> None:
    """The agent installs the client, not typer or rich (the CLI's extra): with those
    made unimportable, the client and the agent still import and the CLI says why not."""
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("typer", "rich", "click"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
import cladnet.api_client, agent.daemon, agent.main
print(sorted(m for m in sys.modules if m.startswith(("typer", "rich", "cladnet.cli"))))
try:
    import cladnet.cli
except SystemExit as exc:
    print(exc)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    imported, refusal = run.stdout.strip().splitlines()
    assert imported == "[]"
    assert "pip install 'cladnet[cli]'" in refusal


def test_every_controller_endpoint_is_in_the_published_document() -> None:
    """The client's endpoints cannot drift from openapi.json (its paths and methods)."""
    document = json.loads((REPO / "openapi.json").read_text())
    endpoints = [v for v in vars(ep).values() if isinstance(v, ep.Endpoint)]
    assert len(endpoints) > 30
    for endpoint in endpoints:
        if endpoint in ep.COLLECTOR:
            continue
        operations = document["paths"].get(endpoint.path, {})
        assert endpoint.method.lower() in operations, endpoint
