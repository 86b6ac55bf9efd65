"""The few rtnetlink requests the agent makes, over a plain netlink socket.

The agent needs interface lookup, MTU and up/down, addresses, routes and address
events; pyroute2 offers all of netlink but importing it costs 16 MiB of resident memory
and 150 ms, more than the rest of the agent's netlink use put together. The kernel
WireGuard backend still uses pyroute2 (generic netlink), loaded only when it is used.
Message layouts: rtnetlink(7), netlink(7).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x300, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
IFLA_IFNAME, IFLA_MTU = 3, 4
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
RTMGRP_IPV4_IFADDR = 0x10
IFF_UP = 0x1
MAIN_TABLE, SCOPE_LINK, RTPROT_BOOT, RTN_UNICAST = 254, 253, 3, 1
CLONE_NEWNET = 0x40000000

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, ...


@dataclass(frozen=True)
class Address:
    """One interface address as the kernel reports it."""

    index: int
    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    scope: int
    label: str


def _attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    found = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]  # without the flag bits
        offset += (length + 3) & ~3
    return found


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        yield kind, flags, seq, data[offset + _HEADER.size : offset + length]
        offset += (length + 3) & ~3


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw)


class Netlink:
    """A blocking NETLINK_ROUTE socket, in this network namespace or a named one
    (``/run/netns/<netns>``, as ``ip netns`` makes them). Use from a worker thread."""

    def __init__(self, netns: str | None = None, groups: int = 0) -> None:
        self.sock = in_netns(netns, lambda: _open(groups)) if netns else _open(groups)
        self._seq = 0

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, body: bytes, flags: int = NLM_F_ACK) -> list[tuple[int, bytes]]:
        """Send one request; its answers (type, payload) until done, acknowledged or the
        single reply. A negative acknowledgement raises ``OSError`` with its errno."""
        self._seq += 1
        self.sock.send(
            _HEADER.pack(_HEADER.size + len(body), kind, flags | NLM_F_REQUEST, self._seq, 0) + body
        )
        answers: list[tuple[int, bytes]] = []
        while True:
            for mkind, mflags, seq, payload in _messages(self.sock.recv(1 << 16)):
                if seq != self._seq:
                    continue  # an answer to an earlier, abandoned request
                if mkind == NLMSG_DONE:
                    return answers
                if mkind == NLMSG_ERROR:
                    error = -struct.unpack_from("=i", payload)[0]
                    if error:
                        raise OSError(error, os.strerror(error))
                    return answers
                answers.append((mkind, payload))
                if not mflags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    return answers

    def index(self, ifname: str) -> int | None:
        """The index of interface ``ifname``, or None when there is none."""
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, ifname.encode() + b"\0")
        try:
            answers = self.request(RTM_GETLINK, body, flags=0)
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                return None
            raise
        return int(_IFINFO.unpack_from(answers[0][1])[2])

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None) -> None:
        """Set the MTU and/or the administrative state of an interface."""
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        body = _IFINFO.pack(0, 0, index, flags, change)
        if mtu is not None:
            body += _attr(IFLA_MTU, struct.pack("=I", mtu))
        self.request(RTM_NEWLINK, body)

    def delete_link(self, index: int) -> None:
        self.request(RTM_DELLINK, _IFINFO.pack(0, 0, index, 0, 0))

    def addresses(self, family: int = socket.AF_INET) -> list[Address]:
        """Every address of ``family`` on every interface."""
        found = []
        for kind, payload in self.request(
            RTM_GETADDR, _IFADDR.pack(family, 0, 0, 0, 0), flags=NLM_F_DUMP
        ):
            if kind != RTM_NEWADDR:
                continue
            fam, prefixlen, _, scope, index = _IFADDR.unpack_from(payload)
            attrs = _attrs(payload, _IFADDR.size)
            raw = attrs.get(IFA_ADDRESS) or attrs.get(IFA_LOCAL)
            if raw is None:
                continue
            interface = ipaddress.ip_interface(f"{_address(fam, raw)}/{prefixlen}")
            label = attrs.get(IFA_LABEL, b"").rstrip(b"\0").decode(errors="replace")
            found.append(Address(index, interface, scope, label))
        return found

    def change_address(
        self, add: bool, index: int, interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> None:
        """Add (or delete) ``interface`` (address/prefix) on interface ``index``."""
        family = socket.AF_INET if interface.version == 4 else socket.AF_INET6
        raw = interface.ip.packed
        body = _IFADDR.pack(family, interface.network.prefixlen, 0, 0, index)
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        if add:
            self.request(RTM_NEWADDR, body, flags=NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
        else:
            self.request(RTM_DELADDR, body)

    def routes(self, index: int, family: int = socket.AF_INET) -> set[tuple[str | None, int]]:
        """(destination, prefix length) of the main table's routes through ``index``."""
        found = set()
        for kind, payload in self.request(
            RTM_GETROUTE, _RTMSG.pack(family, *[0] * 8), flags=NLM_F_DUMP
        ):
            if kind != RTM_NEWROUTE:
                continue
            fam, dst_len, _, _, table, *_ = _RTMSG.unpack_from(payload)
            attrs = _attrs(payload, _RTMSG.size)
            if RTA_TABLE in attrs:
                table = struct.unpack("=I", attrs[RTA_TABLE])[0]
            oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
            if table == MAIN_TABLE and oif == index:
                dst = attrs.get(RTA_DST)
                found.add((_address(fam, dst) if dst else None, dst_len))
        return found

    def add_route(self, index: int, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        """A link-scope route to ``network`` through interface ``index`` (main table)."""
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        body = _RTMSG.pack(
            family, network.prefixlen, 0, 0, MAIN_TABLE, RTPROT_BOOT, SCOPE_LINK, RTN_UNICAST, 0
        )
        body += _attr(RTA_DST, network.network_address.packed)
        body += _attr(RTA_OIF, struct.pack("=I", index))
        self.request(RTM_NEWROUTE, body, flags=NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)


def _open(groups: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


def in_netns(netns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """The socket ``make()`` returns, made by a short-lived thread that entered the named
    network namespace: a socket stays in the namespace it was made in, and only that
    thread ever changes namespace."""
    made: list[socket.socket | BaseException] = []

    def enter() -> None:
        import ctypes  # only for named namespaces (tests, tools): os.setns is Python 3.12+

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{netns}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            made.append(make())
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=enter, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]
