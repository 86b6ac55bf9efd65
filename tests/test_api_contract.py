"""The API contract: the published document is the served one, and a live controller on
a real etcd answers every generated request as the document says (schemathesis, with an
admin, a viewer and a host credential); lists page as documented."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cladnet import keys
from cladnet.api_client import AsyncClient
from lab.components import ADMIN_TOKEN, Controller

REPO = Path(__file__).resolve().parent.parent
DOCUMENT = REPO / "openapi.json"
REGENERATE = "python -m controller.openapi > openapi.json"
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,negative_data_rejection,positive_data_acceptance"
)
PHASES = "examples,coverage,fuzzing"
ACCEPTANCE = """
# A well-formed continue token whose revision is compacted or in the future: 410, as
# documented (the list is to be read again from the start).
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "410", "429"]

# Rules between fields that JSON Schema cannot state, documented on the operation as 400:
# a CIDR must hold expected_hosts; a group holds at most 100 VMs in all.
[[operations]]
include-path = "/v1/networks"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {WITH_400}

[[operations]]
include-path = "/v1/groups"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {WITH_400}

# A policy document is checked by the policy's own parser (400 invalid_policy); on write
# its tests must pass too (422 policy_tests_failed).
[[operations]]
include-path-regex = '^/v1/networks/[{]ref[}]/policy'
checks.positive_data_acceptance.expected-statuses = {WITH_400_422}

# The monitoring proxy answers as the collector does, and the fuzzed controller has no
# collector (503 no_collector every time): tests/test_dashboard.py covers it with one.
[[operations]]
include-path = "/v1/monitoring/{path}"
enabled = false

# Gone (410 to every caller, documented so): tests/test_controller_api.py asserts it.
[[operations]]
include-path = "/v1/hosts/{host_id}/status"
enabled = false
""".replace("{WITH_400}", '["2xx", "400", "401", "403", "404", "409", "429"]').replace(
    "{WITH_400_422}", '["2xx", "400", "401", "403", "404", "409", "422", "429"]'
)
# The fuzzer's requests fail a lot by design: the per-source limit must not cut it off.
FUZZ_ENV = {"CLADNET_AUTH_FAILURE_BURST": "1000000", "CLADNET_JOIN_BURST": "1000000"}


def _join(admin: httpx.Client, network: str, hostname: str) -> dict:
    token = admin.post(f"/v1/networks/{network}/tokens", json={}).json()["token"]
    _, public = keys.generate_keypair()
    r = admin.post("/v1/join", json={"token": token, "hostname": hostname, "public_key": public})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_published_document_is_the_served_one(controller: Controller) -> None:
    served = httpx.get(f"{controller.url}/openapi.json").json()
    published = json.loads(DOCUMENT.read_text())
    assert served == published, f"openapi.json is out of date; regenerate it: {REGENERATE}"
    assert all(path.startswith("/v1/") for path in served["paths"] if path.count("/") > 1)


def test_the_document_generator_needs_no_etcd() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "controller.openapi"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == json.loads(DOCUMENT.read_text()), REGENERATE


def test_every_error_has_the_one_schema_and_every_operation_its_security() -> None:
    doc = json.loads(DOCUMENT.read_text())
    schemes = doc["components"]["securitySchemes"]
    assert set(schemes) == {"admin", "viewer", "host"}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            where = f"{method.upper()} {path}"
            assert "security" in op, where
            for name in (n for req in op["security"] for n in req):
                assert name in schemes, where
            for status, response in op["responses"].items():
                if int(status) < 400:
                    continue
                schema = response["content"]["application/json"]["schema"]
                assert schema["allOf"][0] == {"$ref": "#/components/schemas/ApiErrorBody"}, where
                assert schema["allOf"][1]["properties"]["error"]["enum"], where
            assert {"429", "500"} <= set(op["responses"]), where
            if "requestBody" in op:
                assert {"413", "422"} <= set(op["responses"]), where


def _pages(client: httpx.Client, url: str, key: str | None, limit: int) -> list[dict]:
    """Every page of a list, following ``continue`` (body or X-Continue header)."""
    pages, token = [], None
    while True:
        params: dict = {"limit": limit}
        if token:
            params["continue"] = token
        r = client.get(url, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body)
        token = body.get("continue") if key else r.headers.get("X-Continue")
        if not token:
            return pages


def test_hosts_peers_and_audit_page_through_one_snapshot(controller: Controller) -> None:
    with controller.client() as admin:
        net = admin.post("/v1/networks", json={"name": "paged", "cidr": "10.61.0.0/24"}).json()
        joined = [_join(admin, "paged", f"h{i}") for i in range(5)]
        ids = {j["host_id"] for j in joined}
        url = f"/v1/networks/{net['id']}"
        # The policy's key sits among the peers' (after them): never listed as a peer.
        policy = {"groups": {"web": ["tag:web"]}, "rules": [{"src": ["group:web"], "dst": ["*"]}]}
        assert admin.put(f"{url}/policy", json=policy).status_code == 200

        peer_pages = _pages(admin, f"{url}/peers", "peers", 2)
        assert [len(p["peers"]) for p in peer_pages] == [2, 2, 1]
        assert {p["id"] for page in peer_pages for p in page["peers"]} == ids
        # The policy comes with the last page.
        assert [p["policy"] and p["policy"]["version"] for p in peer_pages] == [None, None, 1]
        # All pages at the first page's revision, even after a change in between.
        first = admin.get(f"{url}/peers", params={"limit": 2}).json()
        admin.delete(f"/v1/hosts/{joined[0]['host_id']}")
        rest = admin.get(f"{url}/peers", params={"limit": 10, "continue": first["continue"]})
        assert rest.json()["revision"] == first["revision"]
        assert len(first["peers"]) + len(rest.json()["peers"]) == 5
        # Without a limit: everything, as old agents expect.
        unpaged = admin.get(f"{url}/peers").json()
        assert len(unpaged["peers"]) == 4 and unpaged["continue"] is None

        host_pages = _pages(admin, f"{url}/hosts", None, 3)
        assert [len(p) for p in host_pages] == [3, 1]
        assert {h["id"] for page in host_pages for h in page} == ids - {joined[0]["host_id"]}

        audit_pages = _pages(admin, "/v1/audit", "entries", 4)
        entries = [e for page in audit_pages for e in page["entries"]]
        assert entries == admin.get("/v1/audit", params={"limit": 1000}).json()["entries"]
        assert len(entries) >= 11 and [e["ts"] for e in entries] == sorted(
            (e["ts"] for e in entries), reverse=True
        )

        # The agent pages through the list and gets every peer at one revision.
        async def agent_list() -> tuple[list[dict], int]:
            agent = AsyncClient(controller.url, credential=joined[1]["credential"])
            try:
                return await agent.list_peers(net["id"], page=2)
            finally:
                await agent.close()

        peers, revision = asyncio.run(agent_list())
        assert {p["id"] for p in peers} == ids - {joined[0]["host_id"]}
        assert revision == unpaged["revision"]

        bad = admin.get(f"{url}/peers", params={"limit": 1, "continue": "not-a-token"})
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
        future = admin.get(f"{url}/peers", params={"limit": 1, "continue": "999999999.00"})
        assert future.status_code == 410 and future.json()["error"] == "continue_expired"


@pytest.fixture
def fuzz_controller(make_controller) -> Controller:
    return make_controller(extra_env=FUZZ_ENV)


def _schemathesis(
    controller: Controller,
    token: str,
    config: Path,
    *extra: str,
    phases: str = PHASES,
    examples: int = 4,
) -> None:
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(config),
            "run",
            f"{controller.url}/openapi.json",
            "--checks",
            CHECKS,
            "--header",
            f"Authorization: Bearer {token}",
            "--max-examples",
            str(examples),
            "--seed",
            "18",
            "--workers",
            "2",
            "--request-timeout",
            "10",
            "--phases",
            phases,
            "--suppress-health-check",
            "all",
            "--warnings",
            "off",
            *extra,
        ],
        cwd=config.parent,  # its cache (.schemathesis/) stays out of the repo
        capture_output=True,
        text=True,
        timeout=300,
    )
    (config.parent / "schemathesis.out").write_text(run.stdout + run.stderr)
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert "No issues found" in run.stdout or "passed" in run.stdout, tail


def test_the_api_keeps_its_contract_for_admin_viewer_and_host(
    fuzz_controller: Controller, tmp_path: Path
) -> None:
    with fuzz_controller.client() as admin:
        admin.post("/v1/networks", json={"name": "fuzz", "cidr": "10.250.0.0/24"})
        viewer = admin.post("/v1/admin-tokens", json={"role": "viewer"}).json()["token"]
        host = _join(admin, "fuzz", "fuzz-host")
    # Real ids where the paths take them, so operations get past their 404s.
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f"""
[parameters]
"path.ref" = "fuzz"
"path.host_id" = "{host["host_id"]}"
"query.watch" = false
{ACCEPTANCE}"""
    )
    # The host leaves in its own run (DELETE /v1/hosts/{host_id}); the others keep it.
    _schemathesis(fuzz_controller, viewer, config)
    _schemathesis(fuzz_controller, ADMIN_TOKEN, config, "--exclude-method", "DELETE")
    _schemathesis(fuzz_controller, host["credential"], config)


def test_the_documented_links_hold_statefully(fuzz_controller: Controller, tmp_path: Path) -> None:
    """Schemathesis' stateful phase follows the document's links (network → token → join
    → heartbeat → leave → network deleted) as an admin, all six checks on every step."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f"""
[parameters]
"query.watch" = false  # a watch never ends (keep-alives every second): not a fuzz target

# The document's links only: inferred ones would spread the walks thin.
[phases.stateful]
max-steps = 12
inference.algorithms = []
{ACCEPTANCE}"""
    )
    _schemathesis(fuzz_controller, ADMIN_TOKEN, config, phases="stateful", examples=60)
    report = (tmp_path / "schemathesis.out").read_text()
    assert "API Links:" in report and "Scenarios:" in report
