"""The controller's state in etcd: networks, join tokens, hosts, peers — one module per
concept, composed here into the ``Store`` the API and the services use.

- :mod:`~controller.store.txn` — the compare-and-swap retry loop every guarded write uses;
- :mod:`~controller.store.networks` — networks, their CIDRs and the underlay cache;
- :mod:`~controller.store.tokens` — join tokens and their uses;
- :mod:`~controller.store.joins` — joins, re-joins, key challenges, the address hint;
- :mod:`~controller.store.hosts` — credentials, peer updates, heartbeats, leaving;
- :mod:`~controller.store.publickeys` — the one-host-per-key index;
- :mod:`~controller.store.liveness` — last seen / address moved, apart from the peers;
- :mod:`~controller.store.listing` — peers and hosts as read views.

Every write that depends on what was read is one etcd transaction comparing what it
read: ``create_revision == 0`` for a key that must not exist yet (a name, an overlay
IP, a key, a token slot), ``mod_revision`` for a record that must not have changed (a
peer, a host record, a liveness record, a token, a key's owner), or "nothing in this
range changed since" (a network CIDR must not overlap another). Losers of a race
re-read and retry (:func:`~controller.store.txn.retry`); nothing is read-then-written
without a guard. The only writes without a compare are deletions that take whatever
is there: the chunks a network deletion removes before its own guarded last one.
"""

from __future__ import annotations

from typing import Any

from cladnet.models import (
    AddressSpaces,
    ChallengeRequest,
    ChallengeResponse,
    EndpointsUpdate,
    Heartbeat,
    Host,
    JoinRequest,
    JoinToken,
    JoinTokenCreated,
    Network,
    NetworkCreate,
    Peer,
    TokenCreate,
)
from controller.etcd import Etcd
from controller.store import publickeys
from controller.store.hosts import Credential, Hosts
from controller.store.joins import AddressHints, Joined, Joins
from controller.store.listing import Listing
from controller.store.liveness import Liveness
from controller.store.networks import Networks
from controller.store.tokens import Tokens

__all__ = ["Credential", "Joined", "Store"]


class Store:
    """All controller reads and writes to etcd: the parts, and one call for each use."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.tokens = Tokens(etcd)
        self.networks = Networks(etcd, self.tokens)
        self.addresses = AddressHints(etcd)
        self.liveness = Liveness(etcd)
        self.joins = Joins(etcd, self.networks, self.tokens, self.addresses)
        self.hosts = Hosts(etcd, self.networks, self.liveness, self.addresses)
        self.listing = Listing(etcd, self.hosts)

    # --- networks -----------------------------------------------------------------------

    async def list_networks(self) -> tuple[list[Network], int]:
        """All networks and the etcd revision they were read at."""
        return await self.networks.all()

    async def get_network(self, ref: str) -> Network:
        """A network by id or by name."""
        return await self.networks.get(ref)

    async def address_spaces(self, hosts: int) -> AddressSpaces:
        """Free RFC 1918 space grouped by block, and one recommended prefix for ``hosts``."""
        return await self.networks.address_spaces(hosts)

    async def create_network(self, req: NetworkCreate) -> Network:
        """Create a network; the name is unique and the CIDR overlaps nothing in use."""
        return await self.networks.create(req)

    async def delete_network(self, ref: str, force: bool) -> Network:
        """Delete a network; one with hosts needs ``force`` and takes its hosts with it."""
        return await self.networks.delete(ref, force)

    # --- join tokens --------------------------------------------------------------------

    async def create_token(self, net_ref: str, req: TokenCreate) -> JoinTokenCreated:
        """A new join token of a network (by id or name)."""
        return await self.tokens.create(await self.networks.get(net_ref), req)

    async def list_tokens(self, net_id: str) -> list[JoinToken]:
        """The network's join tokens with their use counts."""
        return await self.tokens.of_network(net_id)

    async def revoke_token(self, net_ref: str, token_id: str) -> None:
        """Delete a join token of a network (by id or name)."""
        await self.tokens.revoke(await self.networks.get(net_ref), token_id)

    async def delete_expired_tokens(self, now: float) -> int:
        """Remove join tokens past their expiry (and their use records); returns how many."""
        return await self.tokens.delete_expired(now)

    # --- joining ------------------------------------------------------------------------

    async def join(
        self, req: JoinRequest, observed: str, vouched_host: str | None = None
    ) -> Joined:
        """Register a new host, or re-join an existing one (see :meth:`Joins.join`)."""
        return await self.joins.join(req, observed, vouched_host)

    async def challenge(self, req: ChallengeRequest) -> ChallengeResponse:
        """A key challenge for the holder of a registered key in the token's network."""
        return await self.joins.challenge(req)

    async def index_public_keys(self) -> int:
        """Index the keys of hosts that joined before keys were unique; how many added."""
        return await publickeys.index_public_keys(self.etcd)

    # --- hosts --------------------------------------------------------------------------

    async def authenticate_host(self, token: str) -> Credential | None:
        """The host a ``clh_`` credential belongs to, or None."""
        return await self.hosts.authenticate(token)

    async def heartbeat(self, host_id: str, req: Heartbeat, observed: str) -> tuple[Peer, bool]:
        """Record liveness; update the peer only when an address moved."""
        return await self.hosts.heartbeat(host_id, req, observed)

    async def update_endpoints(self, host_id: str, req: EndpointsUpdate, observed: str) -> Peer:
        """The agent's report of its addresses, port, key and endpoints."""
        return await self.hosts.update_endpoints(host_id, req, observed)

    async def set_tags(self, host_id: str, tags: list[str]) -> Peer:
        """Replace a host's tags (an admin's call: policies trust them)."""
        return await self.hosts.set_tags(host_id, tags)

    async def leave(self, host_id: str) -> Peer:
        """Remove a host and release its overlay IP, hostname and key."""
        return await self.hosts.leave(host_id)

    async def host_ids(self) -> set[str]:
        """Every host of every network (what may keep a broker user)."""
        return await self.hosts.ids()

    # --- listing ------------------------------------------------------------------------

    async def list_peers(self, net_id: str) -> tuple[list[Peer], int]:
        """The network's peers and the revision they were read at."""
        return await self.listing.peers(net_id)

    async def list_peers_and_policy(self, net_id: str) -> tuple[list[Peer], Any, int]:
        """The peers, the policy's KV (None if never written) and the revision: one read."""
        return await self.listing.peers_and_policy(net_id)

    async def list_hosts(self, net_id: str, peers: list[Peer] | None = None) -> list[Host]:
        """The network's hosts (``peers``: only these of them) with liveness and creation time."""
        return await self.listing.hosts_of(net_id, peers)

    async def get_host(self, host_id: str) -> Host:
        """One host with liveness and creation time."""
        return await self.listing.host(host_id)
