"""The agent's control loop for one network: restore, list + watch, plan, apply, heartbeat."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from agent import addresses, firewall, stalls
from agent.commands import CommandRunner, command_env
from agent.handshake import HandshakeStarter
from agent.metrics.exposition import MetricsServer
from agent.metrics.publisher import Broker
from agent.metrics.reporter import MetricsReporter
from agent.metrics.spool import spool_dir
from agent.names import Names
from agent.standing import OK, UNRECOGNISED, HostNotListed, Standing
from agent.state import Membership, StateDir
from agent.wireguard.backend import WireGuardBackend, WireGuardError
from cladnet import mesh, paths
from cladnet import policy as acl
from cladnet.api_client import NETWORK_ERRORS, ApiClientError, AsyncClient, WatchGone
from cladnet.backoff import Backoff
from cladnet.tasks import cancel_and_wait

log = logging.getLogger("cladnet.agent")


@dataclass
class Timing:
    """How often the agent does what (seconds)."""

    heartbeat: float = 10.0
    # The first heartbeat after the controller saw this host at a new public address;
    # the ones after it double up to ``heartbeat``.
    recheck_after_move: float = 1.0
    # Netlink events wake the address check at once; this poll is only the fallback.
    address_poll: float = 10.0
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    # How often an agent that accepts remote commands asks for them.
    commands: float = 5.0
    # After adding a peer whose keepalive waits for the peer's handshake (mesh.diff).
    keepalive_delay: float = 1.0
    # A new peer gets a datagram that starts a handshake (agent.handshake): at once from
    # the host with the lower key, and from both if still silent this long after the
    # add. None: no datagrams (WireGuard starts on traffic and retries after 5 s).
    handshake_retry: float | None = 1.0
    # Watch events are applied together, at most this long after the first of them;
    # None applies each one at once (with a full reconcile: the old path, for benchmarks).
    coalesce: float | None = 0.05
    # The state file is rewritten at most this often while the peers change.
    save_every: float = 2.0
    # Between full reconciles (plan everything, read the whole device): catches drift.
    # On a timer of its own, so it never lands on a watch event's path.
    full_resync: float = 300.0
    # A direct path over reflexive addresses with nothing received for this long (at
    # least two keepalives) falls back to the pair's relay; direct is tried again later.
    # Path and stall checks run this often, slower when a device read is slow (many
    # peers): at most ``path_check_share`` of a core goes to them.
    path_check: float = 0.5
    path_check_share: float = 0.02
    direct_timeout: float = 6.0
    direct_retry: float = 60.0
    # A peer that answered and then stays silent this long while this host sends it
    # data (agent.stalls) brings the next heartbeat forward: was it this host's NAT that
    # moved? At most one such early heartbeat per ``stall_gap`` seconds.
    stall_after: float = 1.0
    stall_gap: float = 3.0


def _started(device: mesh.DeviceState) -> dict[str, bool]:
    """Per peer key: whether the device's peer has an endpoint or a session (one that
    roamed in, or handshook, is never added anew: see mesh.readd_first_endpoints)."""
    return {
        key: p.endpoint is not None or p.last_handshake is not None
        for key, p in device.peers.items()
    }


class NetworkAgent:
    """Keeps one WireGuard interface equal to the controller's view of one network."""

    def __init__(
        self,
        states: StateDir,
        membership: Membership,
        credential: str,
        private_key: str,
        backend: WireGuardBackend,
        timing: Timing | None = None,
        metrics_server: MetricsServer | None = None,
        tune_host: bool = False,
    ) -> None:
        self.states = states
        self.m = membership
        self.private_key = private_key
        self.backend = backend
        self.timing = timing or Timing()
        self.metrics_server = metrics_server
        # --tune-host: raise the device's socket buffers (agent/tuning.py) once its
        # sockets are final: after the first apply and after each listen port change.
        self.tune_host = tune_host
        self._device_tuned = False
        self.client = AsyncClient(
            membership.controller, credential, verify=membership.ca_file or True
        )
        self._lock = asyncio.Lock()
        self._device_ready = False
        self._sync_task: asyncio.Task[None] | None = None
        self._deferred: asyncio.Task[None] | None = None
        self._keepalives_due = False
        self.metrics: MetricsReporter | None = None
        self._skipped: dict[str, str] = {}  # peer id → why it is left out
        # The incremental path: what the device holds as planned (peer id → config),
        # the peers changed since, and who shares an address or key with whom.
        self._applied: dict[str, mesh.PeerConfig] = {}
        self._changed: set[str] = set()
        self._unsaved: set[str] = set()  # peer ids changed since the last save
        self._conflicts = mesh.ConflictIndex()
        # Device peer id → mesh.identity: names and the packet filter are rebuilt only
        # when one of these changes (an endpoint change touches neither).
        self._identities: dict[str, tuple[Any, ...]] = {}
        self._full_due = True
        self._last_full = 0.0
        self._apply_task: asyncio.Task[None] | None = None
        self._last_save = 0.0
        self._save_task: asyncio.Task[None] | None = None
        self._paths: dict[str, str] = {}  # public key → planned path, to log changes
        # (overlay IP, public key) of peers just moved to a relay
        self._kicks: set[tuple[str, str]] = set()
        # Peer id → monotonic time until which its direct path is not tried (it failed).
        self._direct_failed: dict[str, float] = {}
        # Public key → (rx bytes, monotonic time rx last grew or direct was planned).
        self._rx_seen: dict[str, tuple[int, float]] = {}
        self._stalls: dict[str, stalls.Track] = {}  # public key → counters (agent.stalls)
        self._beat_now = False  # an early heartbeat is due (a peer stalled)
        self._last_early_beat = float("-inf")
        self._address_events: addresses.AddressEvents | None = None
        self.bad_input = 0  # malformed events and unusable peers, for the logs and metrics
        self.save_errors = 0
        self.firewall_errors = 0
        self._ruleset: str | None = None  # the nft text last loaded
        self._parsed: tuple[dict[str, Any], acl.Policy] | None = None  # policy, parsed
        # Set only by this host's own DELETED event in its authenticated watch.
        self.removed = asyncio.Event()
        self.standing = Standing(
            self._standing_changed, membership.controller_state, membership.controller_state_since
        )
        self.names = Names(states.root / "networks" / membership.network_id, membership.interface)
        self.handshakes = (
            HandshakeStarter(
                membership.interface,
                lambda: self.backend.get(self.iface),
                self.timing.handshake_retry,
                apply=lambda changes: self.backend.apply(self.iface, changes),
                lock=self._lock,
            )
            if self.timing.handshake_retry is not None
            else None
        )

    @property
    def iface(self) -> str:
        return self.m.interface

    # --- device --------------------------------------------------------------------------

    async def _ensure_device(self) -> None:
        if self._device_ready:
            return
        from agent import link

        await self.backend.create(self.iface)
        await self.backend.set_private_key(self.iface, self.private_key)
        prefix = self.m.network["cidr"].split("/")[1]
        await link.configure(
            self.iface, f"{self.m.me['overlay_ip']}/{prefix}", int(self.m.network["mtu"])
        )
        self._device_ready = True
        log.info("device up", extra={"iface": self.iface})

    async def reconcile(self, force_endpoints: bool = False) -> None:
        """Make the device match the plan; only the difference is changed.

        Plans every peer and reads the whole device: for a restore, a new list, an own
        address change and the occasional resync. Watch events take :meth:`_apply_changed`.
        ``force_endpoints`` re-sends every peer's endpoint: after this host's own
        address changed, wireguard-go keeps sending from the vanished source address
        until its endpoints are set again.
        """
        async with self._lock:
            await self._reconcile_all(force_endpoints)

    async def _reconcile_all(self, force_endpoints: bool = False) -> None:
        await self._ensure_device()
        # Everything changed so far is in this plan; later events are left for the next.
        self._changed.clear()
        self._full_due = False
        self._last_full = time.monotonic()
        policy = self._policy()
        desired = mesh.plan(
            self.m.network,
            self.m.me,
            list(self.m.peers.values()),
            policy=policy,
            direct_failed=self._direct_failures(),
        )
        self._note_skipped(dict(desired.skipped), set(self.m.peers) | set(self._skipped))
        self._conflicts.rebuild(self.m.peers)
        before, self._applied = (
            self._applied,
            {pid: desired.peers[key] for pid, key in desired.ids.items()},
        )
        self._identities = {pid: mesh.identity(p) for pid, p in self._named_peers()}
        self._log_paths(self._applied, set(self._paths) - set(desired.peers))
        try:
            actual = await self.backend.get(self.iface)
            changes = mesh.diff(desired, actual, own_key=self.m.me.get("public_key"))
            moved = mesh.path_changed(before, self._applied)
            had = _started(actual) | mesh.sessionless(actual, moved)
            changes = mesh.readd_first_endpoints(changes, had, desired.peers.values())
            if force_endpoints:
                changes = mesh.with_endpoint_refresh(changes, desired)
            await self._apply(changes, self._applied)
        except BaseException:
            self._full_due = True  # the device is not what we believe: read it next time
            raise
        self._kick_relayed()
        if self.tune_host and (not self._device_tuned or changes.listen_port is not None):
            self._tune_device(desired.listen_port)
        await self._enforce(policy)
        # Names need the overlay IP (after the device); only peers the device holds.
        await self.names.refresh(self.m, self._device_peers())

    def _tune_device(self, port: int) -> None:
        """Larger socket buffers for a wireguard-go device (the kernel's socket takes
        the host's default, which ``--tune-host`` raised where it could)."""
        self._device_tuned = True
        if self.backend.kind != "userspace":
            return
        from agent import tuning

        try:
            count = tuning.tune_device(tuning.wireguard_go_pid(self.iface), port)
            log.info("device socket buffers raised", extra={"iface": self.iface, "sockets": count})
        except OSError as exc:
            log.warning("cannot raise the device's socket buffers", extra={"error": str(exc)})

    async def _apply_changed(self) -> None:
        """Bring the device up to date with the peers changed since the last apply:
        plan and diff only them (and any peer they share an address or key with)."""
        async with self._lock:
            if self._full_due:
                await self._reconcile_all()
                return
            changed, self._changed = self._changed, set()
            if not changed:
                return
            affected = self._conflicts.update(self.m.peers, changed)
            policy = self._policy()
            planned = mesh.plan_peers(
                self.m.network,
                self.m.me,
                [self.m.peers[p] for p in affected if p in self.m.peers],
                policy=policy,
                direct_failed=self._direct_failures(),
            )
            self._note_skipped(dict(planned.skipped), affected)
            before = {p: self._applied.pop(p) for p in affected if p in self._applied}
            self._applied.update(planned.configs)
            now_planned = {c.public_key for c in planned.configs.values()}
            self._log_paths(planned.configs, {c.public_key for c in before.values()} - now_planned)
            changes = mesh.diff_plans(before, planned.configs, own_key=self.m.me.get("public_key"))
            had: dict[str, bool] = {}
            moved = mesh.path_changed(before, planned.configs)
            if moved or any(c.endpoint is None for c in before.values()):
                # Only then (rare): is the device's peer still without endpoint and
                # session, or without a session on its way to another path?
                actual = await self.backend.get(self.iface)
                had = _started(actual) | mesh.sessionless(actual, moved)
            changes = mesh.readd_first_endpoints(changes, had, planned.configs.values())
            try:
                await self._apply(changes, planned.configs)
            except BaseException:
                self._full_due = True
                raise
            self._kick_relayed()
            renamed = self._identities_changed(affected)
            if renamed or self._ruleset is None:  # None: the last load failed, try again
                await self._enforce(policy)
            # Names need the overlay IP (after the device); only peers the device holds.
            if renamed:
                await self.names.refresh(self.m, self._device_peers())
            else:
                await self.names.retry(self.m)

    def _identities_changed(self, affected: Any) -> bool:
        """Note the identities of the ``affected`` peers the device holds now; True if
        one was added, removed or changed (O(affected), not O(peers))."""
        changed = False
        for pid in affected:
            peer = self.m.peers.get(pid) if pid in self._applied else None
            now = None if peer is None else mesh.identity(peer)
            was = self._identities.pop(pid, None)
            if now is not None:
                self._identities[pid] = now
            changed = changed or was != now
        return changed

    async def _apply(self, changes: mesh.DeviceChanges, planned: dict[str, Any]) -> None:
        """Apply ``changes``; note held-back keepalives (as applied) and add them later.
        ``planned``: the peer ids the changes were planned for (where deferrals are)."""
        if changes:
            await self.backend.apply(self.iface, changes)
            log.info(
                "device updated", extra={"iface": self.iface, "changes": mesh.summary(changes)}
            )
            if self.handshakes is not None and changes.peers_to_add:
                self.handshakes.peers_added(changes.peers_to_add, self.m.me.get("public_key"))
        if changes.keepalive_deferred:
            deferred = set(changes.keepalive_deferred)
            for pid in list(planned):
                config = self._applied[pid]
                if config.public_key in deferred:
                    self._applied[pid] = replace(config, keepalive=0)
                    self._changed.add(pid)  # the next incremental pass adds the keepalive
            self._keepalives_due = True
            if self._deferred is None or self._deferred.done():
                self._deferred = asyncio.create_task(self._add_deferred_keepalives())

    def _note_skipped(self, skipped: dict[str, str], planned: Any) -> None:
        """Log and count each peer newly left out (or for a new reason)."""
        for peer_id in planned:
            reason = skipped.get(peer_id)
            if reason is None:
                self._skipped.pop(peer_id, None)
            elif self._skipped.get(peer_id) != reason:
                self._skipped[peer_id] = reason
                self.bad_input += 1
                log.warning("ignoring a peer", extra={"peer": peer_id, "reason": reason})

    def _policy(self) -> acl.Policy | None:
        """The policy to enforce; None (no filter) until a controller sent one. Parsed
        once per policy received, not once per apply."""
        if self.m.policy is None:
            return None
        if self._parsed is not None and self._parsed[0] is self.m.policy:
            return self._parsed[1]
        try:
            policy = acl.parse(self.m.policy["document"])
        except (acl.PolicyError, KeyError, TypeError) as exc:
            # Only a damaged state file gets here (events are checked): fail closed.
            self.bad_input += 1
            log.warning("unusable saved policy, denying all", extra={"error": str(exc)})
            policy = acl.Policy(groups={}, rules=())
        self._parsed = (self.m.policy, policy)
        return policy

    def _named_peers(self) -> list[tuple[str, dict[str, Any]]]:
        """(id, record) of the peers the device holds as planned."""
        return [(pid, self.m.peers[pid]) for pid in self._applied if pid in self.m.peers]

    def _device_peers(self) -> list[dict[str, Any]]:
        """The peers the device holds as planned (a policy may leave some out)."""
        return [p for _, p in self._named_peers()]

    async def _enforce(self, policy: acl.Policy | None) -> None:
        """Load the packet filter for ``policy`` if it changed (the peers in the device)."""
        if policy is None:
            return
        ruleset = acl.nft_ruleset(policy, self.m.me, self._device_peers(), self.iface)
        if ruleset == self._ruleset:
            return
        try:
            await firewall.apply(ruleset)
        except firewall.FirewallError as exc:
            self.firewall_errors += 1
            self._ruleset = None  # the next reconcile tries again
            log.error("loading the packet filter failed", extra={"error": str(exc)})
            return
        self._ruleset = ruleset
        log.info(
            "packet filter loaded",
            extra={"iface": self.iface, "policy_version": self.m.policy_version},
        )

    def _direct_failures(self) -> set[str]:
        """The peers whose direct path failed lately (expired marks dropped)."""
        now = time.monotonic()
        self._direct_failed = {p: t for p, t in self._direct_failed.items() if t > now}
        return set(self._direct_failed)

    def _log_paths(self, planned: dict[str, mesh.PeerConfig], gone: set[str]) -> None:
        """One log line per peer whose path (private, direct, relayed via R) changed.
        ``planned``: peer id → config just planned; ``gone``: keys no longer planned."""
        for key in gone:
            self._paths.pop(key, None)
        for pid, config in planned.items():
            was = self._paths.get(config.public_key)
            if was != config.path:
                name = self.m.peers.get(pid, {}).get("name")
                log.info("peer path", extra={"peer": name, "path": config.path, "was": was})
                self._paths[config.public_key] = config.path
                # Onto a relay (it latches this side now), and off one to a direct path
                # over reflexive addresses: both ends send at once, which opens both
                # NATs; else the side with nothing to send waits for its keepalive, and
                # the other's packets are dropped by its NAT until then.
                moved = config.path.startswith("relayed via") or (was or "").startswith(
                    "relayed via"
                )
                if moved and config.endpoint and config.allowed_ips:
                    self._kicks.add((config.allowed_ips[0].partition("/")[0], config.public_key))

    def _kick_relayed(self) -> None:
        """One empty datagram into the tunnel to each peer just moved to a relay (port 9,
        discard; the peer drops it): WireGuard sends it, or a handshake, to the new relay
        port at once, so the relay latches this side now instead of at the next
        keepalive. Failover after a relay dies waits for both sides' first packets.

        A pair with no session yet (a new one) is kicked as :mod:`agent.handshake`
        starts pairs: the lower key now, the other ``handshake_retry`` seconds later.
        Both at once, their initiations cross at the relay and both ends wait for
        WireGuard's 5-s retry; this way the first one is dropped at the relay (the other
        side is not latched yet) or answered, and the later one completes the pair."""
        targets, self._kicks = self._kicks, set()
        own = self.m.me.get("public_key")
        delay = self.timing.handshake_retry
        now, later = [], []
        for ip, key in targets:
            track = self._stalls.get(key)
            had_session = track is not None and track.rx > 0
            if had_session or delay is None or own is None or own < key:
                now.append(ip)
            else:
                later.append(ip)
        self._send_kicks(now)
        if later and delay is not None:
            asyncio.get_running_loop().call_later(delay, self._send_kicks, later)

    def _send_kicks(self, targets: list[str]) -> None:
        try:
            socket.if_nametoindex(self.iface)
        except OSError:
            return  # no such device here (an in-memory backend): nothing to kick through
        for ip in targets:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b"", (ip, 9))
            except OSError as exc:
                log.debug("could not kick a relayed peer", extra={"ip": ip, "error": str(exc)})

    async def path_loop(self) -> None:
        """Fall back to the relay when a direct path over reflexive addresses stops.

        Only peers planned ``direct`` that also have a relay (so neither side is public)
        are watched: nothing received from one for ``direct_timeout`` seconds (the
        network's keepalives would have arrived) sends it to its relay for
        ``direct_retry`` seconds, then direct is tried again.
        """
        cost = 0.0  # seconds the last check took
        while not self.removed.is_set():
            await asyncio.sleep(max(self.timing.path_check, cost / self.timing.path_check_share))
            started = time.monotonic()
            try:
                failed = await self._check_direct_paths()
                cost = time.monotonic() - started
                if failed:
                    await self.reconcile()
            except (WireGuardError, OSError) as exc:
                log.debug("path check failed", extra={"error": repr(exc)})

    async def _check_direct_paths(self) -> bool:
        """Mark the direct paths that stopped; True when the plan changes (one was
        marked, or a mark expired and direct is to be tried again)."""
        keepalive = int(self.m.network.get("keepalive") or 0)
        timeout = max(self.timing.direct_timeout, 2.5 * keepalive)
        actual = await self.backend.get(self.iface)
        now = time.monotonic()
        self._stalls, stalled = stalls.update(self._stalls, actual, now, self.timing.stall_after)
        if stalled and not self._heartbeat_soon(stalled, now):
            for key in stalled:  # held back by stall_gap: reported again at the next check
                self._stalls[key] = replace(self._stalls[key], stalled=False)
        if mesh.relay_drift(self._applied.values(), actual):
            await self._undo_relay_drift()
        failed = any(until <= now for until in self._direct_failed.values())
        by_key = {p.get("public_key"): p for p in self.m.peers.values()}
        for key, path in self._paths.items():
            peer, state = by_key.get(key), actual.peers.get(key)
            if peer is None or state is None or path != "direct":
                self._rx_seen.pop(key, None)
                continue
            if paths.relayed_endpoint(self.m.me, peer) is None:
                continue  # nothing to fall back to
            rx, since = self._rx_seen.get(key, (state.rx_bytes, now))
            if state.rx_bytes != rx:
                since = now
            self._rx_seen[key] = (state.rx_bytes, since)
            if now - since > timeout:
                peer_id = str(peer.get("id"))
                self._direct_failed[peer_id] = now + self.timing.direct_retry
                self._rx_seen.pop(key, None)
                failed = True
                log.warning(
                    "direct path silent; using the relay",
                    extra={"peer": peer.get("name"), "silent_s": round(now - since, 1)},
                )
        return failed

    async def _undo_relay_drift(self) -> None:
        """Set relayed peers that roamed off their relay back to it (mesh.relay_drift),
        and kick them: read again under the lock, so no apply is overtaken (rare)."""
        async with self._lock:
            drift = mesh.relay_drift(self._applied.values(), await self.backend.get(self.iface))
            if not drift:
                return
            await self.backend.apply(self.iface, drift)
            for config in self._applied.values():
                if config.public_key in drift.peers_to_update and config.allowed_ips:
                    self._kicks.add((config.allowed_ips[0].partition("/")[0], config.public_key))
            self._kick_relayed()
        log.info(
            "relayed peers had roamed off their relay; set back",
            extra={"peers": self._names(drift.peers_to_update)},
        )

    def _names(self, keys: Iterable[str]) -> list[str]:
        """The peers' names for a log line, sorted (the key where a name is unknown)."""
        names = {p.get("public_key"): p.get("name") for p in self.m.peers.values()}
        return sorted(str(names.get(k, k)) for k in keys)

    def _heartbeat_soon(self, stalled: list[str], now: float) -> bool:
        """Send the heartbeat now: peers stopped answering (see agent.stalls). False when
        one was sent less than ``stall_gap`` seconds ago."""
        if now - self._last_early_beat < self.timing.stall_gap:
            return False
        self._last_early_beat = now
        self._beat_now = True
        log.info("peers stopped answering; heartbeat now", extra={"peers": self._names(stalled)})
        if self._address_events is not None:
            self._address_events.poke()
        return True

    async def resync_loop(self) -> None:
        """A full reconcile once ``timing.full_resync`` has passed without one: catches
        drift (a device changed behind the agent's back) on its own timer, so a watch
        event never waits for a plan over every peer."""
        backoff = Backoff(self.timing.backoff_min, self.timing.backoff_max)
        while not self.removed.is_set():
            await asyncio.sleep(self._last_full + self.timing.full_resync - time.monotonic())
            if time.monotonic() - self._last_full < self.timing.full_resync:
                continue  # another full reconcile ran meanwhile
            try:
                await self.reconcile()
                backoff.reset()
            except (WireGuardError, OSError) as exc:
                log.error("full reconcile failed, retrying", extra={"error": str(exc)})
                await backoff.wait()

    async def _add_deferred_keepalives(self) -> None:
        """The keepalives ``diff`` held back, a moment after their peers were added."""
        while self._keepalives_due:
            self._keepalives_due = False
            await asyncio.sleep(self.timing.keepalive_delay)
            try:
                await self._apply_changed()
            except WireGuardError as exc:  # the sync loop's next reconcile retries
                log.error("changing the device failed", extra={"error": str(exc)})

    # --- controller sync -------------------------------------------------------------------

    def _standing_changed(self, old: str, new: str, reason: str) -> None:
        """One log line per change of standing (never per retry), kept for ``status``."""
        extra = {"iface": self.iface, "from": old, "to": new, "reason": reason}
        if new == OK:
            log.info("controller answers again", extra=extra)
        elif new == UNRECOGNISED:
            log.warning(
                "controller does not recognise this host; keeping tunnels, keys and state",
                extra=extra,
            )
        else:
            log.warning("controller not available; keeping tunnels", extra=extra)
        self.m.controller_state = new
        self.m.controller_state_since = self.standing.since
        self._save()

    def _save(self) -> None:
        """Persist the view; a full or read-only disk is reported, never fatal: the
        device keeps following the controller from memory.

        A whole snapshot (agent.state): the peers and the revision they are at, so the
        saved revision is never ahead of the saved peers: a restart resumes the watch
        from a state it has.
        """
        self._last_save = time.monotonic()
        self._unsaved.clear()
        try:
            self.states.save(self.m)
        except OSError as exc:
            self.save_errors += 1
            log.error("cannot save state; continuing from memory", extra={"error": str(exc)})

    def _save_changes(self) -> None:
        """Persist only the peers changed since the last save (agent.state's journal)."""
        self._last_save = time.monotonic()
        changed, self._unsaved = self._unsaved, set()
        try:
            self.states.save_changes(self.m, changed)
        except OSError as exc:
            self.save_errors += 1
            self._unsaved |= changed  # the next save tries them again
            log.error("cannot save state; continuing from memory", extra={"error": str(exc)})

    def _save_soon(self) -> None:
        """Save now if the last save is ``save_every`` old, else once that much has passed:
        a burst of changes costs a few snapshots, not one per event."""
        if self._save_task is not None and not self._save_task.done():
            return
        wait = self._last_save + self.timing.save_every - time.monotonic()
        if wait <= 0:
            self._save_changes()
        else:
            self._save_task = asyncio.create_task(self._save_after(wait), name="save-state")

    async def _save_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._save_changes()

    def _changes_arrived(self) -> None:
        """A watch event changed the view: apply it (coalesced with the events that
        follow within ``timing.coalesce``) and save it (at a bounded rate)."""
        if self._apply_task is None or self._apply_task.done():
            self._apply_task = asyncio.create_task(self._apply_loop(), name=f"apply-{self.iface}")

    async def _apply_loop(self) -> None:
        """Apply what is pending until nothing is; a failing device is retried with
        backoff (and read whole next time), without holding up the watch."""
        backoff = Backoff(self.timing.backoff_min, self.timing.backoff_max)
        while self._changed or self._full_due:
            if self.timing.coalesce:
                await asyncio.sleep(self.timing.coalesce)
            try:
                await self._apply_changed()
                backoff.reset()
            except WireGuardError as exc:
                log.error("changing the device failed, retrying", extra={"error": str(exc)})
                await backoff.wait()
        self._save_soon()

    def _on_event(self, event: Any) -> bool:
        """Apply one watch event to the local view; True if the device may need a change.

        A malformed event is logged, counted and skipped: it must neither stop the
        watch nor touch the peers we have.
        """
        try:
            return self._apply_event(event)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            self.bad_input += 1
            log.warning("ignoring a malformed watch event", extra={"error": repr(exc)})
            return False

    def _apply_event(self, event: dict[str, Any]) -> bool:
        kind = event["type"]
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "POLICY"):
            raise ValueError(f"unknown event type {kind!r}")
        if kind != "BOOKMARK" and not isinstance(event.get("peer", {}), dict):
            raise TypeError("peer is not an object")
        revision = event["revision"]
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise ValueError(f"bad revision {revision!r}")
        if kind == "POLICY":
            changed = self._take_policy(event["policy"])  # raises first if unusable
            self.m.revision = max(self.m.revision, revision)
            return changed
        self.m.revision = max(self.m.revision, revision)
        if kind == "BOOKMARK":
            return False
        if kind == "DELETED":
            if event["id"] == self.m.host_id:
                self.removed.set()
                return False
            if not isinstance(event["id"], str):
                raise TypeError("peer id is not a string")
            if self.m.peers.pop(event["id"], None) is None:
                return False
            self._changed.add(event["id"])
            self._unsaved.add(event["id"])
            return True
        peer = event["peer"]
        if peer["id"] == self.m.host_id:
            # Our own record drives the device address: take it only if it is whole.
            if not all(isinstance(peer.get(k), str) for k in ("overlay_ip", "public_key", "name")):
                raise ValueError("incomplete record of this host")
            self.m.me = peer
            self._full_due = True  # every endpoint and keepalive may depend on it
            return True
        if not isinstance(peer["id"], str):
            raise TypeError("peer id is not a string")
        self.m.peers[peer["id"]] = peer
        self._changed.add(peer["id"])
        self._unsaved.add(peer["id"])
        return True

    def _take_policy(self, policy: Any) -> bool:
        """Keep a policy from the controller if it parses (else raise: skipped, counted);
        True if it changed."""
        if not isinstance(policy, dict) or not isinstance(policy.get("version"), int):
            raise TypeError("policy is not an object with a version")
        acl.parse(policy.get("document"))  # PolicyError (a ValueError) if unusable
        if policy == self.m.policy:
            return False
        self.m.policy = policy
        self._full_due = True  # which peers the device holds may change for any of them
        return True

    async def _list(self) -> None:
        peers, revision, policy = await self.client.list_peers_and_policy(self.m.network_id)
        if policy is not None:
            self._take_policy(policy)
        me = next((p for p in peers if p["id"] == self.m.host_id), None)
        if me is None:  # not a removal: it may be an empty or restored etcd
            raise HostNotListed("this host is not in the network's peer list")
        self.standing.ok("watch")
        self.m.me = me
        self.m.peers = {p["id"]: p for p in peers if p["id"] != self.m.host_id}
        self.m.revision = revision
        log.debug("peers listed", extra={"peers": len(self.m.peers), "revision": revision})
        self._save()
        await self.reconcile()

    def _restart_sync(self) -> None:
        """(Re)start the list+watch loop; it resumes from the saved revision."""
        if self._sync_task is not None:
            self._sync_task.cancel()
        self._sync_task = asyncio.create_task(self.sync_loop(), name=f"sync-{self.iface}")

    async def sync_loop(self) -> None:
        """List, then watch from the listed revision; resume on cuts, list again on 410.

        No error ends it: only this host's own DELETED event does. After the controller
        did not recognise this host it lists again (its etcd may have been restored).
        """
        backoff = Backoff(self.timing.backoff_min, self.timing.backoff_max)
        need_list = True
        while not self.removed.is_set():
            try:
                if need_list:
                    await self._list()
                    need_list = False
                async for event in self.client.watch_peers(self.m.network_id, self.m.revision):
                    backoff.reset()
                    self.standing.ok("watch")
                    if self._on_event(event):
                        if self.timing.coalesce is None:  # the old path: all, per event
                            self._save()
                            await self.reconcile()
                        else:
                            self._changes_arrived()
                    if self.removed.is_set():
                        return
            except WatchGone:
                log.info("watch revision compacted, listing again")
                need_list = True
                continue
            except (ApiClientError, HostNotListed, *NETWORK_ERRORS) as exc:
                # Logged once per change of standing by _standing_changed.
                log.debug("watch failed", extra={"error": repr(exc)})
                if self.standing.failed("watch", exc) == UNRECOGNISED:
                    need_list = True
            except WireGuardError as exc:
                log.error("changing the device failed, retrying", extra={"error": str(exc)})
            except ValueError as exc:  # an unparsable line from the stream
                self.bad_input += 1
                log.warning("bad data from the controller", extra={"error": repr(exc)})
            await backoff.wait()

    # --- own addresses ---------------------------------------------------------------------

    async def _local_addresses(self) -> list[str]:
        return await addresses.underlay_addresses(exclude={self.iface})

    async def address_loop(self) -> None:
        """Heartbeat; notice own address changes (local or as the controller sees them).

        Addresses are polled even while the controller is unreachable, so a local
        change re-points the peers at once instead of after the heartbeat backoff.
        """
        events = addresses.AddressEvents()
        events.start()
        self._address_events = events
        try:
            await self._follow_addresses(events)
        finally:
            self._address_events = None
            await events.close()

    async def _follow_addresses(self, events: addresses.AddressEvents) -> None:
        known = await self._local_addresses()
        backoff = Backoff(self.timing.backoff_min, self.timing.backoff_max)
        next_heartbeat = 0.0
        # After our NAT moved, the next heartbeats come sooner (1, 2, 4 … s): an address
        # that moved once often moves again (a flapping link, a resume), and a move
        # back to an address the peers' NATs still know goes unnoticed by the stall
        # check (the peers answer), leaving the controller's view stale.
        recheck = self.timing.heartbeat
        fresh_retry = True  # a failed heartbeat may be retried at once on a new connection
        while not self.removed.is_set():
            current = await self._local_addresses()
            local_changed = current != known
            if local_changed:
                log.info("local addresses changed", extra={"old": known, "new": current})
                known = current
                # Peers must be re-pointed from the new source address at once.
                await self.reconcile(force_endpoints=True)
                # Controller connections may be bound to the vanished address.
                await self.client.reconnect()
                self._restart_sync()
                next_heartbeat = 0.0
                backoff.reset()
            if time.monotonic() >= next_heartbeat:
                try:
                    reply = await self.client.heartbeat(self.m.host_id, addresses=current)
                    self.standing.ok("heartbeat")
                    moved = reply["changed"] and not local_changed
                    recheck = (
                        self.timing.recheck_after_move
                        if moved
                        else min(self.timing.heartbeat, recheck * 2)
                    )
                    next_heartbeat = time.monotonic() + recheck
                    backoff.reset()
                    if moved:
                        log.info(
                            "observed address changed",
                            extra={"observed": reply["observed_address"]},
                        )
                        await self.reconcile(force_endpoints=True)
                        # Our NAT moved: its old mappings are gone, and with them the
                        # watch stream's connection, which would stay silent (nothing
                        # tells a receiving TCP connection its NAT entry is gone) and
                        # miss the change to our own record this very heartbeat wrote.
                        await self.client.reconnect()
                        self._restart_sync()
                    fresh_retry = True
                except (ApiClientError, *NETWORK_ERRORS) as exc:
                    log.debug("heartbeat failed", extra={"error": repr(exc)})
                    self.standing.failed("heartbeat", exc)
                    next_heartbeat = time.monotonic() + backoff.next_delay()
                    if fresh_retry and isinstance(exc, NETWORK_ERRORS):
                        # A pooled connection that died (our NAT moved: its mapping went
                        # with it) fails at once; one retry on a new one, not a backoff.
                        fresh_retry = False
                        await self.client.reconnect()
                        next_heartbeat = 0.0
            wake = min(self.timing.address_poll, max(0.0, next_heartbeat - time.monotonic()))
            await events.wait(wake)
            if self._beat_now:  # peers stalled: ask where the controller sees us now
                self._beat_now = False
                next_heartbeat = 0.0

    # --- metrics ---------------------------------------------------------------------------

    async def _metrics_settings(self) -> dict[str, Any]:
        """Broker credentials from the saved state, or fetched once from the controller."""
        backoff = Backoff(self.timing.backoff_min, self.timing.backoff_max)
        while self.m.metrics is None:
            try:
                self.m.metrics = dict(await self.client.metrics_credentials(self.m.host_id))
                self._save()
            except ApiClientError as exc:
                if exc.status == 404 and exc.code == "metrics_disabled":
                    self.m.metrics = {}
                else:  # the watch and heartbeat report the standing
                    log.debug("no metrics credentials yet", extra={"error": str(exc)})
                    await backoff.wait()
            except NETWORK_ERRORS as exc:
                log.debug("no metrics credentials yet", extra={"error": repr(exc)})
                await backoff.wait()
        return self.m.metrics

    async def metrics_loop(self) -> None:
        """Host + overlay metrics (per-peer health too): to the broker (if any) and the pull
        server; the controller only gets heartbeats."""
        settings = await self._metrics_settings()
        broker = None
        if settings.get("broker"):
            # An mqtts:// broker is verified with the pinned cluster CA, when there is one.
            broker = Broker(
                settings["broker"],
                settings.get("username"),
                settings.get("password"),
                ca_file=self.m.ca_file,
            )
        reporter = MetricsReporter(
            network=str(self.m.network["name"]),
            host=str(self.m.me["name"]),
            host_id=self.m.host_id,
            overlay_ip=str(self.m.me["overlay_ip"]),
            spool_dir=spool_dir(self.states.root, self.m.network_id),
            interval=float(settings.get("interval", self.m.network.get("metrics_interval", 2.0))),
            device=lambda: self.backend.get(self.iface),
            peers=lambda: self.m.peers,
            broker=broker,
            ack_topic=settings.get("ack_topic"),
            server=self.metrics_server,
            gauges=lambda: {**self.standing.gauges(), **self.names.gauges()},
        )
        self.metrics = reporter
        await reporter.run()

    # --- remote commands ---------------------------------------------------------------------

    async def commands_loop(self) -> None:
        """Run the group's remote commands, telling them which host they run on."""
        env = command_env(self.m)
        runner = CommandRunner(self.client, self.m.host_id, env, poll=self.timing.commands)
        await runner.run()

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Restore the last known mesh at once, then follow the controller until this host's
        own DELETED event arrives; nothing else tears the interface and state down."""
        # The list goes out while the device is made (its reconcile waits for this one):
        # a VM that just joined gets its peers one round trip sooner.
        self._restart_sync()
        try:
            await self.reconcile()  # from disk: tunnels come back even if the controller is down
        except Exception:
            log.exception("restoring the device from saved state failed")
        addresses_task = asyncio.create_task(self.address_loop(), name=f"addresses-{self.iface}")
        metrics_task = asyncio.create_task(self.metrics_loop(), name=f"metrics-{self.iface}")
        path_task = asyncio.create_task(self.path_loop(), name=f"paths-{self.iface}")
        resync_task = asyncio.create_task(self.resync_loop(), name=f"resync-{self.iface}")
        tasks = [addresses_task, metrics_task, path_task, resync_task]
        if self.m.allow_commands:  # a task of its own: a long command never blocks the mesh
            tasks.append(asyncio.create_task(self.commands_loop(), name=f"commands-{self.iface}"))
        try:
            await self.removed.wait()
            log.warning("this host was removed from the network; tearing the interface down")
            await self.names.remove()
            await self.backend.destroy(self.iface)
            try:
                await firewall.remove(self.iface)
            except firewall.FirewallError as exc:
                log.error("removing the packet filter failed", extra={"error": str(exc)})
            self.states.remove(self.m.network_id)
        finally:
            await cancel_and_wait(
                [*tasks, self._sync_task, self._deferred, self._apply_task, self._save_task],
                Exception,
            )
            if not self.removed.is_set():
                self._save()  # what a bounded-rate save had not written yet
            if self.handshakes is not None:
                await self.handshakes.close()
            await self.names.close()
            await self.client.close()
