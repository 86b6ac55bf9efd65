"""Hosts named the way people name them: by id (``h-…``) or by name, in any network."""

from __future__ import annotations

import difflib
from typing import Any

from cladnet.api_client import ApiClientError, SyncClient
from cladnet.api_client import endpoints as ep
from cladnet.cli.api import CliError


def pick_host(ref: str, hosts_by_network: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The one host whose id or name is ``ref``; a ``CliError`` that says what to do
    when none is (with the closest names) or several networks have that name."""
    found = [
        (network, h)
        for network, hosts in hosts_by_network.items()
        for h in hosts
        if ref in (h["id"], h["name"])
    ]
    if len(found) == 1:
        return found[0][1]
    if found:
        networks = ", ".join(sorted(n for n, _ in found))
        ids = ", ".join(f"{h['id']} ({n})" for n, h in sorted(found, key=lambda f: f[0]))
        raise CliError(
            f"host {ref!r} is in several networks ({networks}): add --network NAME, "
            f"or name it by id: {ids}"
        )
    names = sorted({h["name"] for hosts in hosts_by_network.values() for h in hosts})
    close = difflib.get_close_matches(ref, names, n=3, cutoff=0.5)
    where = f" in network {next(iter(hosts_by_network))}" if len(hosts_by_network) == 1 else ""
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CliError(f"no host named {ref!r}{where}{hint}")


def find_host(api: SyncClient, ref: str, network: str | None = None) -> dict[str, Any]:
    """A host by id or name (within ``network`` when given), as ``GET /v1/hosts/{id}``."""
    if ref.startswith("h-") and network is None:
        try:
            return api.call(ep.HOST, host_id=ref)
        except ApiClientError:
            pass  # not an id after all: a name that looks like one
    nets = [api.call(ep.NETWORK, ref=network)] if network else api.call(ep.NETWORKS)
    by_network = {n["name"]: api.call(ep.NETWORK_HOSTS, ref=n["id"]) for n in nets}
    picked = pick_host(ref, by_network)
    return api.call(ep.HOST, host_id=picked["id"])
