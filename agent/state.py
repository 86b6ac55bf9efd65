"""What the agent keeps on disk so it can restore its tunnels without the controller.

<state_dir>/networks/<network_id>/
    membership.json   controller URL, host id, interface, network, self, peers, revision
                      (a snapshot, with the generation of the journal that follows it)
    journal           the changes since the snapshot, one JSON line each (0600)
    credential        the per-host controller credential (0600)
    private.key       the WireGuard private key (0600) — never sent anywhere

A change of a few peers appends one line (the changed peers, the small rest of the
membership, the revision) instead of rewriting every peer: its cost follows what
changed. Once the journal is as large as the snapshot, a new snapshot (next
generation) replaces both. Crash safety: the snapshot is replaced atomically; a line
counts only if whole (a torn last line is ignored, and the next save compacts); lines
of an older generation (a crash between a snapshot and the journal's truncation) are
ignored. Each line holds a revision with the peers at it, so what is loaded is never
ahead of the peers it has.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cladnet.files import write_atomic

log = logging.getLogger("cladnet.agent")

SNAPSHOT = "membership.json"
JOURNAL = "journal"
# A journal is compacted into a new snapshot once it is this large, or as large as the
# snapshot: writes stay proportional to the changes, loads to the snapshot.
JOURNAL_MIN = 64 * 1024


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
        # Network id → (snapshot generation, snapshot bytes, journal bytes), as written
        # or loaded by this process; a network not in it gets a snapshot on its next save.
        self._journals: dict[str, tuple[int, int, int]] = {}

    def _net(self, network_id: str) -> Path:
        return self.root / "networks" / network_id

    def network_ids(self) -> list[str]:
        base = self.root / "networks"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / SNAPSHOT).exists())

    def membership(self, network_id: str) -> Membership:
        """The membership as a restart would load it (snapshot and journal), without
        touching the secrets."""
        return self._replay(network_id, self._net(network_id))

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
            (d / SNAPSHOT, 0o600),
            (d / JOURNAL, 0o600),
        ):
            if path.exists() and path.stat().st_mode & 0o077 & ~mode:
                log.warning("tightening permissions", extra={"path": str(path)})
                path.chmod(mode)
        membership = self._replay(network_id, d)
        return (
            membership,
            (d / "credential").read_text().strip(),
            (d / "private.key").read_text().strip(),
        )

    def _replay(self, network_id: str, d: Path) -> Membership:
        """The snapshot with its generation's whole journal lines applied in order."""
        raw = json.loads((d / SNAPSHOT).read_text())
        generation = raw.pop("generation", 0)
        membership = Membership(**raw)
        try:
            lines = (d / JOURNAL).read_bytes().split(b"\n")
        except FileNotFoundError:
            lines = []
        whole = True
        for line in lines[:-1]:  # the last is empty, or torn
            try:
                entry = json.loads(line)
                if entry.get("generation") != generation:
                    continue  # written before the snapshot
                head, gone, peers = dict(entry["head"]), list(entry["gone"]), entry["peers"]
            except (ValueError, KeyError, TypeError, AttributeError):
                whole = False  # a damaged line: nothing after it counts
                break
            for name, value in head.items():
                setattr(membership, name, value)
            for peer_id in gone:
                membership.peers.pop(peer_id, None)
            membership.peers.update(peers)
        if whole and not (lines and lines[-1]):
            size = (d / SNAPSHOT).stat().st_size
            self._journals[network_id] = (generation, size, len(b"\n".join(lines)))
        else:
            self._journals.pop(network_id, None)  # torn: the next save is a snapshot
        return membership

    def save(self, membership: Membership) -> None:
        """Write the whole membership atomically (one snapshot: peers and their revision),
        as a new generation: the journal so far no longer counts.

        Serialised straight from the live objects, without ``asdict``'s deep copy (at
        thousands of peers that copy cost more than the JSON).
        """
        d = self._net(membership.network_id)
        generation = self._journals.get(membership.network_id, (-1, 0, 0))[0] + 1
        if generation == 0 and (d / SNAPSHOT).exists():
            # Not loaded by this process: past whatever generation is on disk.
            generation = int(json.loads((d / SNAPSHOT).read_text()).get("generation", 0)) + 1
        # Until this snapshot is down, a journal line could miss what it holds.
        self._journals.pop(membership.network_id, None)
        record = {f.name: getattr(membership, f.name) for f in fields(membership)}
        text = json.dumps({**record, "generation": generation})
        write_private(d / SNAPSHOT, text)
        # Truncated after the snapshot: a crash in between leaves only stale lines.
        os.close(os.open(d / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        self._journals[membership.network_id] = (generation, len(text.encode()), 0)

    def save_changes(self, membership: Membership, changed: set[str]) -> None:
        """Persist the peers ``changed`` since the last save (present: their records;
        absent: removed) and the rest of the membership, as one journal line; a snapshot
        instead when there is none from this process yet or the journal grew too large."""
        journal = self._journals.get(membership.network_id)
        if journal is None or journal[2] > max(JOURNAL_MIN, journal[1]):
            self.save(membership)
            return
        generation, snapshot, size = journal
        peers = membership.peers
        entry = {
            "generation": generation,
            "head": {
                f.name: getattr(membership, f.name) for f in fields(membership) if f.name != "peers"
            },
            "peers": {p: peers[p] for p in changed if p in peers},
            "gone": [p for p in changed if p not in peers],
        }
        line = (json.dumps(entry) + "\n").encode()
        path = self._net(membership.network_id) / JOURNAL
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # One write: a kill leaves the whole line or none of it. A short one (the
            # disk filled mid-line) is continued, which raises the reason (ENOSPC); the
            # torn line it leaves is ignored when loading.
            written = os.write(fd, line)
            while written < len(line):
                more = os.write(fd, line[written:])
                if more == 0:
                    raise OSError("short write to the state journal")
                written += more
            os.fsync(fd)
        except OSError:
            self._journals.pop(membership.network_id, None)  # the next save is a snapshot
            raise
        finally:
            os.close(fd)
        self._journals[membership.network_id] = (generation, snapshot, size + len(line))

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
        self._journals.pop(network_id, None)
