"""collector/mqtt.py, the collector's own MQTT v5 client: packet framing without a
broker, then against a real Mosquitto (credentials, acknowledgement after the fact,
the persistent session, refusals, keep-alive)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path

import pytest

from bench.ingest import AGENT_PASSWORD, AGENT_USER, make_agent_user
from collector import mqtt
from lab.components import MQTT_COLLECTOR_PASSWORD, Mosquitto, free_port
from tests.support import until

ROOT = "cladnet/metrics/"


def _publish(topic: str, payload: bytes, mid: int, props: bytes = b"") -> bytes:
    qos = 1 if mid else 0
    body = mqtt._str(topic) + (mid.to_bytes(2, "big") if mid else b"")
    body += mqtt._varint(len(props)) + props + payload
    return mqtt._packet(mqtt.PUBLISH, qos << 1, body)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written, self.aborted = b"", False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


async def test_publishes_are_framed_whatever_the_reads_cut() -> None:
    got: list[tuple[str, bytes, int]] = []
    sent = [
        (f"{ROOT}n/h{i}", bytes([i % 251]) * size, mid)
        for i, (size, mid) in enumerate(
            [(0, 1), (1, 0), (120, 2), (127, 65535), (16_000, 3), (16_400, 0), (70_000, 4)]
        )
    ]
    # One with properties (payload format indicator, a user property): skipped over.
    props = b"\x01\x01" + b"\x26" + mqtt._str("k") + mqtt._str("v")
    sent.append((f"{ROOT}n/p", b"with properties", 9))
    stream = b"".join(_publish(t, p, m) for t, p, m in sent[:-1])
    stream += _publish(*sent[-1], props=props) + bytes([mqtt.PINGRESP << 4, 0])
    rng = random.Random(7)
    for _ in range(20):
        got.clear()
        conn = mqtt.Connection(lambda t, p, m: got.append((t, p, m)))
        transport = _Transport()
        conn.connection_made(transport)
        at = 0
        while at < len(stream):
            step = rng.choice([1, 2, 3, 50, 5000, 100_000])
            conn.data_received(stream[at : at + step])
            at += step
        assert got == sent
        assert not transport.aborted and not conn._buf


async def test_a_malformed_packet_drops_the_connection() -> None:
    conn = mqtt.Connection(lambda *_: None)
    transport = _Transport()
    conn.connection_made(transport)
    # A PUBLISH whose topic length runs past the packet.
    conn.data_received(bytes([0x32, 4, 0, 200, ord("a"), ord("b")]))
    assert transport.aborted
    with pytest.raises(mqtt.MqttError, match="malformed"):
        await conn.wait_closed()


async def test_acks_go_out_in_one_write() -> None:
    conn = mqtt.Connection(lambda *_: None)
    transport = _Transport()
    conn.connection_made(transport)
    conn.ack([1, 258, 65535])
    assert transport.written == b"\x40\x02\x00\x01\x40\x02\x01\x02\x40\x02\xff\xff"


# --- against Mosquitto ---------------------------------------------------------------


def _options(broker: Mosquitto, **kw: object) -> mqtt.ConnectOptions:
    base: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "client_id": "test-collector",
        "username": "cladnet-collector",
        "password": MQTT_COLLECTOR_PASSWORD,
        "session_expiry": 300,
        "receive_maximum": 10,
    }
    return mqtt.ConnectOptions(**(base | kw))  # type: ignore[arg-type]


async def _admin_publish(broker: Mosquitto, count: int, start: int = 0) -> None:
    """Publish as the bench's agents' user (it may publish metrics)."""
    conn = await mqtt.connect(
        _options(broker, client_id="test-agent", username=AGENT_USER, password=AGENT_PASSWORD),
        lambda *_: None,
    )
    try:
        codes = await asyncio.gather(
            *(conn.publish(f"{ROOT}n/h", f"{i}".encode()) for i in range(start, start + count))
        )
        assert codes == [0] * count
    finally:
        conn.close()


async def test_unacknowledged_messages_come_back_and_acknowledged_ones_do_not(
    tmp_path: Path,
) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    broker.start()
    make_agent_user(broker)
    try:
        got: list[tuple[bytes, int]] = []
        conn = await mqtt.connect(_options(broker), lambda t, p, m: got.append((p, m)))
        assert await conn.subscribe(f"$share/g/{ROOT}#", qos=1) == [1]
        await _admin_publish(broker, 30)
        # Receive maximum 10: the broker stops at 10 unacknowledged messages.
        await until(lambda: len(got) == 10, 10, what="10 messages")
        await asyncio.sleep(0.3)
        assert len(got) == 10
        conn.ack(m for _, m in got[:4])  # four stored; six not
        await until(lambda: len(got) > 10, 10, what="more after the acks")
        conn.close()
        await conn.wait_closed()  # closed here: no error
        # The same session: the six (and the rest) come again, the four never.
        again: list[tuple[bytes, int]] = []
        conn = await mqtt.connect(_options(broker), lambda t, p, m: again.append((p, m)))
        assert conn.session_present
        expected = {f"{i}".encode() for i in range(30)} - {p for p, _ in got[:4]}
        acked = 0
        try:
            async with asyncio.timeout(10):
                while {p for p, _ in again} != expected:
                    conn.ack(m for _, m in again[acked:])
                    acked = len(again)
                    await asyncio.sleep(0.05)
            conn.ack(m for _, m in again[acked:])
            await asyncio.sleep(0.3)  # and nothing more comes
            assert sorted(p for p, _ in again) == sorted(expected)
        finally:
            conn.close()
    finally:
        broker.stop()


async def test_refusals_are_mqtt_errors(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    broker.start()
    try:
        with pytest.raises(mqtt.MqttError, match="refused the connection"):
            await mqtt.connect(_options(broker, password="wrong"), lambda *_: None)
        conn = await mqtt.connect(_options(broker), lambda *_: None)
        try:
            # The collector's role may not read the agents' acks.
            codes = await conn.subscribe("cladnet/acks/#", qos=1)
            assert all(code >= 0x80 for code in codes)
        finally:
            conn.close()
        with pytest.raises(mqtt.MqttError, match="cannot connect"):
            await mqtt.connect(_options(broker, port=free_port()), lambda *_: None)
    finally:
        broker.stop()


async def test_pings_keep_a_quiet_connection_and_notice_a_frozen_broker(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    broker.start()
    assert broker.proc is not None
    pid = broker.proc.pid
    try:
        conn = await mqtt.connect(_options(broker, keepalive=1), lambda *_: None)
        # Mosquitto drops a client silent for 1.5 keep-alives: the pings keep it.
        await asyncio.sleep(3)
        assert await conn.subscribe(f"$share/g/{ROOT}#", qos=1) == [1]
        os.kill(pid, signal.SIGSTOP)  # a frozen broker closes nothing
        try:
            async with asyncio.timeout(5):
                with pytest.raises(mqtt.MqttError, match="stopped answering"):
                    await conn.wait_closed()
        finally:
            os.kill(pid, signal.SIGCONT)
        conn.close()
    finally:
        broker.stop()
