"""Networks: a unique name, and a CIDR that overlaps no other network and no host's
underlay subnet (checked against a cache of every host's subnets, kept current by
reading only the peers changed since)."""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from aetcd import rpc
from aetcd import transactions as tx

from cladnet import addrspace, ipam, tokens
from cladnet.models import AddressSpaceBlock, AddressSpaces, Network, NetworkCreate
from controller import keyspace as ks
from controller.errors import bad_request, conflict, not_found
from controller.etcd import Etcd, prefix_end
from controller.store.tokens import Tokens
from controller.store.txn import LOST, TXN_CHUNK, Lost, dump, retry

log = logging.getLogger("cladnet.controller.store")

CACHED_NETWORKS = 1024  # network records kept for joins (least recently used go)


def _subnets_of(kv: Any) -> list[ipaddress.IPv4Network]:
    """The underlay subnets of a key under the peers prefix (a policy key has none: it
    is kept, empty, so the key count still matches)."""
    if ks.is_policy(kv.key):
        return []
    addresses = json.loads(kv.value)["addresses"]
    return [ipaddress.ip_interface(a).network for a in addresses]  # type: ignore[misc]


class Networks:
    """Networks in etcd; ``tokens`` are deleted with their network."""

    def __init__(self, etcd: Etcd, tokens: Tokens) -> None:
        self.etcd, self.tokens = etcd, tokens
        # Every host's underlay subnets (peer key → subnets) as of ``_underlay_rev``;
        # network creation brings it up to date with what changed since.
        self._underlay: dict[bytes, list[ipaddress.IPv4Network]] = {}
        self._underlay_rev = 0
        # Network records and their revisions by id, for joins: a record is written
        # once, and a join's transaction compares the revision.
        self._records: OrderedDict[str, tuple[Network, int]] = OrderedDict()

    async def all(self) -> tuple[list[Network], int]:
        """All networks and the etcd revision they were read at."""
        res = await self.etcd.get_prefix(ks.prefix("networks"))
        return [Network.model_validate_json(kv.value) for kv in res], res.header.revision

    async def get(self, ref: str) -> Network:
        """A network by id or by name."""
        kv = await self.etcd.get(ks.network(ref))
        if kv is None:
            by_name = await self.etcd.get(ks.network_name(ref))
            if by_name is not None:
                kv = await self.etcd.get(ks.network(by_name.value.decode()))
        if kv is None:
            raise not_found("network", ref)
        return Network.model_validate_json(kv.value)

    async def for_join(self, net_id: str) -> tuple[Network, int]:
        """A network by id and its record's revision, from a cache: the caller's
        transaction must compare the revision (a deleted network fails it)."""
        cached = self._records.get(net_id)
        if cached is None:
            kv = await self.etcd.get(ks.network(net_id))
            if kv is None:
                raise not_found("network", net_id)
            cached = (Network.model_validate_json(kv.value), kv.mod_revision)
            self._records[net_id] = cached
            if len(self._records) > CACHED_NETWORKS:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(net_id)
        return cached

    def forget(self, net_id: str) -> None:
        """Drop a network's cached record (deleted, or seen changed)."""
        self._records.pop(net_id, None)

    async def _used_cidrs(self) -> tuple[list[Network], list[ipaddress.IPv4Network], int]:
        """Networks, every CIDR in use (networks + hosts' underlay), and the read revision."""
        networks, revision = await self.all()
        used = [ipaddress.IPv4Network(n.cidr) for n in networks]
        for subnets in (await self._underlay_subnets()).values():
            used.extend(subnets)
        return networks, used, revision

    async def _underlay_subnets(self) -> dict[bytes, list[ipaddress.IPv4Network]]:
        """Every host's underlay subnets, read whole only when a host left since last time.

        Peers written since the cached revision come with ``min_mod_revision``; a count
        of all peers tells whether any left (they are then read again, once).
        """
        prefix = ks.prefix("peers")
        if self._underlay_rev:
            # Both at one revision, so an add and a leave in between cannot cancel out.
            (changed, total), revision = await self.etcd.ranges(
                [
                    rpc.RangeRequest(
                        key=prefix,
                        range_end=prefix_end(prefix),
                        min_mod_revision=self._underlay_rev + 1,
                    ),
                    rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix), count_only=True),
                ]
            )
            added = sum(1 for kv in changed.kvs if kv.key not in self._underlay)
            if total.count == len(self._underlay) + added:
                for kv in changed.kvs:
                    self._underlay[kv.key] = _subnets_of(kv)
                self._underlay_rev = revision
                return self._underlay
        res = await self.etcd.get_prefix(prefix)
        self._underlay = {kv.key: _subnets_of(kv) for kv in res}
        self._underlay_rev = res.header.revision
        return self._underlay

    async def address_spaces(self, hosts: int) -> AddressSpaces:
        """Free RFC 1918 space grouped by block, and one recommended prefix for ``hosts``."""
        _, used, _ = await self._used_cidrs()
        plan = addrspace.plan_address_spaces(used, hosts)
        return AddressSpaces(
            hosts=hosts,
            prefix_len=plan.prefix_len,
            recommended=str(plan.recommended) if plan.recommended else None,
            blocks=[
                AddressSpaceBlock(
                    block=str(b.block),
                    free=[str(c) for c in b.free],
                    free_addresses=b.free_addresses,
                )
                for b in plan.blocks
            ],
            used=len(used),
        )

    async def create(self, req: NetworkCreate) -> Network:
        """Create a network; the name is unique and the CIDR overlaps nothing in use."""

        async def attempt() -> Network | Lost:
            networks, used, revision = await self._used_cidrs()
            if any(n.name == req.name for n in networks):
                raise conflict("network_exists", f"a network named {req.name!r} already exists")
            if req.cidr is not None:
                cidr = _check_cidr(req, networks, used)
            else:
                plan = addrspace.plan_address_spaces(used, req.expected_hosts)
                if plan.recommended is None:
                    raise conflict("no_address_space", "no free private address space is left")
                cidr = plan.recommended
            net = Network(
                id=tokens.new_id("n-"),
                name=req.name,
                cidr=str(cidr),
                expected_hosts=req.expected_hosts,
                mtu=req.mtu,
                listen_port=req.listen_port,
                keepalive=req.keepalive,
                metrics_interval=req.metrics_interval,
                dns_zone=req.dns_zone,
                created_at=time.time(),
            )
            nets = ks.prefix("networks")
            ok, _ = await self.etcd.txn(
                compare=[
                    tx.Create(ks.network_name(req.name)) == 0,
                    # No network was created or changed since we checked for overlaps.
                    tx.Mod(nets, prefix_end(nets)) < revision + 1,
                ],
                success=[
                    tx.Put(ks.network(net.id), dump(net)),
                    tx.Put(ks.network_name(net.name), net.id.encode()),
                ],
            )
            if not ok:
                return LOST
            log.info("network created", extra={"network": net.name, "cidr": net.cidr})
            return net

        return await retry(
            "create_network", attempt, "too many concurrent network changes, try again"
        )

    async def delete(self, ref: str, force: bool) -> Network:
        """Delete a network; one with hosts needs ``force`` and takes its hosts with it.

        The network's own keys go last, in one transaction: a deletion cut short (the
        replica killed between chunks) leaves the network in place, and a retry on any
        replica finds what is left and finishes it.
        """
        net = await self.get(ref)
        peers_prefix = ks.prefix("peers", net.id)

        async def attempt() -> Network | Lost:
            peers = await self.etcd.get_prefix(peers_prefix, keys_only=True)
            host_ids = [ks.last_segment(kv.key) for kv in peers if not ks.is_policy(kv.key)]
            if host_ids and not force:
                raise conflict(
                    "network_has_hosts",
                    f"network {net.name} has {len(host_ids)} host(s); delete with force=true",
                )
            # Tokens first: no new join starts while we clean up. These deletions need
            # no compare: they only take away, and the network's own keys stay until
            # the guarded transaction below.
            token_ids = [t.id for t in await self.tokens.of_network(net.id)]
            ops: list[Any] = [tx.Delete(ks.token(t)) for t in token_ids]
            for t in token_ids:
                p = ks.prefix("token-uses", t)
                ops.append(tx.Delete(p, prefix_end(p)))
            ops += [tx.Delete(ks.host(h)) for h in host_ids]
            for i in range(0, len(ops), TXN_CHUNK):
                await self.etcd.txn(compare=[], success=ops[i : i + TXN_CHUNK])
            last: list[Any] = []
            for kind in ("ips", "hostnames", "public-keys", "challenges", "liveness", "peers"):
                p = ks.prefix(kind, net.id)
                last.append(tx.Delete(p, prefix_end(p)))
            last += [tx.Delete(ks.network(net.id)), tx.Delete(ks.network_name(net.name))]
            # Unless a join or re-join already under way wrote a host record meanwhile
            # (it would be orphaned): it changed a peer too, so then round again.
            ok, _ = await self.etcd.txn(
                compare=[
                    tx.Mod(peers_prefix, prefix_end(peers_prefix)) < peers.header.revision + 1
                ],
                success=last,
            )
            if not ok:
                return LOST
            self.forget(net.id)
            for t in token_ids:
                self.tokens.forget(t)
            log.info("network deleted", extra={"network": net.name, "hosts": len(host_ids)})
            return net

        return await retry("delete_network", attempt, "too many concurrent joins, try again")


def _check_cidr(
    req: NetworkCreate, networks: list[Network], used: list[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network:
    """The requested CIDR, or 409/400: it overlaps a network or an underlay, or is too small."""
    assert req.cidr is not None  # NetworkCreate checked it is a private IPv4 CIDR
    cidr = ipaddress.IPv4Network(req.cidr)
    for net in networks:
        if cidr.overlaps(ipaddress.IPv4Network(net.cidr)):
            raise conflict(
                "cidr_overlaps_network", f"{cidr} overlaps network {net.name} ({net.cidr})"
            )
    clash = addrspace.find_overlap(cidr, used)
    if clash is not None:
        raise conflict(
            "cidr_overlaps_underlay",
            f"{cidr} overlaps the underlay subnet {clash} of a registered host",
        )
    if ipam.capacity(cidr) < req.expected_hosts:
        raise bad_request(
            "cidr_too_small",
            f"{cidr} holds {ipam.capacity(cidr)} hosts, "
            f"fewer than the expected {req.expected_hosts}",
        )
    return cidr
