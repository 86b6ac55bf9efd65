"""Names of the overlay: the zone, the answers, the hosts-file block and the server.

No root needed: the server is tested on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import dns as agent_dns
from agent import resolver_setup
from agent.dns import DnsServer
from agent.names import Names, read_status
from agent.state import Membership
from cladnet import dns, hostsfile
from cladnet.keys import generate_keypair
from cladnet.models import JoinRequest, NetworkCreate

NET = {"name": "prod", "cidr": "10.213.0.0/24"}
PUBLIC_KEY = generate_keypair()[1]
HOSTS = [
    {"name": "db-1", "overlay_ip": "10.213.0.5"},
    {"name": "Web", "overlay_ip": "10.213.0.6"},
    {"name": "app.eu", "overlay_ip": "10.213.0.7"},
]


def ask(zone: dns.Zone, name: str, qtype: str = "A") -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    reply, _ = dns.answer(q.pack(), zone)
    r = DNSRecord.parse(reply)
    assert r.header.id == q.header.id and r.header.qr == 1 and r.header.ra == 0
    return r


@pytest.fixture
def zone() -> dns.Zone:
    return dns.build_zone(NET, HOSTS)


def test_a_record_for_a_host(zone: dns.Zone) -> None:
    r = ask(zone, "db-1.prod.cladnet.internal")
    assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1
    assert [str(a.rdata) for a in r.rr] == ["10.213.0.5"]
    assert r.rr[0].ttl == dns.TTL


def test_names_are_case_insensitive(zone: dns.Zone) -> None:
    for name in ("DB-1.Prod.CLADNET.internal", "web.prod.cladnet.internal."):
        r = ask(zone, name)
        assert r.header.rcode == RCODE.NOERROR and len(r.rr) == 1, name


def test_unknown_name_in_the_zone_is_nxdomain(zone: dns.Zone) -> None:
    for name in ("db-2.prod.cladnet.internal", "x.db-1.prod.cladnet.internal"):
        r = ask(zone, name)
        assert r.header.rcode == RCODE.NXDOMAIN and not r.rr, name


def test_existing_name_without_the_type_is_nodata(zone: dns.Zone) -> None:
    r = ask(zone, "db-1.prod.cladnet.internal", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and not r.rr
    # The domain itself and a parent of a dotted host name exist.
    for name in ("prod.cladnet.internal", "eu.prod.cladnet.internal"):
        assert ask(zone, name).header.rcode == RCODE.NOERROR, name
    assert [str(a.rdata) for a in ask(zone, "app.eu.prod.cladnet.internal").rr] == ["10.213.0.7"]


def test_names_outside_the_zone_are_refused_never_forwarded(zone: dns.Zone) -> None:
    for name in (
        "example.com",
        "cladnet.internal",  # the parent: other networks are not ours to answer
        "db-1.staging.cladnet.internal",
        "db-1.prod.cladnet.internal.evil.com",
        "1.1.168.192.in-addr.arpa",  # a reverse name outside the network
    ):
        r = ask(zone, name)
        assert r.header.rcode == RCODE.REFUSED and not r.rr, name


def test_ptr_for_overlay_ips(zone: dns.Zone) -> None:
    r = ask(zone, "5.0.213.10.in-addr.arpa", "PTR")
    assert [str(a.rdata) for a in r.rr] == ["db-1.prod.cladnet.internal."]
    assert ask(zone, "99.0.213.10.in-addr.arpa", "PTR").header.rcode == RCODE.NXDOMAIN


def test_zone_is_configurable_per_network() -> None:
    z = dns.build_zone({**NET, "dns_zone": "corp.example"}, HOSTS)
    assert z.domain == "prod.corp.example"
    assert ask(z, "db-1.prod.corp.example").header.rcode == RCODE.NOERROR
    assert ask(z, "db-1.prod.cladnet.internal").header.rcode == RCODE.REFUSED
    assert NetworkCreate(name="x").dns_zone == "cladnet.internal"
    with pytest.raises(ValueError):
        NetworkCreate(name="x", dns_zone="bad zone")


@pytest.mark.parametrize(
    "fields",
    [{"name": "prod\n"}, {"name": "x", "dns_zone": "corp\n"}, {"name": "x", "dns_zone": "a..b"}],
)
def test_the_controller_refuses_names_that_are_not_dns_labels(fields: dict) -> None:
    """A trailing newline passed `^…$` before: it would have reached names and /etc/hosts."""
    with pytest.raises(ValueError):
        NetworkCreate(**fields)


def test_hostnames_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(ValueError):
        JoinRequest(token="t", hostname="web\n", public_key=PUBLIC_KEY)
    assert JoinRequest(token="t", hostname="web", public_key=PUBLIC_KEY).hostname == "web"


def test_hosts_that_cannot_be_named_are_skipped() -> None:
    z = dns.build_zone(
        NET,
        [
            {"name": "a" * 64, "overlay_ip": "10.213.0.9"},  # label > 63
            {"name": "ok", "overlay_ip": "192.168.1.1"},  # not in the network
            {"name": "ok2", "overlay_ip": "not-an-ip"},
            {"name": "ok3", "overlay_ip": "10.213.0.10"},
            # What would inject lines into /etc/hosts.
            {"name": "x\n", "overlay_ip": "10.213.0.11"},
            {"name": "y\n10.0.0.1 bank", "overlay_ip": "10.213.0.12"},
            {"name": "z\tw", "overlay_ip": "10.213.0.13"},
        ],
    )
    assert z.names() == {"ok3.prod.cladnet.internal": "10.213.0.10"}
    assert set(z.skipped) == {"a" * 64, "ok", "ok2", "x\n", "y\n10.0.0.1 bank", "z\tw"}


def test_odd_queries_get_an_error_not_a_crash(zone: dns.Zone) -> None:
    q = DNSRecord.question("db-1.prod.cladnet.internal")
    two = q.pack()
    # Two questions → FORMERR.
    q.add_question(*DNSRecord.question("web.prod.cladnet.internal").questions)
    assert dns.answer(q.pack(), zone)[1] == RCODE.FORMERR
    # Opcode NOTIFY (4) → NOTIMP.
    notify = bytearray(two)
    notify[2] = (notify[2] & 0x87) | (4 << 3)
    assert dns.answer(bytes(notify), zone)[1] == RCODE.NOTIMP
    # Class CHAOS → REFUSED.
    chaos = DNSRecord.question("version.bind", "TXT", "CH")
    assert dns.answer(chaos.pack(), zone)[1] == RCODE.REFUSED


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x00" * 5,  # shorter than a header
        bytes(DNSRecord.question("db-1.prod.cladnet.internal").pack())[:20],  # truncated
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # ptr loop
        b"\xff" * (dns.MAX_QUERY + 1),  # too long
    ],
)
def test_junk_packets_are_junk(zone: dns.Zone, packet: bytes) -> None:
    with pytest.raises(dns.Junk):
        dns.answer(packet, zone)


def test_responses_are_never_answered(zone: dns.Zone) -> None:
    """A reply sent to the server (e.g. spoofed from another resolver) would loop."""
    reply, _ = dns.answer(DNSRecord.question("db-1.prod.cladnet.internal").pack(), zone)
    with pytest.raises(dns.Junk):
        dns.answer(reply, zone)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_any_bytes_give_a_reply_or_junk(packet: bytes) -> None:
    z = dns.build_zone(NET, HOSTS)
    try:
        reply, _ = dns.answer(packet, z)
    except dns.Junk:
        return
    assert len(reply) <= 512  # fits a plain UDP answer


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=12), st.binary(max_size=300))
def test_fuzz_query_shaped_packets(header: bytes, body: bytes) -> None:
    """A header with the query bit clear and one question, then random bytes."""
    head = bytearray(header)
    head[2] &= 0x7F
    head[4:6] = b"\x00\x01"
    z = dns.build_zone(NET, HOSTS)
    try:
        dns.answer(bytes(head) + body, z)
    except dns.Junk:
        pass


# --- the hosts-file block -----------------------------------------------------------------


def test_hosts_block_replaces_only_its_own_lines() -> None:
    other = "127.0.0.1\tlocalhost\n# BEGIN cladnet staging\n10.1.0.1\ta\n# END cladnet staging\n"
    one = hostsfile.replace_block(other, "prod", hostsfile.render("prod", {"a.p": "10.0.0.1"}))
    assert one.startswith(other) and "10.0.0.1\ta.p\n# END cladnet prod\n" in one
    two = hostsfile.replace_block(one, "prod", hostsfile.render("prod", {"b.p": "10.0.0.2"}))
    assert "a.p" not in two and "10.0.0.2\tb.p" in two and two.startswith(other)
    assert hostsfile.replace_block(two, "prod", "") == other
    # A file without a final newline keeps its last line intact.
    block = hostsfile.render("p", {"n": "1.2.3.4"})
    assert hostsfile.replace_block("::1 x", "p", block) == "::1 x\n" + block
    # A begin marker left alone (a hand edit) drops only itself.
    assert hostsfile.replace_block("# BEGIN cladnet p\n1.1.1.1 keep\n", "p", "") == "1.1.1.1 keep\n"


def test_write_hosts_block_is_atomic_and_preserves_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n")
    path.chmod(0o644)
    inode = path.stat().st_ino
    assert resolver_setup.write_hosts_block(path, "prod", {"db-1.prod.x": "10.0.0.5"})
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert path.stat().st_mode & 0o777 == 0o644
    assert "10.0.0.5\tdb-1.prod.x" in path.read_text()
    assert not resolver_setup.write_hosts_block(path, "prod", {"db-1.prod.x": "10.0.0.5"})
    assert resolver_setup.write_hosts_block(path, "prod", {})
    assert path.read_text() == "127.0.0.1 localhost\n"
    assert [p.name for p in tmp_path.iterdir()] == ["hosts"]  # no temp file left


# --- the server -----------------------------------------------------------------------------


def _free_udp_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LO_NET = {"name": "prod", "cidr": "127.0.0.0/8"}
LO_HOSTS = [{**h, "overlay_ip": h["overlay_ip"].replace("10.213.", "127.0.")} for h in HOSTS]


def test_only_sources_inside_the_network_are_answered_at_a_bounded_rate() -> None:
    now = [100.0]
    server = DnsServer(dns.build_zone(NET, HOSTS), clock=lambda: now[0])
    q = DNSRecord.question("db-1.prod.cladnet.internal").pack()
    # A forged source from the underlay gets nothing: no reflection, only a count.
    assert server.handle(q, "192.0.2.7") is None and server.junk == 1
    assert server.handle(q, "not an ip") is None and server.junk == 2
    assert server.handle(q, "10.213.0.6") is not None
    # One peer flooding: answered up to the burst, then dropped and counted.
    answered = sum(server.handle(q, "10.213.0.7") is not None for _ in range(3000))
    assert answered == agent_dns.BURST and server.limited == 3000 - answered
    now[0] += 1.0  # a second later the peer has RATE more
    answered = sum(server.handle(q, "10.213.0.7") is not None for _ in range(3000))
    assert answered == agent_dns.RATE
    assert server.handle(q, "10.213.0.5") is not None  # other peers are unaffected
    assert server.gauges()["agent_dns_rate_limited_total"] == server.limited


async def test_server_answers_udp_and_tcp_counts_junk_and_follows_updates() -> None:
    server = DnsServer(dns.build_zone(LO_NET, LO_HOSTS))
    port = _free_udp_tcp_port()
    await server.start("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    try:

        async def udp(packet: bytes) -> bytes | None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, packet)
                return await asyncio.wait_for(loop.sock_recv(sock, 4096), 2)
            except TimeoutError:
                return None
            finally:
                sock.close()

        q = DNSRecord.question("web.prod.cladnet.internal")
        r = DNSRecord.parse(await udp(q.pack()) or b"")
        assert [str(a.rdata) for a in r.rr] == ["127.0.0.6"]

        assert await udp(b"\x01\x02junk") is None
        assert server.junk == 1
        # Still serving after junk.
        assert await udp(q.pack()) is not None

        # TCP, two queries on one connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for name, rcode in (("db-1.prod.cladnet.internal", 0), ("example.com", RCODE.REFUSED)):
            packet = DNSRecord.question(name).pack()
            writer.write(struct.pack("!H", len(packet)) + packet)
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            assert DNSRecord.parse(await reader.readexactly(length)).header.rcode == rcode
        writer.close()

        # An oversized TCP length: the connection is closed, the packet counted as junk.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\xff\xff" + b"x" * 10)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert server.junk == 2

        # The peer state changes: the answer follows.
        server.update(dns.build_zone(LO_NET, LO_HOSTS[:1]))
        r = DNSRecord.parse(await udp(q.pack()) or b"")
        assert r.header.rcode == RCODE.NXDOMAIN
        assert server.gauges()["agent_dns_junk_total"] == 2.0
        assert server.queries == 5  # 3 over UDP, 2 over TCP; junk is not a query
    finally:
        await server.close()


def test_qtype_any_gets_the_a_record(zone: dns.Zone) -> None:
    r = ask(zone, "db-1.prod.cladnet.internal", "ANY")
    assert [QTYPE[a.rtype] for a in r.rr] == ["A"]


# --- the agent's names: server + host resolver, as the daemon drives them -------------------


def _membership(peers: list[dict]) -> Membership:
    net = {"id": "n-1", "name": "prod", "cidr": "127.0.0.0/24"}
    me = {"id": "h-1", "name": "db-1", "overlay_ip": "127.0.0.1"}
    return Membership("http://c", "h-1", "cl-prod", net, me, {p["id"]: p for p in peers})


async def test_resolved_mode_registers_a_routing_only_domain_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "resolvectl"
    fake.parent.mkdir()
    fail = tmp_path / "fail"
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n[ ! -e {fail} ] || {{ echo no >&2; exit 1; }}\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(resolver_setup, "RESOLVED_RUNTIME", tmp_path)  # "resolved runs here"
    monkeypatch.setenv("CLADNET_DNS", "auto")
    names = Names(tmp_path / "net", "cl-prod", port=_free_udp_tcp_port())
    try:
        # resolvectl fails: reported in status, not raised, tried again at the next change.
        fail.touch()
        await names.refresh(_membership([]))
        status = read_status(tmp_path / "net")
        assert status is not None and "resolvectl dns cl-prod 127.0.0.1: no" in status["error"]
        fail.unlink()
        calls.unlink()
        await names.refresh(_membership([]))
        await names.refresh(_membership([{"id": "h-2", "name": "web", "overlay_ip": "127.0.0.2"}]))
        assert calls.read_text().splitlines() == [
            "dns cl-prod 127.0.0.1",
            "domain cl-prod ~prod.cladnet.internal",
            "default-route cl-prod false",
        ]
        status = read_status(tmp_path / "net")
        assert status is not None and status["mode"] == "resolved" and status["error"] is None
        assert names.server is not None and names.server.zone.names() == {
            "db-1.prod.cladnet.internal": "127.0.0.1",
            "web.prod.cladnet.internal": "127.0.0.2",
        }
        await names.remove()
        assert calls.read_text().splitlines()[-1] == "revert cl-prod"
    finally:
        await names.close()


async def test_hosts_mode_follows_peers_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    monkeypatch.setenv("CLADNET_DNS", "hosts")
    monkeypatch.setenv("CLADNET_HOSTS_FILE", str(hosts))
    names = Names(tmp_path / "net", "cl-prod", port=_free_udp_tcp_port())
    try:
        web = {"id": "h-2", "name": "web", "overlay_ip": "127.0.0.2"}
        await names.refresh(_membership([web]))
        assert "127.0.0.2\tweb.prod.cladnet.internal" in hosts.read_text()
        await names.refresh(_membership([{**web, "name": "web2"}]))  # renamed
        text = hosts.read_text()
        assert "web2.prod.cladnet.internal" in text and "\tweb.prod" not in text
        # Peers a policy keeps out of the device are left unnamed when the daemon says so.
        await names.refresh(_membership([{**web, "name": "web2"}]), peers=[])
        assert "web2" not in hosts.read_text() and "db-1.prod" in hosts.read_text()
        await names.remove()
        assert hosts.read_text() == "127.0.0.1 localhost\n"
        assert names.server is None
    finally:
        await names.close()


async def test_a_port_in_use_is_reported_not_fatal(tmp_path: Path) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        names = Names(tmp_path / "net", "cl-prod", port=busy.getsockname()[1])
        names.mode = "off"
        await names.refresh(_membership([]))
        status = read_status(tmp_path / "net")
        assert status is not None and status["server"] is None and "DNS server" in status["error"]
    finally:
        busy.close()
