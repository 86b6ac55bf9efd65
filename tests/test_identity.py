"""A host owns its identity (issue 12, findings 1, 2, 9): a join token creates new hosts
only; becoming an existing host needs its credential, a proof of its WireGuard key or an
admin; public keys are unique in a network; cloned machines' names get a -N suffix.
Against a real etcd and controller; the agent's join in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cladnet import keys
from cladnet.keys import answer_challenge, generate_keypair
from lab.api import join, make_network, make_token
from lab.components import Controller, Etcd
from tests.support import assert_error

# --- the proof, pure -------------------------------------------------------------------


def test_only_the_private_key_answers_a_challenge() -> None:
    private, public = generate_keypair()
    made = keys.make_challenge(public, "h-1", "n-1")
    proof = answer_challenge(private, made.ephemeral_public, made.nonce, "h-1", "n-1")
    assert keys.check_proof(proof, made.proof_digest)
    # What the controller keeps does not reveal the answer.
    assert proof not in made.proof_digest and made.proof_digest != proof
    other_private = generate_keypair()[0]
    wrong = [
        answer_challenge(other_private, made.ephemeral_public, made.nonce, "h-1", "n-1"),
        answer_challenge(private, made.ephemeral_public, made.nonce, "h-2", "n-1"),
        answer_challenge(private, made.ephemeral_public, made.nonce, "h-1", "n-2"),
        answer_challenge(private, made.ephemeral_public, "bm9uY2U=", "h-1", "n-1"),
    ]
    assert not any(keys.check_proof(w, made.proof_digest) for w in wrong)
    # Each challenge is fresh: an answer to one does not answer the next.
    again = keys.make_challenge(public, "h-1", "n-1")
    assert again.nonce != made.nonce and again.ephemeral_public != made.ephemeral_public
    assert not keys.check_proof(proof, again.proof_digest)


def test_a_low_order_key_cannot_be_challenged() -> None:
    # Its shared secret is all zeros: anyone could answer.
    low_order = base64.b64encode(bytes([1]) + bytes(31)).decode()
    with pytest.raises(ValueError):
        keys.make_challenge(low_order, "h-1", "n-1")


# --- helpers ---------------------------------------------------------------------------


def challenge(ctl: Controller, token: str, public_key: str) -> httpx.Response:
    with ctl.client(token=None) as c:
        return c.post("/v1/join/challenge", json={"token": token, "public_key": public_key})


def rejoin_with_proof(
    ctl: Controller, token: str, private_key: str, public_key: str | None = None, **kw
) -> httpx.Response:
    """Re-join as the host that holds ``private_key`` (optionally switching to ``public_key``)."""
    c = challenge(ctl, token, keys.public_key_of(private_key))
    assert c.status_code == 200, c.text
    ch = c.json()
    proof = answer_challenge(
        private_key, ch["ephemeral_public_key"], ch["nonce"], ch["host_id"], ch["network_id"]
    )
    return join(
        ctl,
        token,
        "ignored",
        public_key or keys.public_key_of(private_key),
        host_id=ch["host_id"],
        proof=proof,
        **kw,
    )


def peers(admin: httpx.Client, net: str) -> dict[str, dict]:
    return {p["name"]: p for p in admin.get(f"/v1/networks/{net}/peers").json()["peers"]}


def heartbeat(ctl: Controller, joined: dict) -> httpx.Response:
    with ctl.client(joined["credential"]) as c:
        return c.post(f"/v1/hosts/{joined['host_id']}/heartbeat")


# --- finding 1: no takeover with a join token -------------------------------------------


def test_a_join_token_cannot_take_over_a_host(admin: httpx.Client, controller: Controller) -> None:
    make_network(admin, "prod", cidr="10.60.0.0/24")
    token = make_token(admin, "prod")
    _, victim_key = generate_keypair()
    victim = join(controller, token, "db", victim_key).json()
    attacker_private, attacker_key = generate_keypair()

    # Every member reads the victim's name and key from /peers; the token holder replays them.
    assert_error(join(controller, token, "db", victim_key), 409, "key_in_use")
    assert_error(join(controller, token, "db", victim_key, replace=True), 409, "key_in_use")
    body = assert_error(join(controller, token, "db", attacker_key), 409, "hostname_taken")
    assert "'db'" in body["message"]
    assert_error(join(controller, token, "db", attacker_key, replace=True), 403, "proof_required")
    # Naming the host is not enough either: no proof, a forged one, or one for its own key.
    named = {"host_id": victim["host_id"]}
    assert_error(join(controller, token, "x", attacker_key, **named), 403, "proof_required")
    forged = base64.b64encode(bytes(32)).decode()
    assert_error(
        join(controller, token, "x", attacker_key, **named, proof=forged), 403, "invalid_proof"
    )
    ch = challenge(controller, token, victim_key).json()
    own = answer_challenge(
        attacker_private, ch["ephemeral_public_key"], ch["nonce"], ch["host_id"], ch["network_id"]
    )
    assert_error(
        join(controller, token, "x", attacker_key, **named, proof=own), 403, "invalid_proof"
    )

    # The victim is untouched: its credential works, its IP and key are as they were.
    assert heartbeat(controller, victim).status_code == 200
    listed = peers(admin, "prod")
    assert list(listed) == ["db"]
    db = listed["db"]
    assert (db["id"], db["overlay_ip"], db["public_key"]) == (
        victim["host_id"],
        victim["overlay_ip"],
        victim_key,
    )


def test_a_host_credential_is_only_its_own(admin: httpx.Client, controller: Controller) -> None:
    make_network(admin, "prod", cidr="10.61.0.0/24")
    make_network(admin, "other", cidr="10.61.1.0/24")
    token = make_token(admin, "prod")
    victim = join(controller, token, "db").json()
    member = join(controller, token, "web").json()
    stranger = join(controller, make_token(admin, "other"), "db").json()
    body = {"token": token, "hostname": "x", "public_key": generate_keypair()[1]}
    with controller.client(member["credential"]) as c:
        r = c.post("/v1/join", json={**body, "host_id": victim["host_id"]})
    assert_error(r, 403, "forbidden")
    # A host of another network cannot re-join into this one with its credential.
    with controller.client(stranger["credential"]) as c:
        assert_error(c.post("/v1/join", json=body), 404, "host_not_found")
    viewer = admin.post("/v1/admin-tokens", json={"role": "viewer"}).json()["token"]
    with controller.client(viewer) as c:
        r = c.post("/v1/join", json={**body, "host_id": victim["host_id"]})
    assert_error(r, 403, "proof_required")
    assert heartbeat(controller, victim).status_code == 200


# --- legitimate re-joins ------------------------------------------------------------------


def test_rejoin_with_a_key_proof_keeps_ip_and_name(
    admin: httpx.Client, controller: Controller
) -> None:
    make_network(admin, "prod", cidr="10.62.0.0/24")
    token = make_token(admin, "prod")
    private, public = generate_keypair()
    first = join(controller, token, "db", public, labels={"v": "1"}).json()

    again = rejoin_with_proof(controller, token, private, labels={"v": "2"})
    assert again.status_code == 200, again.text
    body = again.json()
    assert (body["host_id"], body["overlay_ip"], body["hostname"]) == (
        first["host_id"],
        first["overlay_ip"],
        "db",
    )
    assert heartbeat(controller, body).status_code == 200
    assert heartbeat(controller, first).status_code == 401  # the old credential is void
    assert peers(admin, "prod")["db"]["labels"] == {"v": "2"}

    # A proof is used once.
    ch = challenge(controller, token, public).json()
    proof = answer_challenge(
        private, ch["ephemeral_public_key"], ch["nonce"], ch["host_id"], ch["network_id"]
    )
    fields = {"host_id": ch["host_id"], "proof": proof}
    assert join(controller, token, "db", public, **fields).status_code == 200
    assert_error(join(controller, token, "db", public, **fields), 403, "invalid_proof")

    # The proof of the old key may move the host to a new key; the old one is free then.
    new_private, new_public = generate_keypair()
    moved = rejoin_with_proof(controller, token, private, new_public)
    assert moved.status_code == 200, moved.text
    assert moved.json()["overlay_ip"] == first["overlay_ip"]
    assert peers(admin, "prod")["db"]["public_key"] == new_public
    assert_error(challenge(controller, token, public), 404, "host_not_found")
    assert join(controller, token, "web", public).status_code == 200
    assert rejoin_with_proof(controller, token, new_private).status_code == 200


def test_rejoin_with_the_current_credential_or_as_admin(
    admin: httpx.Client, controller: Controller
) -> None:
    make_network(admin, "prod", cidr="10.63.0.0/24")
    token = make_token(admin, "prod")
    first = join(controller, token, "db").json()
    new_key = generate_keypair()[1]
    body = {"token": token, "hostname": "db", "public_key": new_key, "listen_port": 51820}
    with controller.client(first["credential"]) as c:
        r = c.post("/v1/join", json=body)
    assert r.status_code == 200, r.text
    assert (r.json()["host_id"], r.json()["overlay_ip"]) == (first["host_id"], first["overlay_ip"])
    assert peers(admin, "prod")["db"]["public_key"] == new_key

    # An admin may re-key a host (one that lost its key), keeping its address.
    lost = generate_keypair()[1]
    r = admin.post("/v1/join", json={**body, "public_key": lost, "host_id": first["host_id"]})
    assert r.status_code == 200, r.text
    assert r.json()["overlay_ip"] == first["overlay_ip"]
    assert peers(admin, "prod")["db"]["public_key"] == lost
    # Without host_id an admin's join is a plain new host.
    r = admin.post("/v1/join", json={**body, "hostname": "new", "public_key": new_key})
    assert r.status_code == 200 and r.json()["host_id"] != first["host_id"], r.text


# --- finding 2: unique keys -----------------------------------------------------------------


def test_public_keys_are_unique_in_a_network(
    admin: httpx.Client, controller: Controller, etcd: Etcd
) -> None:
    make_network(admin, "prod", cidr="10.64.0.0/24")
    make_network(admin, "other", cidr="10.64.1.0/24")
    token = make_token(admin, "prod")
    _, shared = generate_keypair()
    a = join(controller, token, "a", shared).json()
    b_key = generate_keypair()[1]
    b = join(controller, token, "b", b_key).json()

    # 1. join
    assert_error(join(controller, token, "c", shared), 409, "key_in_use")
    # 2. re-join (as b, with its credential) onto a's key
    body = {"token": token, "hostname": "b", "public_key": shared}
    with controller.client(b["credential"]) as c:
        assert_error(c.post("/v1/join", json=body), 409, "key_in_use")
        # 3. endpoints update
        r = c.put(f"/v1/hosts/{b['host_id']}/endpoints", json={"public_key": shared})
        assert_error(r, 409, "key_in_use")
    listed = peers(admin, "prod")
    assert (listed["a"]["public_key"], listed["b"]["public_key"]) == (shared, b_key)
    # Another network may hold the same key.
    assert join(controller, make_token(admin, "other"), "a", shared).status_code == 200

    # Leaving releases the key; a key change releases the old one.
    with controller.client(a["credential"]) as c:
        assert c.delete(f"/v1/hosts/{a['host_id']}").status_code == 200
    with controller.client(b["credential"]) as c:
        r = c.put(f"/v1/hosts/{b['host_id']}/endpoints", json={"public_key": shared})
    assert r.status_code == 200, r.text
    assert join(controller, token, "c", b_key).status_code == 200

    # Deleting the network releases its index and challenges.
    challenge(controller, token, shared)
    assert admin.delete("/v1/networks/prod", params={"force": "true"}).status_code == 200
    left = etcd.ctl("get", "--prefix", "/cladnet/", "--keys-only").split()
    prod_id = a["network"]["id"]
    assert not [k for k in left if prod_id in k], left


# --- finding 9: cloned hostnames ----------------------------------------------------------


def test_cloned_machines_get_unique_names(admin: httpx.Client, controller: Controller) -> None:
    make_network(admin, "prod", cidr="10.65.0.0/24")
    token = make_token(admin, "prod")
    names = []
    for _ in range(3):
        r = join(controller, token, "web", explicit_hostname=False)
        assert r.status_code == 200, r.text
        names.append((r.json()["hostname"], r.json()["renamed_from"]))
    assert names == [("web", None), ("web-2", "web"), ("web-3", "web")]
    assert sorted(peers(admin, "prod")) == ["web", "web-2", "web-3"]
    # A name the caller chose is never changed: taken is an error that says so.
    body = assert_error(join(controller, token, "web-2"), 409, "hostname_taken")
    assert "'web-2'" in body["message"] and "prod" in body["message"]


# --- the agent --------------------------------------------------------------------------------


def agent_join(ctl: Controller, token: str, state: Path, *extra: str) -> dict:
    env = {**os.environ, "CLADNET_STATE_DIR": str(state), "CLADNET_JOIN_TOKEN": token}
    out = subprocess.run(
        [sys.executable, "-m", "agent.main", "join", "--no-run", "--controller", ctl.url, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_agent_rejoins_with_its_key_and_clones_get_a_suffix(
    admin: httpx.Client, controller: Controller, tmp_path: Path
) -> None:
    make_network(admin, "prod", cidr="10.66.0.0/24")
    token = make_token(admin, "prod")
    machine = socket.gethostname()
    first = agent_join(controller, token, tmp_path / "vm")
    assert first["hostname"] == machine
    net_dir = next((tmp_path / "vm" / "networks").iterdir())
    private = (net_dir / "private.key").read_text()

    # The same VM joins again: it proves its saved key and stays itself.
    again = agent_join(controller, token, tmp_path / "vm")
    assert (again["host_id"], again["overlay_ip"]) == (first["host_id"], first["overlay_ip"])
    assert (net_dir / "private.key").read_text() == private
    assert len(peers(admin, "prod")) == 1

    # A clone of the image (same hostname, no state) is a new host with a unique name.
    clone = agent_join(controller, token, tmp_path / "clone")
    assert clone["hostname"] == f"{machine}-2" and clone["host_id"] != first["host_id"]
    saved = json.loads(
        next((tmp_path / "clone" / "networks").iterdir()).joinpath("membership.json").read_text()
    )
    assert saved["me"]["name"] == f"{machine}-2"
    # An explicit --hostname that is taken fails with the controller's message.
    env = {**os.environ, "CLADNET_STATE_DIR": str(tmp_path / "third"), "CLADNET_JOIN_TOKEN": token}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.main",
            "join",
            "--no-run",
            "--controller",
            controller.url,
            "--hostname",
            machine,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "hostname_taken" in out.stderr and machine in out.stderr


def test_keys_of_hosts_from_before_are_indexed_at_start(make_controller, etcd: Etcd) -> None:
    first = make_controller()
    with first.client() as admin:
        make_network(admin, "prod", cidr="10.67.0.0/24")
        token = make_token(admin, "prod")
    _, key = generate_keypair()
    host = join(first, token, "old", key).json()
    # As written by a controller from before keys were unique: no index.
    assert etcd.ctl("del", "--prefix", "/cladnet/public-keys/").strip() == "1"
    second = make_controller()
    assert_error(join(second, token, "new", key), 409, "key_in_use")
    assert challenge(second, token, key).json()["host_id"] == host["host_id"]


async def test_a_proof_is_spent_once_even_concurrently_and_a_used_up_token_still_rejoins(
    admin: httpx.Client, controller: Controller
) -> None:
    make_network(admin, "prod", cidr="10.68.0.0/24")
    token = make_token(admin, "prod", max_uses=1)  # one-use, as a group gives each VM
    private, public = generate_keypair()
    first = join(controller, token, "vm", public).json()
    ch = challenge(controller, token, public).json()  # the token is used up: still answered
    proof = answer_challenge(
        private, ch["ephemeral_public_key"], ch["nonce"], ch["host_id"], ch["network_id"]
    )
    body = {
        "token": token,
        "hostname": "vm",
        "public_key": public,
        "host_id": ch["host_id"],
        "proof": proof,
    }
    async with controller.aclient(token=None) as c:
        results = await asyncio.gather(*(c.post("/v1/join", json=body) for _ in range(8)))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [403] * 7, [r.text for r in results]
    assert all(r.json()["error"] == "invalid_proof" for r in results if r.status_code == 403)
    winner = next(r.json() for r in results if r.status_code == 200)
    assert (winner["host_id"], winner["overlay_ip"]) == (first["host_id"], first["overlay_ip"])
    # The used-up token still creates no new host.
    assert_error(join(controller, token, "other"), 403, "token_exhausted")


async def test_an_agent_join_retried_after_a_lost_answer_is_the_same_host(
    admin: httpx.Client, controller: Controller, tmp_path: Path
) -> None:
    from agent.main import _join_or_rejoin
    from agent.state import StateDir
    from cladnet.api_client import ApiClientError, AsyncClient

    make_network(admin, "prod", cidr="10.69.0.0/24")
    token = make_token(admin, "prod", max_uses=1)
    new_key = generate_keypair()[0]
    fields = {"hostname": "vm", "explicit_hostname": False}
    client = AsyncClient(controller.url)
    try:
        states = StateDir(tmp_path)  # nothing saved: the first answer never arrived
        first, key1 = await _join_or_rejoin(client, token, states, fields, new_key)
        client.credential = None  # the answer, with its credential, never arrived
        again, key2 = await _join_or_rejoin(client, token, states, fields, new_key)
        # Another key with the used-up token is still refused.
        client.credential = None
        with pytest.raises(ApiClientError) as refused:
            await _join_or_rejoin(client, token, states, fields, generate_keypair()[0])
    finally:
        await client.close()
    assert refused.value.code == "token_exhausted"
    assert key1 == key2 == new_key
    assert (again["host_id"], again["overlay_ip"], again["hostname"]) == (
        first["host_id"],
        first["overlay_ip"],
        "vm",
    )
    assert list(peers(admin, "prod")) == ["vm"]
