"""Names of an overlay: ``<host>.<network>.<zone>`` → overlay IP, and the DNS answers.

Pure: a :class:`Zone` is built from the peers an agent already has, and
:func:`answer` turns one query packet into one reply packet (or ``None`` for junk).
The wire format is dnslib's (a maintained, pure-Python codec with no dependencies);
names are compared as tuples of lower-cased byte labels, so a label with a dot or
non-ASCII bytes in it can never alias one of ours.

The agent is authoritative for its network's domain only: names it knows get an A
record, other names under the domain NXDOMAIN, overlay IPs of the network a PTR,
everything else REFUSED. It never forwards and never recurses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dnslib import PTR, QTYPE, RCODE, RR, A, DNSHeader, DNSRecord

DEFAULT_ZONE = "cladnet.internal"  # = cladnet.models.DEFAULT_DNS_ZONE (agent stays light)
# Short: a renamed or removed host must stop resolving soon; the agent answers locally.
TTL = 10
# No legitimate query of ours is longer (one question, maybe an EDNS OPT record).
MAX_QUERY = 1024
LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
OPCODE_QUERY = 0

Labels = tuple[bytes, ...]


def valid_domain(name: str) -> bool:
    """A DNS name of 1-63 character labels (letters, digits, inner '-'), 253 at most."""
    labels = name.lower().rstrip(".").split(".")
    # fullmatch: "$" would let a trailing newline through, into /etc/hosts.
    return len(name) <= 253 and all(LABEL_RE.fullmatch(label) for label in labels)


def _labels(name: str) -> Labels:
    return tuple(label.encode("ascii") for label in name.lower().rstrip(".").split("."))


def _reverse(ip: str) -> Labels:
    return (*(o.encode() for o in reversed(ip.split("."))), b"in-addr", b"arpa")


@dataclass(frozen=True)
class Zone:
    """What one agent answers: its network's domain and the names under it."""

    domain: str  # e.g. prod.cladnet.internal
    cidr: str
    records: dict[Labels, str] = field(default_factory=dict)  # name → IPv4
    pointers: dict[Labels, str] = field(default_factory=dict)  # reverse name → name
    # Names that exist only as parents of hosts (web.eu for web.eu.<domain>): NOERROR.
    nonterminals: frozenset[Labels] = frozenset()
    skipped: tuple[str, ...] = ()  # host names that are not valid DNS names

    def names(self) -> dict[str, str]:
        """Fully qualified name (no trailing dot) → overlay IP, sorted by name."""
        return {
            ".".join(x.decode() for x in k): v
            for k, v in sorted(self.records.items(), key=lambda kv: kv[0])
        }


def domain_of(network: dict[str, Any]) -> str:
    """``<network>.<zone>`` for a network record (its ``dns_zone``, else the default)."""
    return f"{network['name']}.{network.get('dns_zone') or DEFAULT_ZONE}".lower()


def host_name(host: str, network: dict[str, Any]) -> str:
    """A host's fully qualified overlay name."""
    return f"{host.lower()}.{domain_of(network)}"


def build_zone(network: dict[str, Any], hosts: Iterable[dict[str, Any]]) -> Zone:
    """The zone of ``network`` holding ``hosts`` (this host and its peers).

    A host whose name is not a valid DNS name, or whose overlay IP is not an IPv4
    address of the network, is left out (and listed in ``skipped``); two hosts with
    the same name (the controller forbids it) keep the first.
    """
    domain = domain_of(network)
    cidr = ipaddress.ip_network(str(network["cidr"]), strict=False)
    base = _labels(domain)
    records: dict[Labels, str] = {}
    pointers: dict[Labels, str] = {}
    nonterminals: set[Labels] = set()
    skipped = []
    for h in hosts:
        name = str(h.get("name", ""))
        fqdn = f"{name}.{domain}"
        try:
            ip = ipaddress.IPv4Address(str(h.get("overlay_ip")))
        except ValueError:
            ip = None
        if not name or not valid_domain(fqdn) or ip is None or ip not in cidr:
            skipped.append(name)
            continue
        key = _labels(fqdn)
        if key in records:
            continue
        records[key] = str(ip)
        pointers.setdefault(_reverse(str(ip)), fqdn.lower())
        for i in range(1, len(key) - len(base)):
            nonterminals.add(key[i:])
    return Zone(
        domain=domain,
        cidr=str(cidr),
        records=records,
        pointers=pointers,
        nonterminals=frozenset(nonterminals),
        skipped=tuple(skipped),
    )


def _reply(query: DNSRecord, rcode: int, authoritative: bool = True) -> DNSRecord:
    header = DNSHeader(
        id=query.header.id,
        qr=1,
        aa=int(authoritative),
        ra=0,  # never recurses
        rd=query.header.rd,
        opcode=query.header.opcode,
        rcode=rcode,
    )
    return DNSRecord(header, q=query.q if query.questions else None)


def _in_reverse_zone(qname: Labels, cidr: str) -> bool:
    if len(qname) != 6 or qname[4:] != (b"in-addr", b"arpa"):
        return False
    try:
        ip = ipaddress.IPv4Address(".".join(o.decode("ascii") for o in reversed(qname[:4])))
    except (ValueError, UnicodeDecodeError):
        return False
    return ip in ipaddress.ip_network(cidr)


def resolve(zone: Zone, qname: Labels, qtype: int) -> tuple[int, list[RR]]:
    """The rcode and answer records for one question (pure answer logic)."""
    name = qname_text(qname)
    base = _labels(zone.domain)
    if qname[-len(base) :] == base:
        ip = zone.records.get(qname)
        if ip is not None:
            if qtype in (QTYPE.A, QTYPE.ANY):
                return RCODE.NOERROR, [RR(name, QTYPE.A, rdata=A(ip), ttl=TTL)]
            return RCODE.NOERROR, []  # the name exists, without this type
        if qname == base or qname in zone.nonterminals:
            return RCODE.NOERROR, []
        return RCODE.NXDOMAIN, []
    if _in_reverse_zone(qname, zone.cidr):
        target = zone.pointers.get(qname)
        if target is None:
            return RCODE.NXDOMAIN, []
        if qtype in (QTYPE.PTR, QTYPE.ANY):
            return RCODE.NOERROR, [RR(name, QTYPE.PTR, rdata=PTR(target + "."), ttl=TTL)]
        return RCODE.NOERROR, []
    return RCODE.REFUSED, []


def qname_text(qname: Labels) -> str:
    """A question's name as text (bytes escaped), only for building replies and logs."""
    return ".".join(label.decode("ascii", "backslashreplace") for label in qname) + "."


class Junk(ValueError):
    """A packet that is not a DNS query we can answer: dropped and counted."""


def parse_query(packet: bytes) -> DNSRecord:
    """A query packet, or :class:`Junk` (too long, unparsable, or a response)."""
    if len(packet) > MAX_QUERY:
        raise Junk(f"{len(packet)} bytes")
    try:
        query = DNSRecord.parse(packet)
    # A library parser on hostile input: whatever it raises, the packet is junk.
    except Exception as exc:
        raise Junk(f"unparsable: {type(exc).__name__}") from exc
    if query.header.qr:  # a response sent to us: answering it could start a loop
        raise Junk("a response, not a query")
    return query


def answer(packet: bytes, zone: Zone) -> tuple[bytes, int]:
    """The reply to ``packet`` and its rcode; :class:`Junk` when there is none to send."""
    query = parse_query(packet)
    records: list[RR]
    if query.header.opcode != OPCODE_QUERY:
        rcode, records = RCODE.NOTIMP, []
    elif len(query.questions) != 1 or query.header.a or query.header.auth:
        rcode, records = RCODE.FORMERR, []
    else:
        q = query.questions[0]
        qname = tuple(label.lower() for label in q.qname.label)
        rcode, records = resolve(zone, qname, q.qtype) if q.qclass == 1 else (RCODE.REFUSED, [])
    reply = _reply(query, rcode, authoritative=rcode in (RCODE.NOERROR, RCODE.NXDOMAIN))
    for rr in records:
        reply.add_answer(rr)
    return reply.pack(), rcode
