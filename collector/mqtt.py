"""The collector's MQTT v5 client: one connection, parsed in ``data_received``.

What the collector needs and no more: connect (persistent session, receive maximum,
user and password, TLS), subscribe, take PUBLISH packets (QoS 0 and 1), acknowledge
them when *it* decides (after they are stored), publish QoS 1 messages (the per-host
acks) within the broker's receive maximum, keep-alive pings.

Why not aiomqtt here (the agent and the controller keep it): through aiomqtt each
message cost the collector ≈ 150 µs of Python before its batch was even decoded —
paho builds a ``Properties`` object per PUBLISH, then aiomqtt hands it through an
asyncio queue and a task per read — about two thirds of the receive path. Here a
PUBLISH is a few slices of the read buffer and one call of ``on_message``, in the
event loop, in arrival order. Acknowledging after storage also needed aiomqtt's
private paho client; here it is this client's own ``ack``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: Called for each PUBLISH: topic, payload, packet id (0 for QoS 0; acknowledge others).
OnMessage = Callable[[str, bytes, int], None]

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
# MQTT v5 properties the client reads, by id: how each is encoded.
_PROPERTY_KINDS = {
    0x01: "byte", 0x02: "int4", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint",
    0x11: "int4", 0x12: "str", 0x13: "int2", 0x15: "str", 0x16: "bin", 0x17: "byte",
    0x19: "byte", 0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "int2", 0x22: "int2",
    0x23: "int2", 0x24: "byte", 0x25: "byte", 0x26: "pair", 0x27: "int4", 0x28: "byte",
    0x29: "byte", 0x2A: "byte",
}  # fmt: skip
SERVER_KEEP_ALIVE, RECEIVE_MAXIMUM, REASON_STRING = 0x13, 0x21, 0x1F


class MqttError(Exception):
    """The connection failed, was refused or was lost; reconnect to carry on."""


@dataclass
class ConnectOptions:
    """What the CONNECT says, and where to."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    keepalive: int = 30
    clean_start: bool = False
    session_expiry: int = 0  # seconds the broker keeps the session after a disconnect
    receive_maximum: int = 65535  # unacknowledged QoS 1 messages the broker may send
    timeout: float = 10.0  # for the TCP/TLS connect and the CONNACK


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


def _read_varint(buf: bytes | bytearray, at: int) -> tuple[int, int]:
    """A variable byte integer at ``at``: its value and the offset after it."""
    value, shift = 0, 0
    while True:
        if at >= len(buf) or shift > 21:
            raise MqttError("malformed variable byte integer")
        byte = buf[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _properties(buf: bytes, at: int) -> tuple[dict[int, object], int]:
    """A property block at ``at``: the properties by id, and the offset after it."""
    length, at = _read_varint(buf, at)
    end = at + length
    props: dict[int, object] = {}
    while at < end:
        pid, at = _read_varint(buf, at)
        kind = _PROPERTY_KINDS.get(pid)
        value: object
        if kind == "byte":
            value, at = buf[at], at + 1
        elif kind == "int2":
            value, at = int.from_bytes(buf[at : at + 2], "big"), at + 2
        elif kind == "int4":
            value, at = int.from_bytes(buf[at : at + 4], "big"), at + 4
        elif kind == "varint":
            value, at = _read_varint(buf, at)
        elif kind in ("str", "bin"):
            n = int.from_bytes(buf[at : at + 2], "big")
            raw, at = buf[at + 2 : at + 2 + n], at + 2 + n
            value = raw.decode(errors="replace") if kind == "str" else raw
        elif kind == "pair":
            for _ in range(2):
                at += 2 + int.from_bytes(buf[at : at + 2], "big")
            continue
        else:
            raise MqttError(f"unknown MQTT property {pid:#x}")
        props[pid] = value
    if at != end:
        raise MqttError("malformed property block")
    return props, end


def _reason(code: int, props: dict[int, object]) -> str:
    text = props.get(REASON_STRING)
    return f"reason code {code:#04x}" + (f" ({text})" if text else "")


class Connection(asyncio.Protocol):
    """One MQTT v5 connection (see :func:`connect`)."""

    def __init__(self, on_message: OnMessage) -> None:
        self.on_message = on_message
        self.session_present = False
        self.keepalive = 0
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._connack: asyncio.Future[tuple[int, int, dict[int, object]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting: dict[int, asyncio.Future[bytes]] = {}  # packet id → SUBACK/PUBACK
        self._next_id = 0
        self._inflight: asyncio.Semaphore | None = None  # the broker's receive maximum
        self._last_in = time.monotonic()
        self._pinger: asyncio.Task[None] | None = None
        self._paused = False

    # ---- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(MqttError(f"connection lost: {exc!r}" if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:
        """Take every complete packet in the buffer; PUBLISH inline, the hot path."""
        self._last_in = time.monotonic()
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        view = memoryview(buf)  # slices copied once, straight into bytes
        try:
            while end - pos >= 2:
                # Fixed header: type and flags, then the remaining length (1-4 bytes).
                length, shift, at = 0, 0, pos + 1
                while True:
                    if at >= end:
                        return
                    byte = buf[at]
                    length |= (byte & 0x7F) << shift
                    at += 1
                    if byte < 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttError("malformed remaining length")
                stop = at + length
                if stop > end:
                    return
                header = buf[pos]
                pos = stop
                if header >> 4 == PUBLISH:
                    qos = (header >> 1) & 3
                    if qos > 1:  # we subscribe with QoS 1: the broker never sends 2
                        raise MqttError("a QoS 2 PUBLISH")
                    topic_end = at + 2 + (buf[at] << 8 | buf[at + 1])
                    if topic_end + 2 * qos >= stop:  # no room for the id and properties
                        raise MqttError("malformed PUBLISH")
                    topic = str(view[at + 2 : topic_end], "utf-8")
                    mid = 0
                    if qos:
                        mid = buf[topic_end] << 8 | buf[topic_end + 1]
                        topic_end += 2
                    start = topic_end + 1  # the usual empty property block
                    if buf[topic_end]:
                        start = _properties(bytes(view[topic_end:stop]), 0)[1] + topic_end
                    self.on_message(topic, bytes(view[start:stop]), mid)
                else:
                    self._control(header, bytes(view[at:stop]))
        except (MqttError, IndexError, UnicodeDecodeError) as exc:
            self._abort(exc if isinstance(exc, MqttError) else MqttError(f"bad packet: {exc!r}"))
        finally:
            view.release()
            del buf[:pos]

    def _control(self, header: int, body: bytes) -> None:
        kind = header >> 4
        if kind in (PUBACK, SUBACK):
            waiter = self._waiting.pop(int.from_bytes(body[:2], "big"), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body)
        elif kind == PINGRESP:
            pass
        elif kind == CONNACK:
            props, _ = _properties(body, 2)
            if not self._connack.done():
                self._connack.set_result((body[0], body[1], props))
        elif kind == DISCONNECT:
            code = body[0] if body else 0
            props = _properties(body, 1)[0] if len(body) > 1 else {}
            raise MqttError(f"the broker disconnected: {_reason(code, props)}")
        else:
            raise MqttError(f"unexpected MQTT packet type {kind}")

    # ---- the client's side ------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _fail(self, exc: MqttError) -> None:
        if not self._closed.done():
            self._closed.set_exception(exc)
            self._closed.exception()  # retrieved: nobody need wait for a failed connect
        if not self._connack.done():
            self._connack.set_exception(exc)
            self._connack.exception()  # retrieved: no CONNACK is awaited after connect
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(exc)
        self._waiting.clear()
        if self._pinger is not None:
            self._pinger.cancel()

    def _abort(self, exc: MqttError) -> None:
        self._fail(exc)
        if self._transport is not None:
            self._transport.abort()

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise MqttError("no free packet id")

    async def _request(self, packet: Callable[[int], bytes]) -> bytes:
        """Send a packet that the broker answers by packet id; its answer's body."""
        if self._closed.done():
            raise MqttError("the connection is closed")
        mid = self._packet_id()
        waiter = self._waiting[mid] = asyncio.get_running_loop().create_future()
        self._write(packet(mid))
        return await waiter

    async def _handshake(self, options: ConnectOptions) -> None:
        flags = 0x02 if options.clean_start else 0
        payload = _str(options.client_id)
        if options.username is not None:
            flags |= 0x80
            payload += _str(options.username)
        if options.password is not None:
            flags |= 0x40
            payload += _str(options.password)
        props = b"\x11" + options.session_expiry.to_bytes(4, "big")
        props += b"\x21" + options.receive_maximum.to_bytes(2, "big")
        body = b"\x00\x04MQTT\x05" + bytes([flags]) + options.keepalive.to_bytes(2, "big")
        self._write(_packet(CONNECT, 0, body + _varint(len(props)) + props + payload))
        ack_flags, code, server = await self._connack
        if code >= 0x80:
            raise MqttError(f"the broker refused the connection: {_reason(code, server)}")
        self.session_present = bool(ack_flags & 1)
        keepalive = server.get(SERVER_KEEP_ALIVE, options.keepalive)
        self.keepalive = keepalive if isinstance(keepalive, int) else options.keepalive
        most = server.get(RECEIVE_MAXIMUM, 65535)
        self._inflight = asyncio.Semaphore(most if isinstance(most, int) and most else 65535)
        if self.keepalive:
            self._pinger = asyncio.get_running_loop().create_task(self._ping())

    async def _ping(self) -> None:
        # A ping every half keep-alive; a broker silent for 1.5 of them is gone (a
        # frozen broker closes nothing, so only this notices).
        while True:
            await asyncio.sleep(self.keepalive / 2)
            silent = time.monotonic() - self._last_in > 1.5 * self.keepalive
            if silent and not self._paused:  # paused: the answers wait unread
                self._abort(MqttError("the broker stopped answering pings"))
                return
            self._write(bytes([PINGREQ << 4, 0]))

    async def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        """Subscribe to one topic filter; the broker's reason codes (≥ 0x80: refused)."""
        body = await self._request(
            lambda mid: _packet(
                SUBSCRIBE, 2, mid.to_bytes(2, "big") + b"\x00" + _str(topic) + bytes([qos])
            )
        )
        _, at = _properties(body, 2)
        return list(body[at:])

    def pause_reading(self) -> None:
        """Take no more packets off the socket until :meth:`resume_reading` (TCP then
        holds the broker back); packets already read are still handed on."""
        if not self._paused and self._transport is not None and not self._transport.is_closing():
            self._paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again after :meth:`pause_reading`."""
        if self._paused:
            self._paused = False
            self._last_in = time.monotonic()  # the pause was ours, not the broker's silence
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()

    def ack(self, mids: Iterable[int]) -> None:
        """PUBACK these QoS 1 messages, in one write (a no-op on a closed connection)."""
        self._write(b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids))

    async def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; the reason code of the broker's PUBACK (≥ 0x80: refused)."""
        assert self._inflight is not None, "publish before connect"
        async with self._inflight:
            body = await self._request(
                lambda mid: _packet(
                    PUBLISH, 2, _str(topic) + mid.to_bytes(2, "big") + b"\x00" + payload
                )
            )
        return body[2] if len(body) > 2 else 0

    async def wait_closed(self) -> None:
        """Return when the connection is gone; raise MqttError unless it was closed here."""
        await asyncio.shield(self._closed)

    def close(self) -> None:
        """DISCONNECT (normal: the session stays for ``session_expiry``) and close."""
        if not self._closed.done():
            self._write(bytes([DISCONNECT << 4, 0]))
            self._closed.set_result(None)
        self._fail(MqttError("the connection is closed"))
        if self._transport is not None:
            self._transport.close()


async def connect(options: ConnectOptions, on_message: OnMessage) -> Connection:
    """Open a connection and complete the CONNECT handshake; MqttError if that fails."""
    loop = asyncio.get_running_loop()
    conn = Connection(on_message)
    try:
        async with asyncio.timeout(options.timeout):
            await loop.create_connection(
                lambda: conn,
                options.host,
                options.port,
                ssl=options.tls,
                server_hostname=options.host if options.tls else None,
            )
            await conn._handshake(options)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        conn.close()
        raise MqttError(f"cannot connect to {options.host}:{options.port}: {exc!r}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the broker's certificate and name against ``ca_file`` (None: the system's CAs)."""
    return ssl.create_default_context(cafile=ca_file)
