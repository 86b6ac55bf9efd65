"""What the agent keeps on disk so it can restore its tunnels without the controller.

<state_dir>/networks/<network_id>/
    membership.json   controller URL, host id, interface, network, self, peers, revision
    credential        the per-host controller credential (0600)
    private.key       the WireGuard private key (0600) — never sent anywhere
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cladnet.files import write_atomic

log = logging.getLogger("cladnet.agent")


def write_private(path: Path, text: str) -> None:
    """Write a secret atomically with mode 0600 (created so, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, text)


@dataclass
class Membership:
    """One joined network, as last known."""

    controller: str
    host_id: str
    interface: str
    network: dict[str, Any]
    me: dict[str, Any]
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    revision: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    backend: str | None = None
    # Broker URL, per-host user/password, topic, interval; {} = no broker configured.
    metrics: dict[str, Any] | None = None
    # The controller CA pinned at join (PEM file in the network's dir), if TLS.
    ca_file: str | None = None
    # Run the group's remote commands (``join --allow-commands``); off unless asked.
    allow_commands: bool = False
    # How the controller last treated this host (agent.standing), and since when.
    controller_state: str = "ok"
    controller_state_since: float | None = None
    # The network's access policy as the controller sent it ({"version", "document"});
    # None until one arrives (a controller without policies): then no packet filter.
    policy: dict[str, Any] | None = None

    @property
    def policy_version(self) -> int | None:
        return None if self.policy is None else self.policy.get("version")

    @property
    def network_id(self) -> str:
        return str(self.network["id"])


class StateDir:
    """The agent's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _net(self, network_id: str) -> Path:
        return self.root / "networks" / network_id

    def network_ids(self) -> list[str]:
        base = self.root / "networks"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "membership.json").exists())

    def load(self, network_id: str) -> tuple[Membership, str, str]:
        """Membership, credential and private key of a joined network.

        Secrets readable by others are tightened back to 0600 (and said so): a key
        that leaked cannot be un-leaked, but it must not stay exposed.
        """
        d = self._net(network_id)
        for path, mode in (
            (self.root, 0o700),
            (d, 0o700),
            (d / "private.key", 0o600),
            (d / "credential", 0o600),
            (d / "membership.json", 0o600),
        ):
            if path.exists() and path.stat().st_mode & 0o077 & ~mode:
                log.warning("tightening permissions", extra={"path": str(path)})
                path.chmod(mode)
        membership = Membership(**json.loads((d / "membership.json").read_text()))
        return (
            membership,
            (d / "credential").read_text().strip(),
            (d / "private.key").read_text().strip(),
        )

    def save(self, membership: Membership) -> None:
        """Write the whole membership atomically (one snapshot: peers and their revision).

        Serialised straight from the live objects, without ``asdict``'s deep copy (at
        thousands of peers that copy cost more than the JSON).
        """
        record = {f.name: getattr(membership, f.name) for f in fields(membership)}
        write_private(self._net(membership.network_id) / "membership.json", json.dumps(record))

    def save_ca(self, network_id: str, pem: str) -> str:
        """Pin the controller's CA for this network; returns the file's path."""
        path = self._net(network_id) / "ca.crt"
        write_private(path, pem)
        return str(path)

    def save_secrets(self, network_id: str, credential: str, private_key: str) -> None:
        d = self._net(network_id)
        write_private(d / "credential", credential + "\n")
        write_private(d / "private.key", private_key + "\n")

    def remove(self, network_id: str) -> None:
        """Forget a network: its secrets, state and unsent metrics."""
        shutil.rmtree(self._net(network_id), ignore_errors=True)
