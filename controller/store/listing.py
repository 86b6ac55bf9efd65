"""Reading a network's peers and hosts (peers with liveness and creation time)."""

from __future__ import annotations

import json
from typing import Any

from cladnet.models import Host, Peer
from controller import keyspace as ks
from controller.etcd import Etcd
from controller.store.hosts import Hosts


class Listing:
    """Read-only views of a network's members."""

    def __init__(self, etcd: Etcd, hosts: Hosts) -> None:
        self.etcd, self.hosts = etcd, hosts
        # Hosts' creation times (never change) by network: list_hosts reads the host
        # records of new hosts only, not every host of every network.
        self._created: dict[str, dict[str, float]] = {}

    async def peers(self, net_id: str) -> tuple[list[Peer], int]:
        """The network's peers and the revision they were read at."""
        peers, _, revision = await self.peers_and_policy(net_id)
        return peers, revision

    async def peers_and_policy(self, net_id: str) -> tuple[list[Peer], Any, int]:
        """The peers, the policy's KV (None if never written) and the revision: one read."""
        res = await self.etcd.get_prefix(ks.prefix("peers", net_id))
        peers = [Peer.model_validate_json(kv.value) for kv in res if not ks.is_policy(kv.key)]
        policy = next((kv for kv in res if ks.is_policy(kv.key)), None)
        return peers, policy, res.header.revision

    async def hosts_of(self, net_id: str, peers: list[Peer] | None = None) -> list[Host]:
        """The network's hosts (``peers``: only these of them, a page): peers with liveness
        and creation time (two range reads; the host records only of hosts this controller
        has not listed before)."""
        whole = peers is None
        if peers is None:
            peers, _ = await self.peers(net_id)
        live = await self.etcd.get_prefix(ks.prefix("liveness", net_id))
        liveness = {ks.last_segment(kv.key): json.loads(kv.value) for kv in live}
        known = self._created.get(net_id, {})
        created = {p.id: known[p.id] for p in peers if p.id in known}
        missing = [ks.host(p.id) for p in peers if p.id not in known]
        new = await self.etcd.get_many(missing) if missing else {}
        for value in new.values():
            record = json.loads(value)
            created[record["id"]] = record["created_at"]
        if whole:  # drops the removed hosts
            self._created[net_id] = created
        else:
            self._created.setdefault(net_id, {}).update(created)
        return [
            Host(
                **p.model_dump(),
                created_at=created.get(p.id, p.updated_at),
                **{k: v for k, v in liveness.get(p.id, {}).items() if k in Host.model_fields},
            )
            for p in peers
        ]

    async def host(self, host_id: str) -> Host:
        """One host: its peer record with liveness and creation time."""
        host, peer_kv = await self.hosts.load(host_id)
        peer = Peer.model_validate_json(peer_kv.value)
        kv = await self.etcd.get(ks.liveness(peer.network_id, host_id))
        live = json.loads(kv.value) if kv is not None else {}
        return Host(
            **peer.model_dump(),
            created_at=host["created_at"],
            **{k: v for k, v in live.items() if k in Host.model_fields},
        )
