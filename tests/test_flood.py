"""Anonymous junk must neither write to etcd nor grow the controller's memory: audit only
authenticated calls on known routes, bounded bodies, caches, limiter tables and metric labels."""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from cladnet.ratelimit import RateLimiter, source_key
from cladnet.ttlcache import TtlCache
from controller.auth import Authenticator
from controller.errors import ApiError
from controller.telemetry import METHODS, method_label
from lab.api import join, make_network, make_token
from lab.components import Controller, Etcd
from tests.support import assert_error

BODY_LIMIT = 4096  # the flood controller's; oversized junk is twice that
WARM_UP, TOTAL = 2_000, 20_000
RSS_GROWTH_LIMIT = 10 * 1024 * 1024


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _etcd_state(etcd: Etcd) -> tuple[int, int]:
    """(number of keys under "/", etcd revision): any write changes the second."""
    out = json.loads(etcd.ctl("get", "/", "--prefix", "--keys-only", "-w", "json"))
    return int(out.get("count", 0)), int(out["header"]["revision"])


def _word(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=n))


def _chunks(size: int) -> Iterator[bytes]:
    """A chunked body without Content-Length: the limit must count bytes as they come."""
    for _ in range(size // 4096 + 1):
        yield b"x" * 4096


async def _streamed(size: int) -> AsyncIterator[bytes]:
    for chunk in _chunks(size):
        yield chunk


def _junk(rng: random.Random, host_id: str) -> dict:
    """One anonymous or wrongly authenticated request, as keyword arguments for httpx."""
    method = rng.choice(
        ["GET", "POST", "PUT", "DELETE", "PATCH", "".join(rng.choices(string.ascii_uppercase, k=7))]
    )
    path = rng.choice(
        [
            f"/{_word(rng)}/{_word(rng)}",
            f"/v1/{_word(rng)}",
            f"/v1/hosts/{_word(rng)}/heartbeat",
            f"/v1/hosts/{host_id}/endpoints",
            f"/v1/hosts/{host_id}",
            f"/v1/networks/{_word(rng)}",
            "/v1/networks/flood/tokens",
            "/v1/networks",
            "/v1/admin-tokens",
            f"/v1/groups/{_word(rng)}/commands",
            "/v1/join",
        ]
    )
    auth = rng.choice(
        [
            None,
            f"cla_{_word(rng, 16)}.{_word(rng, 32)}",  # an invented admin token id
            f"clh_{_word(rng, 16)}.{_word(rng, 32)}",
            f"clh_{host_id}.{_word(rng, 32)}",  # a real host, a wrong secret
            f"clj_{_word(rng, 16)}.{_word(rng, 32)}",
            _word(rng, 40),
        ]
    )
    kw: dict = {"method": method, "url": path}
    if auth is not None:
        kw["headers"] = {"Authorization": f"Bearer {auth}"}
    body = rng.randrange(6)
    if body == 0:
        kw["content"] = b"y" * (2 * BODY_LIMIT)
    elif body == 1:
        kw["content"] = _streamed(2 * BODY_LIMIT)
    elif body == 2:
        kw["json"] = {"token": auth or "x", "hostname": _word(rng), "public_key": _word(rng)}
    return kw


async def _flood(ctl: Controller, count: int, seed: int, host_id: str) -> dict[int, int]:
    """``count`` junk requests over 32 connections; returns how many got each status."""
    rng = random.Random(seed)
    statuses: dict[int, int] = {}
    queue = [_junk(rng, host_id) for _ in range(count)]

    async def worker() -> None:
        # A client of one connection each: httpx's shared pool costs more CPU than the
        # server; plain HTTP, so no CA bundle to load 32 times.
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            base_url=ctl.url, timeout=30, limits=limits, verify=False
        ) as client:
            while queue:
                r = await client.request(**queue.pop())
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code >= 400:  # every refusal keeps the JSON error shape
                    assert r.json()["error"], r.text

    await asyncio.gather(*(worker() for _ in range(32)))
    return statuses


@pytest.fixture
def flood_controller(make_controller) -> Controller:
    """A controller whose per-source limit is out of the way, so junk reaches every layer."""
    return make_controller(
        extra_env={
            "CLADNET_AUTH_FAILURE_BURST": "1000000000",
            "CLADNET_JOIN_BURST": "1000000000",
            "CLADNET_MAX_BODY_BYTES": str(BODY_LIMIT),
            "CLADNET_MAX_JOIN_BODY_BYTES": str(BODY_LIMIT),
        }
    )


async def test_junk_requests_write_nothing_and_keep_memory_flat(
    flood_controller: Controller, etcd: Etcd
) -> None:
    ctl = flood_controller
    with ctl.client() as admin:
        make_network(admin, "flood", cidr="10.239.0.0/24")
        host_id = join(ctl, make_token(admin, "flood"), "real").json()["host_id"]
    assert ctl.proc is not None
    before = _etcd_state(etcd)

    first = await _flood(ctl, WARM_UP, seed=1, host_id=host_id)
    warm = _rss(ctl.proc.pid)
    rest = await _flood(ctl, TOTAL - WARM_UP, seed=2, host_id=host_id)
    grown = _rss(ctl.proc.pid) - warm
    after = _etcd_state(etcd)

    statuses = {s: first.get(s, 0) + rest.get(s, 0) for s in {*first, *rest}}
    print(f"statuses {sorted(statuses.items())}; RSS +{grown / 2**20:.1f} MiB after warm-up")
    assert sum(statuses.values()) == TOTAL
    assert {401, 404, 413} <= set(statuses) and all(400 <= s < 500 for s in statuses)
    assert after == before, "anonymous requests wrote to etcd"
    assert grown < RSS_GROWTH_LIMIT, f"RSS grew {grown / 2**20:.1f} MiB"


# --- the audit log --------------------------------------------------------------------------


def test_only_authenticated_calls_on_known_routes_are_audited(controller: Controller) -> None:
    with controller.client() as admin:
        make_network(admin, "aud", cidr="10.238.0.0/24")
        host = join(controller, make_token(admin, "aud"), "vm1").json()
        admin.post("/v1/nowhere/at/all", json={})  # the admin, but no route: not audited
    with controller.client(token=None) as anonymous:
        assert anonymous.post("/v1/networks", json={"name": "x"}).status_code == 401
        assert anonymous.delete(f"/v1/hosts/{host['host_id']}").status_code == 401
        assert anonymous.post("/v1/made-up").status_code == 404
        assert join(controller, "clj_made.up", "vm2").status_code == 401
    with controller.client(token="cla_nobody.wrong") as guesser:
        assert guesser.put("/v1/hosts/x/endpoints", json={"endpoints": []}).status_code == 401
    with controller.client() as admin:
        assert admin.delete("/v1/networks/absent").status_code == 404  # refused, audited
        entries = admin.get("/v1/audit", params={"limit": 20}).json()["entries"]
    seen = [(e["method"], e["path"], e["status"], e["who"].split(":")[0]) for e in entries]
    assert seen == [
        ("DELETE", "/v1/networks/absent", 404, "admin"),
        ("POST", "/v1/join", 200, "join-token"),
        ("POST", "/v1/networks/aud/tokens", 201, "admin"),
        ("POST", "/v1/networks", 201, "admin"),
    ]


# --- request bodies ---------------------------------------------------------------------------


def test_oversized_bodies_are_refused_with_413(make_controller) -> None:
    ctl: Controller = make_controller(
        extra_env={"CLADNET_MAX_BODY_BYTES": "4096", "CLADNET_MAX_JOIN_BODY_BYTES": "1024"}
    )
    big = {"name": "n", "description": "d" * 5000}
    with ctl.client() as admin:
        body = assert_error(admin.post("/v1/networks", json=big), 413, "body_too_large")
        assert "4096" in body["message"]
        assert admin.get("/v1/networks").json() == []
        # Without Content-Length (chunked), counted as it arrives.
        r = admin.post("/v1/networks", content=_chunks(8192))
        assert_error(r, 413, "body_too_large")
        # A body just under the limit still works.
        assert admin.post("/v1/networks", json={"name": "ok"}).status_code == 201
    with ctl.client(token=None) as anonymous:
        junk = {"token": "t" * 2000, "hostname": "h", "public_key": "k"}
        body = assert_error(anonymous.post("/v1/join", json=junk), 413, "body_too_large")
        assert "1024" in body["message"]
        r = anonymous.post("/v1/join", content=_chunks(4096))
        assert_error(r, 413, "body_too_large")
        assert_error(anonymous.post("/v1/join", content=b"{}"), 422, "invalid_request")


# --- metrics ----------------------------------------------------------------------------------


def test_metric_labels_are_route_templates_and_a_fixed_method_set(make_controller) -> None:
    controller: Controller = make_controller(extra_env={"CLADNET_AUTH_FAILURE_BURST": "1000"})
    rng = random.Random(3)
    with controller.client(token=None) as c:
        for _ in range(50):
            method = "".join(rng.choices(string.ascii_uppercase, k=6))
            c.request(method, f"/{_word(rng)}/{_word(rng)}")
            c.request(method, "/v1/networks")
            c.get(f"/v1/hosts/{_word(rng)}")
        text = c.get("/metrics").text
    with controller.client() as admin:
        templates = set(admin.get("/openapi.json").json()["paths"])
    labels = re.findall(
        r'^cladnet_controller_http_requests_total\{method="([^"]*)",route="([^"]*)"',
        text,
        re.MULTILINE,
    )
    methods, routes = {m for m, _ in labels}, {r for _, r in labels}
    assert methods <= set(METHODS) | {"other"} and "other" in methods
    assert routes <= templates | {"unmatched"}
    assert {"unmatched", "/v1/hosts/{host_id}", "/v1/networks"} <= routes


def test_method_labels() -> None:
    assert method_label("GET") == "GET" and method_label("PATCH") == "PATCH"
    assert method_label("BREW") == "other" and method_label("get") == "other"


# --- per-source limit -------------------------------------------------------------------------


def test_anonymous_failures_are_limited_per_source(make_controller) -> None:
    ctl: Controller = make_controller(extra_env={"CLADNET_AUTH_FAILURE_BURST": "5"})
    with ctl.client(token=None) as anonymous:
        codes = [anonymous.post(f"/junk/{i}").status_code for i in range(7)]
        assert codes == [404] * 5 + [429] * 2
        body = assert_error(anonymous.get("/healthz"), 429, "rate_limited")
        assert "retry in" in body["message"]
        r = anonymous.post("/junk", content=b"z" * 10)
        assert r.status_code == 429 and r.headers["retry-after"]


# --- pure pieces -----------------------------------------------------------------------------


def test_the_limiter_stays_bounded_under_many_sources() -> None:
    limiter = RateLimiter(rate=1, burst=5)  # the controller's default table size
    for i in range(20_000):
        limiter.hit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", float(i))
    assert len(limiter) == 10_000
    # The least recently seen sources are the ones dropped.
    assert "10.0.78.31" in limiter._buckets and "10.0.0.0" not in limiter._buckets


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("not an address") == "not an address"


def test_ttl_cache_is_bounded_and_expires() -> None:
    cache: TtlCache[str, int] = TtlCache(max_entries=3, ttl=10)
    for i in range(5):
        cache.put(f"k{i}", i, now=0)
    assert len(cache) == 3 and cache.get("k0", now=1) is None
    assert cache.get("k2", now=1) == 2  # k2 is now the most recently used
    cache.put("k5", 5, now=1)
    assert cache.get("k3", now=1) is None and cache.get("k2", now=1) == 2
    assert cache.get("k5", now=11.5) is None  # expired, and dropped
    assert len(cache) == 2
    cache.pop("k2")
    assert cache.get("k2", now=1) is None


async def test_invented_admin_tokens_are_not_cached() -> None:
    class NoRecords:
        reads = 0

        async def get(self, key: bytes) -> None:
            self.reads += 1

    etcd = NoRecords()
    authenticator = Authenticator(etcd, None, None)  # type: ignore[arg-type]
    for i in range(3000):
        with pytest.raises(ApiError):
            await authenticator.authenticate(f"Bearer cla_guess{i}.secret")
    assert etcd.reads == 3000 and len(authenticator._admin_cache) == 0


def test_a_host_cannot_fill_the_audit_log(controller: Controller) -> None:
    with controller.client() as admin:
        make_network(admin, "noisy", cidr="10.237.0.0/24")
        token = make_token(admin, "noisy")
    rogue = join(controller, token, "rogue").json()
    victim = join(controller, token, "victim").json()
    with controller.client(token=rogue["credential"]) as c:
        codes = {c.delete(f"/v1/hosts/{victim['host_id']}").status_code for _ in range(100)}
        assert codes == {403}
        metrics = c.get("/metrics").text
    with controller.client() as admin:
        entries = admin.get("/v1/audit", params={"limit": 1000}).json()["entries"]
    mine = [e for e in entries if e["who"] == f"host:{rogue['host_id']}"]
    assert 60 <= len(mine) < 100  # a burst of 60, then one a second
    assert re.search(r"^cladnet_controller_audit_not_stored_total [1-9]", metrics, re.MULTILINE)
