"""Every read-then-write of the controller's store is guarded: against a real etcd, a
second writer changes what the first one read, between its read and its write, and
nothing is lost, released twice or counted wrong.

The interleaving is forced, not hoped for: ``InterleavingEtcd`` runs the competing
operation just before the first write that touches a chosen key, that is after the
operation under test has read what it writes from.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aetcd import transactions as tx

from cladnet import keys
from cladnet.models import (
    EndpointsUpdate,
    Heartbeat,
    JoinRequest,
    Network,
    NetworkCreate,
    Peer,
    TokenCreate,
)
from controller import keyspace as ks
from controller.errors import ApiError
from controller.etcd import Etcd
from controller.store import Store
from lab.components import Etcd as EtcdServer

OBSERVED = "198.51.100.7"
MOVED = "203.0.113.9"


class InterleavingEtcd(Etcd):
    """An etcd client that runs a competitor once, just before the first write (a put,
    or a transaction whose success branch puts or deletes) of a key under ``prefix``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefix = b""
        self._competitor: Callable[[], Awaitable[Any]] | None = None
        self.competitor_result: Any = None

    def before_write(self, prefix: bytes, competitor: Callable[[], Awaitable[Any]]) -> None:
        """Run ``competitor`` before the next write of a key starting with ``prefix``."""
        self._prefix, self._competitor = prefix, competitor

    async def _interleave(self, ops: list[Any]) -> None:
        writes = [op for op in ops if isinstance(op, tx.Put | tx.Delete)]
        if self._competitor is None or not any(op.key.startswith(self._prefix) for op in writes):
            return
        # Cleared first: the competitor's own writes must not run it again.
        competitor, self._competitor = self._competitor, None
        self.competitor_result = await competitor()

    async def put(self, key: bytes, value: bytes) -> Any:
        await self._interleave([tx.Put(key, value)])
        return await super().put(key, value)

    async def txn(self, compare: list[Any], success: list[Any], failure: Any = None) -> Any:
        await self._interleave(success)
        return await super().txn(compare, success, failure)


@pytest.fixture
async def db(etcd: EtcdServer) -> AsyncIterator[tuple[InterleavingEtcd, Store]]:
    client = InterleavingEtcd([("127.0.0.1", etcd.client_port)])
    await client.connect()
    try:
        yield client, Store(client)
    finally:
        await client.close()


async def _network(store: Store, cidr: str = "10.80.0.0/24", **token: Any) -> tuple[Network, str]:
    net = await store.create_network(NetworkCreate(name="guards", cidr=cidr, expected_hosts=2))
    created = await store.create_token(net.id, TokenCreate(**token))
    return net, created.token


def _request(token: str, hostname: str, public_key: str | None = None) -> JoinRequest:
    return JoinRequest(
        token=token,
        hostname=hostname,
        public_key=public_key or keys.generate_keypair()[1],
        listen_port=51820,
        addresses=["192.168.7.5/24"],
    )


async def _join(store: Store, token: str, hostname: str, public_key: str | None = None) -> Peer:
    return (await store.join(_request(token, hostname, public_key), OBSERVED)).peer


async def _value(etcd: Etcd, key: bytes) -> bytes | None:
    kv = await etcd.get(key)
    return None if kv is None else bytes(kv.value)


async def _liveness(etcd: Etcd, peer: Peer) -> dict[str, Any]:
    value = await _value(etcd, ks.liveness(peer.network_id, peer.id))
    assert value is not None
    return dict(json.loads(value))


async def test_a_heartbeat_keeps_the_address_change_an_endpoint_update_wrote(db) -> None:
    etcd, store = db
    net, token = await _network(store)
    peer = await _join(store, token, "web")
    live = ks.liveness(net.id, peer.id)
    moved_at = time.time()
    # The heartbeat has read the liveness record; the agent's endpoint update (its public
    # address moved) writes public_address_changed_at before the heartbeat writes.
    etcd.before_write(live, lambda: store.update_endpoints(peer.id, EndpointsUpdate(), MOVED))
    await store.heartbeat(peer.id, Heartbeat(), OBSERVED)
    assert etcd.competitor_result is not None, "the endpoint update did not run in between"
    record = await _liveness(etcd, peer)
    assert record.get("public_address_changed_at", 0) >= moved_at, record
    assert record["last_seen"] >= moved_at, record


async def test_an_endpoint_update_keeps_the_last_seen_a_heartbeat_wrote(db) -> None:
    etcd, store = db
    net, token = await _network(store)
    peer = await _join(store, token, "web")
    live = ks.liveness(net.id, peer.id)
    before = time.time()
    etcd.before_write(live, lambda: store.heartbeat(peer.id, Heartbeat(), MOVED))
    await store.update_endpoints(peer.id, EndpointsUpdate(), MOVED)
    assert etcd.competitor_result is not None, "the heartbeat did not run in between"
    record = await _liveness(etcd, peer)
    # The join wrote last_seen before `before`: the heartbeat's is newer and must stay.
    assert record["last_seen"] >= before, record
    assert record.get("public_address_changed_at", 0) >= before, record


async def test_a_stale_leave_releases_nothing_of_the_host_that_took_the_same_name_ip_and_key(
    db,
) -> None:
    etcd, store = db
    # A /30 holds two hosts: with both taken, the next join gets the address freed.
    net, token = await _network(store, cidr="10.80.1.0/30")
    key = keys.generate_keypair()[1]
    gone = await _join(store, token, "web", key)
    await _join(store, token, "db")

    async def leave_and_rejoin_as_new() -> Peer:
        await store.leave(gone.id)
        # The same machine joins again as a new host: same name, key and (full) address.
        return await _join(store, token, "web", key)

    etcd.before_write(ks.peer(net.id, gone.id), leave_and_rejoin_as_new)
    with pytest.raises(ApiError) as second:
        await store.leave(gone.id)
    assert second.value.status == 404, second.value
    new: Peer = etcd.competitor_result
    assert (new.name, new.overlay_ip, new.public_key) == (gone.name, gone.overlay_ip, key)
    owned = {
        "ip": ks.ip(net.id, new.overlay_ip),
        "hostname": ks.hostname(net.id, "web"),
        "public key": ks.public_key(net.id, keys.key_to_hex(key)),
    }
    for what, index in owned.items():
        assert await _value(etcd, index) == new.id.encode(), f"{what} released twice"
    for record in (ks.peer(net.id, new.id), ks.host(new.id), ks.liveness(net.id, new.id)):
        assert await _value(etcd, record) is not None, record
    assert sorted(p.name for p in (await store.list_peers(net.id))[0]) == ["db", "web"]


async def test_two_concurrent_leaves_of_one_host_one_succeeds_the_other_is_not_found(db) -> None:
    etcd, store = db
    net, token = await _network(store)
    peer = await _join(store, token, "web")
    results = await asyncio.gather(
        store.leave(peer.id), store.leave(peer.id), return_exceptions=True
    )
    left = [r for r in results if isinstance(r, Peer)]
    refused = [r for r in results if isinstance(r, ApiError)]
    assert len(left) == 1 and len(refused) == 1, results
    assert refused[0].status == 404
    for kind in ("ips", "hostnames", "public-keys", "liveness", "peers"):
        assert await etcd.counts([ks.prefix(kind, net.id)]) == [0], kind


async def test_a_join_whose_token_is_revoked_meanwhile_is_refused_and_counts_no_use(db) -> None:
    etcd, store = db
    net, token = await _network(store)
    [listed] = await store.list_tokens(net.id)
    # The join has checked the token; the admin revokes it before the join writes.
    etcd.before_write(ks.prefix("hosts"), lambda: store.revoke_token(net.id, listed.id))
    with pytest.raises(ApiError) as refused:
        await _join(store, token, "web")
    assert refused.value.status == 401, refused.value
    assert await etcd.counts([ks.prefix("token-uses", listed.id), ks.prefix("hosts")]) == [0, 0]
    assert (await store.list_peers(net.id))[0] == []


async def test_a_token_or_network_gone_through_another_replica_refuses_a_cached_join(
    db, etcd: EtcdServer
) -> None:
    """A replica keeps join token and network records it read; what another replica
    revoked or deleted since still refuses the join there (the transaction compares
    their revisions), and nothing is written."""
    client, store = db
    other = Etcd([("127.0.0.1", etcd.client_port)])
    await other.connect()
    try:
        replica = Store(other)
        net, token = await _network(store)
        await _join(store, token, "first")  # this replica has the token and network cached
        [listed] = await store.list_tokens(net.id)
        await replica.revoke_token(net.id, listed.id)
        with pytest.raises(ApiError) as refused:
            await _join(store, token, "after-revoke")
        assert (refused.value.status, refused.value.code) == (401, "invalid_token")

        second = await replica.create_token(net.id, TokenCreate())
        await _join(store, second.token, "second")
        await replica.delete_network(net.id, force=True)
        with pytest.raises(ApiError) as gone:
            await _join(store, second.token, "after-delete")
        assert (gone.value.status, gone.value.code) == (401, "invalid_token")
        assert await client.counts([ks.prefix("hosts"), ks.prefix("token-uses")]) == [0, 0]
    finally:
        await other.close()


async def test_a_limited_token_used_up_meanwhile_refuses_the_join_and_counts_right(db) -> None:
    etcd, store = db
    net, token = await _network(store, max_uses=2)

    async def use_up() -> list[Peer]:
        return [await _join(store, token, "a"), await _join(store, token, "b")]

    etcd.before_write(ks.prefix("hosts"), use_up)
    with pytest.raises(ApiError) as refused:
        await _join(store, token, "c")
    assert (refused.value.status, refused.value.code) == (403, "token_exhausted")
    assert [t.uses for t in await store.list_tokens(net.id)] == [2]
    assert sorted(p.name for p in (await store.list_peers(net.id))[0]) == ["a", "b"]


async def test_tags_and_an_endpoint_update_written_in_between_both_survive(db) -> None:
    etcd, store = db
    net, token = await _network(store)
    peer = await _join(store, token, "web")
    update = EndpointsUpdate(addresses=["192.168.9.9/24"], endpoints=["192.0.2.1:51820"])
    etcd.before_write(
        ks.peer(net.id, peer.id), lambda: store.update_endpoints(peer.id, update, OBSERVED)
    )
    tagged = await store.set_tags(peer.id, ["db"])
    assert etcd.competitor_result is not None
    assert (tagged.tags, tagged.addresses, tagged.endpoints) == (
        ["db"],
        ["192.168.9.9/24"],
        ["192.0.2.1:51820"],
    )


async def test_a_heartbeat_racing_a_leave_leaves_no_orphaned_liveness_record(db) -> None:
    etcd, store = db
    net, token = await _network(store)
    peer = await _join(store, token, "web")
    etcd.before_write(ks.liveness(net.id, peer.id), lambda: store.leave(peer.id))
    with pytest.raises(ApiError) as gone:
        await store.heartbeat(peer.id, Heartbeat(), OBSERVED)
    assert gone.value.status == 404, gone.value
    assert await etcd.counts([ks.prefix("liveness", net.id), ks.prefix("peers", net.id)]) == [0, 0]


async def test_a_moved_public_address_forgets_the_hosts_nat_sightings(db) -> None:
    """The relays' sightings of a host's NAT mapping were at its old public address: a
    heartbeat from a new one clears them (its pairs then take their relays, which see
    the new mapping), and an unchanged address keeps them."""
    etcd, store = db
    net, token = await _network(store)
    peer = await _join(store, token, "web")
    key = ks.peer(net.id, peer.id)
    seen = [{"endpoint": f"{OBSERVED}:51820", "observer": "r1:40000", "observed_at": 1.0}]
    record = json.loads(await _value(etcd, key) or b"{}")
    await etcd.put(key, json.dumps({**record, "reflexive": seen, "mapping_varies": True}).encode())
    kept, _ = await store.heartbeat(peer.id, Heartbeat(), OBSERVED)
    assert kept.reflexive == seen and kept.mapping_varies
    moved, changed = await store.heartbeat(peer.id, Heartbeat(), MOVED)
    assert changed and moved.public_address == MOVED
    assert moved.reflexive == [] and moved.mapping_varies is False
