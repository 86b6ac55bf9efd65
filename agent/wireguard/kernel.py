"""Kernel WireGuard, configured over generic netlink with pyroute2.

pyroute2's API is synchronous here; every call runs in a worker thread so the agent's
event loop never blocks on netlink.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.wireguard.backend import WireGuardError, check_name
from cladnet.mesh import DeviceChanges, DeviceState, PeerState, format_endpoint, split_endpoint

MODULE_DIR = Path("/sys/module/wireguard")


def available() -> bool:
    """Whether kernel WireGuard can be used: pyroute2 is installed and the module is loaded
    (or ``modprobe wireguard`` loads it)."""
    if importlib.util.find_spec("pyroute2") is None:
        return False
    if MODULE_DIR.exists():
        return True
    modprobe = shutil.which("modprobe") or "/usr/sbin/modprobe"
    try:
        loaded = subprocess.run([modprobe, "-q", "wireguard"], capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return loaded.returncode == 0 and MODULE_DIR.exists()


def _text(value: Any) -> str:
    # pyroute2 decodes keys to base64 *bytes*.
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def parse_info(messages: Iterable[Any]) -> DeviceState:
    """A :class:`DeviceState` from the messages of a WireGuard ``GET_DEVICE`` dump.

    The kernel splits a large device over several messages: device attributes come only
    in the first, and a peer whose allowed IPs did not fit continues in the next message
    under the same public key, so peers are merged by key.
    """
    listen_port: int | None = None
    fields: dict[str, dict[str, Any]] = {}
    allowed: dict[str, list[str]] = {}
    for msg in messages:
        if msg.get_attr("WGDEVICE_A_LISTEN_PORT") is not None:
            listen_port = int(msg.get_attr("WGDEVICE_A_LISTEN_PORT"))
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = _text(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
            allowed.setdefault(key, []).extend(
                ip["addr"] for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []
            )
            if key in fields:
                continue  # a continuation carries only more allowed IPs
            endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
            handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            seconds = int(handshake["tv_sec"]) if handshake is not None else 0
            fields[key] = {
                "endpoint": format_endpoint(endpoint["addr"], int(endpoint["port"]))
                if endpoint is not None
                else None,
                "keepalive": int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
                "last_handshake": seconds + int(handshake["tv_nsec"]) / 1e9 if seconds else None,
                "rx_bytes": int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
                "tx_bytes": int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
            }
    peers = {
        key: PeerState(public_key=key, allowed_ips=tuple(allowed[key]), **values)
        for key, values in fields.items()
    }
    return DeviceState(listen_port=listen_port, peers=peers)


def _endpoint_fields(endpoint: str | None) -> dict[str, Any]:
    if endpoint is None:
        return {}
    host, port = split_endpoint(endpoint)
    return {"endpoint_addr": host, "endpoint_port": port}


def peer_requests(changes: DeviceChanges) -> list[dict[str, Any]]:
    """pyroute2 peer structures for ``changes``, one netlink request each."""
    requests: list[dict[str, Any]] = [
        {"public_key": key, "remove": True} for key in changes.peers_to_remove
    ]
    for peer in changes.peers_to_add:
        requests.append(
            {
                "public_key": peer.public_key,
                "replace_allowed_ips": True,
                "allowed_ips": list(peer.allowed_ips),
                "persistent_keepalive": peer.keepalive,
                **_endpoint_fields(peer.endpoint),
            }
        )
    for key, update in changes.peers_to_update.items():
        request: dict[str, Any] = {"public_key": key, "update_only": True}
        request.update(_endpoint_fields(update.endpoint))
        if update.keepalive is not None:
            request["persistent_keepalive"] = update.keepalive
        if update.allowed_ips is not None:
            request["replace_allowed_ips"] = True
            request["allowed_ips"] = list(update.allowed_ips)
        requests.append(request)
    return requests


class KernelBackend:
    """WireGuard devices of the Linux kernel module, optionally in a named network namespace."""

    kind = "kernel"

    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns

    def _wg(self) -> Any:
        from pyroute2 import WireGuard  # imported lazily: pyroute2 costs ~11 MB

        return WireGuard(netns=self.netns) if self.netns else WireGuard()

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute

        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    async def _call(self, name: str, what: str, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except WireGuardError:
            raise
        except Exception as exc:  # pyroute2 raises NetlinkError, OSError, ValueError
            raise WireGuardError(f"{what} {name!r}: {exc}", getattr(exc, "code", None)) from exc

    def _exists(self, name: str) -> bool:
        with self._ipr() as ipr:
            return bool(ipr.link_lookup(ifname=name))

    async def exists(self, name: str) -> bool:
        """Whether an interface ``name`` exists."""
        return bool(await self._call(name, "looking up", self._exists, check_name(name)))

    def _create(self, name: str) -> None:
        with self._ipr() as ipr:
            if not ipr.link_lookup(ifname=name):
                ipr.link("add", ifname=name, kind="wireguard")

    async def create(self, name: str) -> None:
        """Create the WireGuard interface ``name`` unless it exists."""
        await self._call(name, "creating", self._create, check_name(name))

    def _destroy(self, name: str) -> None:
        with self._ipr() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])

    async def destroy(self, name: str) -> None:
        """Delete the interface ``name`` if it exists."""
        await self._call(name, "deleting", self._destroy, check_name(name))

    def _get(self, name: str) -> DeviceState:
        wg = self._wg()
        try:
            return parse_info(wg.info(name))
        finally:
            wg.close()

    async def get(self, name: str) -> DeviceState:
        """The device's port, public key and peers with handshake time and byte counters."""
        return await self._call(name, "reading", self._get, check_name(name))

    def _set(
        self,
        name: str,
        listen_port: int | None,
        private_key: str | None,
        peers: list[dict[str, Any]],
    ) -> None:
        wg = self._wg()
        try:
            if listen_port is not None or private_key is not None:
                wg.set(name, listen_port=listen_port, private_key=private_key)
            for peer in peers:
                wg.set(name, peer=peer)
        finally:
            wg.close()

    async def set_private_key(self, name: str, private_key: str) -> None:
        """Set the device's private key."""
        await self._call(name, "configuring", self._set, check_name(name), None, private_key, [])

    async def apply(
        self, name: str, changes: DeviceChanges, private_key: str | None = None
    ) -> None:
        """Send ``changes``: device fields first, then one request per changed peer."""
        if not changes and private_key is None:
            return
        await self._call(
            name,
            "configuring",
            self._set,
            check_name(name),
            changes.listen_port,
            private_key,
            peer_requests(changes),
        )
