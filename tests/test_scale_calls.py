"""No full scans on the controller's hot paths: each is checked by counting the etcd calls
(and the keys they return) in process against a real etcd, never by timing."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aetcd import transactions as tx

from cladnet import tokens
from cladnet.models import Group, GroupMember, JoinRequest, NetworkCreate, TokenCreate, Vm
from controller import keyspace as ks
from controller.audit import AuditLog
from controller.errors import ApiError
from controller.etcd import Etcd
from controller.groups import Drivers, GroupStore, Reconciler
from controller.store import Store
from lab.api import join, make_network, make_token
from lab.components import Controller, Mosquitto, wait_until
from lab.components import Etcd as EtcdServer
from lab.monitoring import publish_health


class CountingEtcd(Etcd):
    """Records every call: (helper, first key), and how many keys each answer held."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, bytes]] = []
        self.returned: list[int] = []

    def reset(self) -> None:
        self.calls.clear()
        self.returned.clear()

    def reads_of(self, prefix: bytes) -> int:
        """Whole reads of ``prefix``."""
        return self.calls.count(("get_prefix", prefix))

    async def call(self, fn: Any) -> Any:
        result = await super().call(fn)
        kvs = getattr(result, "kvs", None)
        if kvs is not None:
            self.returned.append(len(kvs))
        return result

    async def get(self, key: bytes) -> Any:
        self.calls.append(("get", key))
        return await super().get(key)

    async def get_prefix(self, prefix: bytes, keys_only: bool = False) -> Any:
        self.calls.append(("get_prefix", prefix))
        return await super().get_prefix(prefix, keys_only)

    async def range(self, prefix: bytes, **options: Any) -> Any:
        self.calls.append(("range", prefix))
        return await super().range(prefix, **options)

    async def ranges(self, requests: list[Any]) -> tuple[list[Any], int]:
        self.calls.append(("ranges", requests[0].key if requests else b""))
        return await super().ranges(requests)

    async def put(self, key: bytes, value: bytes) -> Any:
        self.calls.append(("put", key))
        return await super().put(key, value)

    async def txn(self, compare: list[Any], success: list[Any], failure: Any = None) -> Any:
        self.calls.append(("txn", b""))
        return await super().txn(compare, success, failure)


@pytest.fixture
async def db(etcd: EtcdServer) -> AsyncIterator[tuple[CountingEtcd, Store]]:
    client = CountingEtcd([("127.0.0.1", etcd.client_port)])
    await client.connect()
    try:
        yield client, Store(client)
    finally:
        await client.close()


def _key(n: int) -> str:
    return base64.b64encode(n.to_bytes(32, "big")).decode()


async def _network_with_hosts(
    store: Store, name: str, cidr: str, hosts: int, underlay: str = "192.168.{n}.5/24"
) -> tuple[str, str]:
    net = await store.create_network(NetworkCreate(name=name, cidr=cidr))
    token = await store.create_token(net.id, TokenCreate())
    for n in range(hosts):
        req = JoinRequest(
            token=token.token,
            hostname=f"{name}-{n}",
            public_key=_key(hash((name, n)) % 2**200),
            addresses=[underlay.format(n=n)],
        )
        await store.join(req, "198.51.100.1")
    return net.id, token.token


async def test_list_hosts_reads_neither_other_networks_nor_known_hosts_again(db) -> None:
    etcd, store = db
    net, _ = await _network_with_hosts(store, "a", "10.70.0.0/24", 12)
    await _network_with_hosts(store, "b", "10.71.0.0/24", 12, "192.168.{n}.6/24")
    etcd.reset()
    first = await store.list_hosts(net)
    assert len(first) == 12 and all(h.created_at for h in first)
    assert etcd.reads_of(ks.prefix("hosts")) == 0, "every host of every network was read"
    assert len(etcd.calls) == 3, etcd.calls  # peers, liveness, the new hosts' records
    etcd.reset()
    again = await store.list_hosts(net)
    assert [h.created_at for h in again] == [h.created_at for h in first]
    assert [c for c, _ in etcd.calls] == ["get_prefix", "get_prefix"], etcd.calls


async def test_list_tokens_counts_uses_in_one_call_not_one_per_token(db) -> None:
    etcd, store = db
    net, _ = await _network_with_hosts(store, "c", "10.72.0.0/24", 2)
    for _ in range(15):
        await store.create_token(net, TokenCreate(max_uses=3))
    etcd.reset()
    listed = await store.list_tokens(net)
    assert len(listed) == 16 and sorted(t.uses for t in listed)[-1] == 2
    assert len(etcd.calls) == 2, etcd.calls


async def test_network_creation_reads_only_the_hosts_changed_since_last_time(db) -> None:
    etcd, store = db
    _, token = await _network_with_hosts(store, "d", "10.73.0.0/24", 20)
    await store.create_network(NetworkCreate(name="e", cidr="10.74.0.0/24"))
    etcd.reset()
    await store.create_network(NetworkCreate(name="f", cidr="10.75.0.0/24"))
    assert etcd.reads_of(ks.prefix("peers")) == 0, "all peers of all networks read again"
    assert max(etcd.returned, default=0) <= 3, etcd.returned  # networks only
    # A host that joined since is seen: its subnet is taken …
    req = JoinRequest(
        token=token, hostname="late", public_key=_key(999), addresses=["172.20.9.5/24"]
    )
    late = (await store.join(req, "198.51.100.1")).peer
    with pytest.raises(ApiError) as clash:
        await store.create_network(NetworkCreate(name="g", cidr="172.20.9.0/24"))
    assert clash.value.code == "cidr_overlaps_underlay"
    # … and free again once it left.
    await store.leave(late.id)
    await store.create_network(NetworkCreate(name="g", cidr="172.20.9.0/24"))


async def test_the_audit_listing_reads_only_what_it_returns(db) -> None:
    etcd, _ = db
    audit = AuditLog(etcd)
    for n in range(40):
        await audit.record("admin", "POST", f"/v1/x/{n}", 201, "127.0.0.1")
    etcd.reset()
    recent, _ = await audit.recent(5)
    assert [e["path"] for e in recent] == [f"/v1/x/{n}" for n in range(39, 34, -1)]
    assert etcd.returned == [5], etcd.returned


async def test_a_new_hosts_join_is_one_etcd_call(db) -> None:
    etcd, store = db
    _, token = await _network_with_hosts(store, "j", "10.76.0.0/24", 1)  # caches warm
    etcd.reset()
    req = JoinRequest(token=token, hostname="one-more", public_key=_key(4242))
    await store.join(req, "198.51.100.1")
    assert etcd.calls == [("txn", b"")], etcd.calls


async def test_audit_entries_recorded_together_are_one_write(db) -> None:
    etcd, _ = db
    audit = AuditLog(etcd)
    await audit.record("admin", "POST", "/v1/first", 201, "127.0.0.1")  # takes the lease
    etcd.reset()
    await asyncio.gather(
        *(audit.record("admin", "POST", f"/v1/x/{n}", 201, "127.0.0.1") for n in range(30))
    )
    assert etcd.calls == [("txn", b"")], etcd.calls
    recent, _ = await audit.recent(100)
    assert len(recent) == 31


def test_a_free_slot_is_found_without_listing_every_slot() -> None:
    rng = random.Random(1)
    assert tokens.pick_slot(10**18, set(), rng) is not None
    assert tokens.pick_slot(10**18, {1, 2, 3}, rng) not in {1, 2, 3}
    assert tokens.pick_slot(5, {0, 1, 3, 4}, rng) == 2
    assert tokens.pick_slot(3, {0, 1, 2}, rng) is None
    taken = set(range(1000)) - {777}
    assert tokens.pick_slot(1000, taken, rng) == 777


async def test_the_group_reconciler_follows_a_watch_instead_of_rescanning(db) -> None:
    etcd, store = db
    groups = GroupStore(etcd, store, Drivers({}))
    reconciler = Reconciler(groups, store, "http://127.0.0.1:9")
    member = GroupMember(driver="nope", region="r1")

    async def put_group(name: str, state: str, deleting: bool = False) -> None:
        group = Group(
            name=name,
            network=name,
            members=[member],
            created_at=time.time(),
            deleting=deleting,
        )
        vm = Vm(name=f"{name}-1", group=name, driver="nope", region="r1", state=state)
        await etcd.txn(
            [],
            [
                tx.Put(
                    ks.group(name),
                    group.model_dump_json(exclude={"state", "counts", "vms"}).encode(),
                ),
                tx.Put(ks.vm(name, vm.name), vm.model_dump_json(exclude={"overlay_ip"}).encode()),
            ],
        )

    await put_group("idle", "Running")
    task = asyncio.create_task(reconciler.run())
    try:
        await asyncio.sleep(3.5)
        # The old loop read every group and every VM each second.
        assert etcd.reads_of(ks.prefix("groups")) == 1, etcd.calls
        assert etcd.reads_of(ks.prefix("vms")) == 1, etcd.calls
        # Work still starts at once: a new VM to create (its driver is unknown: Failed) …
        await put_group("new", "Creating")
        for _ in range(100):
            found = await groups.vm("new", "new-1")
            if found and found[0].state == "Failed":
                break
            await asyncio.sleep(0.05)
        assert found and found[0].state == "Failed" and "nope" in (found[0].error or ""), found
        # … and a deleted group whose VMs are all gone is removed.
        await put_group("gone", "Terminated", deleting=True)
        for _ in range(100):
            if await etcd.get(ks.group("gone")) is None:
                break
            await asyncio.sleep(0.05)
        assert await etcd.get(ks.group("gone")) is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert json.loads((await etcd.get(ks.group("idle"))).value)["name"] == "idle"


# --- telemetry out of etcd ---------------------------------------------------------------


def etcd_revision(server: EtcdServer) -> int:
    """etcd's revision: it grows by one with every write (put, delete, transaction)."""
    r = httpx.post(f"{server.url}/v3/kv/range", json={"key": "Lw=="}, timeout=10)
    return int(r.json()["header"]["revision"])


def test_status_traffic_writes_nothing_to_etcd_beyond_liveness(
    etcd: EtcdServer, metrics_controller: Controller, mosquitto: Mosquitto, make_collector
) -> None:
    collector = make_collector()
    hosts = 12
    with metrics_controller.client() as admin:
        make_network(admin, "tele", cidr="10.76.0.0/24")
        token = make_token(admin, "tele")
    joined = {f"vm{n}": join(metrics_controller, token, f"vm{n}").json() for n in range(hosts)}
    for name, host in joined.items():  # credentials first: they are etcd writes of their own
        publish_health(metrics_controller, mosquitto, "tele", host, name, {})
    before = etcd_revision(etcd)
    for name, host in joined.items():
        with metrics_controller.client(token=host["credential"]) as c:
            for _ in range(3):  # a host heartbeating faster than it should
                assert c.post(f"/v1/hosts/{host['host_id']}/heartbeat", json={}).status_code == 200
            # An agent of the old kind still posting its per-peer status: refused, not stored.
            r = c.post(f"/v1/hosts/{host['host_id']}/status", json={"peers": []})
            assert r.status_code == 410 and r.json()["error"] == "gone"
        ok = {"handshake_age_s": 3.0, "latency_ms": 1.0}
        publish_health(
            metrics_controller,
            mosquitto,
            "tele",
            host,
            name,
            dict.fromkeys(set(joined) - {name}, ok),
        )
    # One liveness write per host, however often it reported (the old path: one per
    # heartbeat and one per status report).
    assert etcd_revision(etcd) - before == hosts

    def complete() -> dict | None:
        with collector.client() as c:
            seen = c.get("/v1/networks/tele/pairs").json()["hosts"]
        return (
            seen
            if len(seen) == hosts and all(len(h["peers"]) == hosts - 1 for h in seen.values())
            else None
        )

    pairs = wait_until(complete, 20, what="every host's pair health at the collector")
    assert all(
        p["latency_ms"] == pytest.approx(1.0) for h in pairs.values() for p in h["peers"].values()
    )
