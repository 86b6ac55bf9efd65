"""One network's names on this host: the DNS server and the host resolver's setup.

The daemon calls :meth:`Names.refresh` after an applied change of the peers' names or
overlay IPs (or of which peers there are), :meth:`Names.retry` after other changes (it
acts only when the last attempt failed, at most every ``RETRY_EVERY`` seconds),
:meth:`Names.remove` when the host leaves, :meth:`Names.close` when it stops. What is
in use is saved as ``dns.json`` in the network's state directory, for
``cladnet-agent status`` and for ``leave`` to undo it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent import resolver_setup
from agent.dns import PORT, DnsServer
from agent.state import Membership
from cladnet import dns

log = logging.getLogger("cladnet.agent.dns")

STATUS_FILE = "dns.json"
# A failed server start or resolver setup is retried at most this often (seconds)
# between rebuilds: a change that renames nothing must not pay for it every time.
RETRY_EVERY = 5.0


def read_status(net_dir: Path) -> dict[str, Any] | None:
    """The saved DNS status of a network directory, or None."""
    try:
        data = json.loads((net_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def undo(net_dir: Path, iface: str) -> None:
    """Remove what a (possibly stopped) agent set up for this network (``leave``)."""
    status = read_status(net_dir)
    if status is None:
        return
    if status.get("mode") == "resolved":
        await resolver_setup.unregister_resolved(iface)
    elif status.get("mode") == "hosts" and status.get("hosts_file"):
        resolver_setup.write_hosts_block(Path(status["hosts_file"]), status["network"], {})


class Names:
    """Keeps the server's zone and the host's resolver equal to the peer state."""

    def __init__(self, net_dir: Path, iface: str, port: int = PORT) -> None:
        self.net_dir = net_dir
        self.iface = iface
        self.port = port
        self.mode = resolver_setup.resolve_mode(resolver_setup.configured_mode())
        self.hosts_file = resolver_setup.hosts_path()
        self.server: DnsServer | None = None
        self.zone: dns.Zone | None = None
        self._applied: tuple[str, ...] | None = None  # what the host resolver has
        self._skipped: tuple[str, ...] = ()
        self._hosts: tuple[dns.Zone, tuple[str, ...]] | None = None  # zone → its hosts lines
        self.error: str | None = None
        self._retry_at = 0.0  # monotonic time before which retry() does nothing

    async def refresh(self, m: Membership, peers: Iterable[dict[str, Any]] | None = None) -> None:
        """Follow ``m``: rebuild the zone, (re)start the server, update the host resolver.

        ``peers``: the peers to name (default: all of ``m.peers``; a policy that leaves
        peers out of the device should leave their names out too). Never raises for DNS
        trouble: the mesh matters more than names; errors are logged, shown in status
        and retried at the next change.
        """
        named = m.peers.values() if peers is None else peers
        zone = dns.build_zone(m.network, [m.me, *named])
        if zone.skipped != self._skipped:
            self._skipped = zone.skipped
            if zone.skipped:
                log.warning("hosts without a DNS name", extra={"hosts": list(zone.skipped)})
        self.zone = zone
        await self._serve(m, zone)

    async def retry(self, m: Membership) -> None:
        """Try again what the last refresh could not do (start the server, set up the
        host resolver), with the zone as it is: no rebuild. Nothing when nothing failed."""
        if self.zone is not None and self.error is not None and time.monotonic() >= self._retry_at:
            await self._serve(m, self.zone)

    async def _serve(self, m: Membership, zone: dns.Zone) -> None:
        ip = str(m.me["overlay_ip"])
        self.error = None
        if self.server is not None and self.server.address != ip:
            await self.server.close()
            self.server = None
        if self.server is None:
            server = DnsServer(zone)
            try:
                await server.start(ip, self.port)
                self.server = server
            except OSError as exc:
                self.error = f"DNS server on {ip}:{self.port}: {exc.strerror or exc!r}"
                log.error("cannot start the DNS server", extra={"error": self.error})
        else:
            self.server.update(zone)
        await self._setup_host(m, zone, ip)
        self._save(m, zone)
        self._retry_at = time.monotonic() + RETRY_EVERY

    async def _setup_host(self, m: Membership, zone: dns.Zone, ip: str) -> None:
        network = str(m.network["name"])
        try:
            if self.mode == "resolved":
                want: tuple[str, ...] = (self.iface, ip, zone.domain)
                if self._applied != want:
                    await resolver_setup.register_resolved(self.iface, ip, zone.domain)
                    self._applied = want
                    log.info("registered with systemd-resolved", extra={"domain": zone.domain})
            elif self.mode == "hosts":
                if self._hosts is None or self._hosts[0] is not zone:
                    self._hosts = (zone, tuple(f"{k}={v}" for k, v in zone.names().items()))
                want = self._hosts[1]
                if self._applied != want:
                    names = zone.names()
                    if resolver_setup.write_hosts_block(self.hosts_file, network, names):
                        log.info("hosts file updated", extra={"path": str(self.hosts_file)})
                    self._applied = want
        except resolver_setup.SetupError as exc:
            self.error = str(exc)
            log.error("cannot set up the host resolver", extra={"error": self.error})

    def _save(self, m: Membership, zone: dns.Zone) -> None:
        status = {
            "network": str(m.network["name"]),
            "name": dns.host_name(str(m.me["name"]), m.network),
            "domain": zone.domain,
            "server": f"{self.server.address}:{self.port}" if self.server else None,
            "mode": self.mode,
            "hosts_file": str(self.hosts_file) if self.mode == "hosts" else None,
            "names": len(zone.records),
            "error": self.error,
        }
        try:
            self.net_dir.mkdir(parents=True, exist_ok=True)
            (self.net_dir / STATUS_FILE).write_text(json.dumps(status))
        except OSError as exc:
            log.error("cannot save DNS status", extra={"error": str(exc)})

    def gauges(self) -> dict[str, float]:
        """The server's counters, for the agent's metric batch."""
        return self.server.gauges() if self.server is not None else {}

    async def remove(self) -> None:
        """This host left: undo the host resolver's setup, stop serving."""
        await undo(self.net_dir, self.iface)
        await self.close()

    async def close(self) -> None:
        """Stop serving; the host resolver keeps pointing here (a restart follows)."""
        if self.server is not None:
            await self.server.close()
            self.server = None
