"""wireguard-go, driven over its UAPI socket with WireGuard's cross-platform text protocol.

One request per connection: ``get=1\\n\\n`` or ``set=1\\n<key=value lines>\\n``; the answer
ends with ``errno=<n>\\n\\n`` (0 = success). Keys travel in hex. The socket lives in
``/var/run/wireguard/<ifname>.sock``, a directory that every network namespace of the
machine shares, so interface names must be unique machine-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from agent import link
from agent.wireguard.backend import WireGuardError, check_name
from cladnet.keys import hex_to_key, key_to_hex
from cladnet.mesh import DeviceChanges, DeviceState, PeerState, normalize_endpoint

SOCKET_DIR = Path("/var/run/wireguard")
MAX_REPLY = 1 << 24  # a get with thousands of peers is a few hundred kB


def set_request(changes: DeviceChanges, private_key: str | None = None) -> str:
    """The UAPI ``set`` request for ``changes`` (empty string when there is nothing to do).

    Updates carry ``update_only=true`` so a peer removed meanwhile is not re-created
    half-configured; only the changed fields are sent, so the peer keeps its session.
    """
    lines: list[str] = []
    if private_key is not None:
        lines.append(f"private_key={key_to_hex(private_key)}")
    if changes.listen_port is not None:
        lines.append(f"listen_port={changes.listen_port}")
    for key in changes.peers_to_remove:
        lines += [f"public_key={key_to_hex(key)}", "remove=true"]
    for peer in changes.peers_to_add:
        lines += [f"public_key={key_to_hex(peer.public_key)}", "replace_allowed_ips=true"]
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.keepalive}")
        lines += [f"allowed_ip={ip}" for ip in peer.allowed_ips]
    for key, update in changes.peers_to_update.items():
        lines += [f"public_key={key_to_hex(key)}", "update_only=true"]
        if update.endpoint is not None:
            lines.append(f"endpoint={update.endpoint}")
        if update.keepalive is not None:
            lines.append(f"persistent_keepalive_interval={update.keepalive}")
        if update.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={ip}" for ip in update.allowed_ips]
    if not lines:
        return ""
    return "set=1\n" + "".join(line + "\n" for line in lines) + "\n"


def _peer_state(fields: dict[str, str], allowed: list[str]) -> PeerState:
    seconds = int(fields.get("last_handshake_time_sec", "0"))
    nanoseconds = int(fields.get("last_handshake_time_nsec", "0"))
    endpoint = fields.get("endpoint")
    return PeerState(
        public_key=hex_to_key(fields["public_key"]),
        allowed_ips=tuple(allowed),
        endpoint=normalize_endpoint(endpoint) if endpoint else None,
        keepalive=int(fields.get("persistent_keepalive_interval", "0")),
        last_handshake=seconds + nanoseconds / 1e9 if seconds else None,
        rx_bytes=int(fields.get("rx_bytes", "0")),
        tx_bytes=int(fields.get("tx_bytes", "0")),
    )


def parse_get(lines: Iterable[str]) -> DeviceState:
    """A :class:`DeviceState` from the ``key=value`` lines of a UAPI ``get`` answer."""
    device: dict[str, str] = {}
    peers: list[tuple[dict[str, str], list[str]]] = []  # (fields, allowed ips) per peer
    for line in lines:
        key, _, value = line.partition("=")
        if key == "public_key":
            peers.append(({}, []))
        if not peers:
            device[key] = value  # device lines come before the first peer
        elif key == "allowed_ip":
            peers[-1][1].append(value)
        else:
            peers[-1][0][key] = value
    states = [_peer_state(fields, allowed) for fields, allowed in peers]
    return DeviceState(
        listen_port=int(device["listen_port"]) if "listen_port" in device else None,
        peers={state.public_key: state for state in states},
    )


class UserspaceBackend:
    """WireGuard devices served by ``wireguard-go`` processes.

    ``create`` starts ``wireguard-go -f <ifname>`` (foreground, so it stays our child
    instead of daemonizing) in a session of its own, so the device outlives an agent
    restart and a Ctrl-C to the agent's terminal. ``netns`` runs it inside that named
    network namespace (its socket still appears in the shared directory). ``log_dir``
    keeps wireguard-go's output; by default it is discarded, never piped: Go exits on a
    write to a closed pipe, which would take the device down with a restarted agent.
    """

    kind = "userspace"

    def __init__(
        self,
        *,
        netns: str | None = None,
        binary: str = "wireguard-go",
        socket_dir: Path = SOCKET_DIR,
        log_dir: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.netns = netns
        self.binary = binary
        self.socket_dir = socket_dir
        self.log_dir = log_dir
        self.timeout = timeout
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """Interface name → the wireguard-go processes this backend started and still runs."""
        return {name: proc for name, proc in self._procs.items() if proc.poll() is None}

    def socket_path(self, name: str) -> Path:
        """The UAPI socket of device ``name``."""
        return self.socket_dir / f"{check_name(name)}.sock"

    async def _request(self, name: str, request: str) -> list[str]:
        """Send one UAPI request; the answer's lines without the final ``errno``."""
        path = self.socket_path(name)
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REPLY)
                try:
                    writer.write(request.encode())
                    # After a bad line wireguard-go answers and stops reading: the
                    # answer, not the broken pipe, says what went wrong.
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
                    reply = await reader.readuntil(b"\n\n")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise WireGuardError(f"no wireguard-go device {name!r} ({path})") from exc
        except TimeoutError as exc:
            raise WireGuardError(f"wireguard-go device {name!r} did not answer") from exc
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            raise WireGuardError(f"wireguard-go device {name!r}: {exc!r}") from exc
        lines = reply.decode().rstrip("\n").split("\n")
        key, _, value = lines[-1].partition("=")
        if key != "errno":
            raise WireGuardError(f"wireguard-go device {name!r}: unexpected answer {lines[-1]!r}")
        if int(value) != 0:
            code = -int(value)
            raise WireGuardError(
                f"wireguard-go device {name!r} refused the request: {os.strerror(code)}",
                errno=code,
            )
        return lines[:-1]

    async def _answers(self, name: str) -> bool:
        try:
            await self._request(name, "get=1\n\n")
        except WireGuardError:
            return False
        return True

    async def exists(self, name: str) -> bool:
        """Whether the device exists here: its link is in our namespace and wireguard-go answers.

        The socket alone proves nothing: a device of that name in another namespace
        answers on the same path.
        """
        return await link.exists(name, netns=self.netns) and await self._answers(name)

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        args = [self.binary, "-f", name]
        if self.netns is not None:
            args = ["ip", "netns", "exec", self.netns, *args]  # execs: the PID stays the same
        log = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = (self.log_dir / f"wireguard-go-{name}.log").open("ab")
        try:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log if log is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise WireGuardError(f"cannot start {self.binary}: {exc}") from exc
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor

    async def create(self, name: str) -> None:
        """Start wireguard-go for ``name`` unless one already serves it; wait until it answers."""
        if await self._answers(name):
            if await link.exists(name, netns=self.netns):
                return
            raise WireGuardError(
                f"{name!r} is served by wireguard-go in another network namespace: sockets in "
                f"{self.socket_dir} are shared by the whole machine, so names must be unique"
            )
        proc = self._spawn(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not await self._answers(name):
            if proc.poll() is not None:
                raise WireGuardError(
                    f"wireguard-go for {name!r} exited with status {proc.returncode}"
                )
            if loop.time() > deadline:
                await self._stop(proc)
                raise WireGuardError(f"wireguard-go for {name!r} did not open its socket")
            await asyncio.sleep(0.02)
        self._procs[name] = proc

    async def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        # SIGTERM: wireguard-go closes the TUN device (the link goes) and its socket.
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, self.timeout)

    async def destroy(self, name: str) -> None:
        """Remove the device: stop our wireguard-go, or delete the link of an earlier one.

        A device of that name in another namespace is not ours and is left alone.
        """
        proc = self._procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            await self._stop(proc)
        elif await self.exists(name):
            # Started by an earlier agent: wireguard-go exits once its TUN link is gone.
            await link.delete(name, netns=self.netns)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while await self._answers(name):
                if loop.time() > deadline:
                    raise WireGuardError(f"wireguard-go for {name!r} did not exit")
                await asyncio.sleep(0.02)

    async def get(self, name: str) -> DeviceState:
        """The device's port, public key and peers with handshake time and byte counters."""
        return parse_get(await self._request(name, "get=1\n\n"))

    async def set_private_key(self, name: str, private_key: str) -> None:
        """Set the private key; wireguard-go ignores a key equal to the current one."""
        await self._request(name, set_request(DeviceChanges(), private_key))

    async def apply(
        self, name: str, changes: DeviceChanges, private_key: str | None = None
    ) -> None:
        """Send ``changes`` in one ``set`` request.

        Not atomic: wireguard-go applies lines as it reads them, so after an error the
        lines before the bad one stay applied. Re-planning and re-diffing repairs that.
        """
        request = set_request(changes, private_key)
        if request:
            await self._request(name, request)
