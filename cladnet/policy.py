"""Access control between the hosts of one network: parse, evaluate, compile to nftables.

Pure functions on plain data (hosts are the controller's peer JSON objects as dicts).

A policy document (JSON or YAML)::

    groups:                        # name → selectors (no nested groups)
      web: ["tag:web"]
      db:  ["tag:db", "host:db-1"]
    rules:                         # allow rules only; a flow no rule allows is denied
      - {src: ["group:web"], dst: ["group:db"], proto: tcp, ports: [5432, "6000-6010"]}
    tests:                         # checked on every write; a failing one rejects it
      - {src: "group:web", dst: "group:db", proto: tcp, port: 5432, expect: allow}
      - {src: "group:web", dst: "tag:bastion", proto: tcp, port: 22, expect: deny}

Selectors: ``*`` (every host), ``tag:NAME`` (set by an admin only), ``label:KEY=VALUE``
(set by the host itself at join: a host can claim any label, so use tags where it
matters), ``host:NAME`` and ``group:NAME``. Rules are directional: ``src`` may open
connections to ``dst``; replies are allowed by connection tracking.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("tcp", "udp", "icmp", "any")
MAX_RULES = 1000
MAX_GROUPS = 1000
MAX_SELECTORS = 1000  # per group or per side of a rule
MAX_PORTS = 100
MAX_TESTS = 1000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}=[^\s]{0,128}$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

Host = Mapping[str, Any]

ALLOW_ALL: dict[str, Any] = {
    "groups": {},
    "rules": [{"src": ["*"], "dst": ["*"], "proto": "any"}],
    "tests": [],
}
"""What a network starts with: every host may reach every other on every port."""


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the offending part."""


@dataclass(frozen=True)
class PortRange:
    low: int
    high: int

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class Rule:
    """Allow ``src`` hosts to open ``proto`` connections to ``ports`` of ``dst`` hosts."""

    src: tuple[str, ...]
    dst: tuple[str, ...]
    proto: str
    ports: tuple[PortRange, ...] = ()  # empty: every port

    def describe(self) -> str:
        ports = ",".join(str(p) for p in self.ports)
        what = f"{self.proto}:{ports}" if ports else self.proto
        return f"{','.join(self.src)} → {','.join(self.dst)} {what}"


@dataclass(frozen=True)
class PolicyTest:
    src: str
    dst: str
    proto: str
    port: int | None
    expect: bool  # True: allowed

    def describe(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        verdict = "allowed" if self.expect else "denied"
        return f"{self.src} → {self.dst} {self.proto}{port} {verdict}"


@dataclass(frozen=True)
class Policy:
    groups: dict[str, tuple[str, ...]]
    rules: tuple[Rule, ...]
    tests: tuple[PolicyTest, ...] = ()

    @property
    def allows_all(self) -> bool:
        """Whether some rule lets every host reach every other on everything."""
        return any(_allows_everything(r) for r in self.rules)


@dataclass(frozen=True)
class Decision:
    """Whether a flow is allowed, and the rule that allowed it (index into ``rules``)."""

    allowed: bool
    rule: int | None
    reason: str


# --- parsing -----------------------------------------------------------------------------


def _fail(where: str, message: str) -> PolicyError:
    return PolicyError(f"{where}: {message}" if where else message)


def _selector(value: Any, where: str, groups: Mapping[str, Any] | None) -> str:
    if not isinstance(value, str):
        raise _fail(where, "a selector must be a string")
    if value == "*":
        return value
    kind, sep, rest = value.partition(":")
    if not sep:
        raise _fail(where, f"{value!r} is not '*', tag:, label:, host: or group:")
    if kind in ("tag", "host") and _NAME_RE.match(rest):
        return value
    if kind == "label" and _LABEL_RE.match(rest):
        return value
    if kind == "group":
        if groups is None:
            raise _fail(where, "groups cannot contain groups")
        if rest not in groups:
            raise _fail(where, f"unknown group {rest!r}")
        return value
    raise _fail(where, f"invalid selector {value!r}")


def _selectors(value: Any, where: str, groups: Mapping[str, Any] | None) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _fail(where, "expected a non-empty list of selectors")
    if len(value) > MAX_SELECTORS:
        raise _fail(where, f"at most {MAX_SELECTORS} selectors")
    return tuple(_selector(v, f"{where}[{i}]", groups) for i, v in enumerate(value))


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _fail(where, "a port must be a number")
    try:
        port = int(value)
    except ValueError:
        raise _fail(where, f"{value!r} is not a port") from None
    if not 1 <= port <= 65535:
        raise _fail(where, f"port {port} outside 1-65535")
    return port


def _port_range(value: Any, where: str) -> PortRange:
    if isinstance(value, str) and "-" in value:
        low, _, high = value.partition("-")
        lo, hi = _port(low.strip(), where), _port(high.strip(), where)
        if lo > hi:
            raise _fail(where, f"range {value!r} is empty")
        return PortRange(lo, hi)
    port = _port(value, where)
    return PortRange(port, port)


def _proto(value: Any, where: str) -> str:
    if value not in PROTOCOLS:
        raise _fail(where, f"protocol must be one of {', '.join(PROTOCOLS)}")
    return str(value)


def _object(value: Any, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, "expected an object")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(map(str, unknown))}")
    return value


def _rule(value: Any, where: str, groups: Mapping[str, Any]) -> Rule:
    obj = _object(value, where, {"src", "dst", "proto", "ports"})
    for required in ("src", "dst"):
        if required not in obj:
            raise _fail(where, f"{required} is required")
    proto = _proto(obj.get("proto", "any"), f"{where}.proto")
    raw_ports = obj.get("ports")
    ports: tuple[PortRange, ...] = ()
    if raw_ports is not None and raw_ports != "*":
        if not isinstance(raw_ports, list):
            raw_ports = [raw_ports]
        if len(raw_ports) > MAX_PORTS:
            raise _fail(f"{where}.ports", f"at most {MAX_PORTS} ports or ranges")
        ports = tuple(_port_range(p, f"{where}.ports[{i}]") for i, p in enumerate(raw_ports))
        if ports and proto not in ("tcp", "udp"):
            raise _fail(f"{where}.ports", "ports need proto tcp or udp")
    return Rule(
        src=_selectors(obj["src"], f"{where}.src", groups),
        dst=_selectors(obj["dst"], f"{where}.dst", groups),
        proto=proto,
        ports=ports,
    )


def _test(value: Any, where: str, groups: Mapping[str, Any]) -> PolicyTest:
    obj = _object(value, where, {"src", "dst", "proto", "port", "expect"})
    for required in ("src", "dst", "expect"):
        if required not in obj:
            raise _fail(where, f"{required} is required")
    proto = _proto(obj.get("proto", "tcp"), f"{where}.proto")
    if proto == "any":
        raise _fail(f"{where}.proto", "a test needs one protocol: tcp, udp or icmp")
    port = None
    if proto in ("tcp", "udp"):
        if "port" not in obj:
            raise _fail(where, f"a {proto} test needs a port")
        port = _port(obj["port"], f"{where}.port")
    elif obj.get("port") is not None:
        raise _fail(f"{where}.port", "icmp has no ports")
    expect = obj["expect"]
    if expect not in ("allow", "deny"):
        raise _fail(f"{where}.expect", "must be allow or deny")
    return PolicyTest(
        src=_selector(obj["src"], f"{where}.src", groups),
        dst=_selector(obj["dst"], f"{where}.dst", groups),
        proto=proto,
        port=port,
        expect=expect == "allow",
    )


def _list(value: Any, where: str, limit: int) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(where, "expected a list")
    if len(value) > limit:
        raise _fail(where, f"at most {limit} entries")
    return value


def parse(doc: Any) -> Policy:
    """A policy from its document; ``PolicyError`` names the first thing wrong."""
    obj = _object(doc, "", {"groups", "rules", "tests"})
    raw_groups = obj.get("groups") or {}
    if not isinstance(raw_groups, Mapping):
        raise _fail("groups", "expected an object of name → selectors")
    if len(raw_groups) > MAX_GROUPS:
        raise _fail("groups", f"at most {MAX_GROUPS} groups")
    groups: dict[str, tuple[str, ...]] = {}
    for name, members in raw_groups.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _fail("groups", f"invalid group name {name!r}")
        groups[name] = _selectors(members, f"groups.{name}", None)
    rules = tuple(
        _rule(r, f"rules[{i}]", groups)
        for i, r in enumerate(_list(obj.get("rules"), "rules", MAX_RULES))
    )
    tests = tuple(
        _test(t, f"tests[{i}]", groups)
        for i, t in enumerate(_list(obj.get("tests"), "tests", MAX_TESTS))
    )
    return Policy(groups=groups, rules=rules, tests=tests)


def to_doc(policy: Policy, with_tests: bool = True) -> dict[str, Any]:
    """The canonical document of ``policy`` (what is stored and served)."""
    doc: dict[str, Any] = {
        "groups": {name: list(members) for name, members in policy.groups.items()},
        "rules": [
            {
                "src": list(r.src),
                "dst": list(r.dst),
                "proto": r.proto,
                **({"ports": [str(p) for p in r.ports]} if r.ports else {}),
            }
            for r in policy.rules
        ],
    }
    if with_tests:
        doc["tests"] = [
            {
                "src": t.src,
                "dst": t.dst,
                "proto": t.proto,
                **({"port": t.port} if t.port is not None else {}),
                "expect": "allow" if t.expect else "deny",
            }
            for t in policy.tests
        ]
    return doc


# --- evaluation --------------------------------------------------------------------------


def _tags(host: Host) -> list[str]:
    tags = host.get("tags")
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def memberships(policy: Policy, host: Host) -> frozenset[str]:
    """Every selector that names ``host`` (``*``, its ``host:``, ``tag:``, ``label:``
    and ``group:`` selectors): a rule's side names the host iff they intersect.

    Computed once per host, so checking many rules is set work, not string matching.
    """
    atoms = {"*"}
    name = host.get("name")
    if isinstance(name, str):
        atoms.add(f"host:{name}")
    atoms.update(f"tag:{t}" for t in _tags(host))
    labels = host.get("labels")
    if isinstance(labels, Mapping):
        atoms.update(
            f"label:{k}={v}" for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)
        )
    groups = {f"group:{g}" for g, members in policy.groups.items() if not atoms.isdisjoint(members)}
    return frozenset(atoms | groups)


def matches(policy: Policy, selector: str, host: Host) -> bool:
    """Whether ``host`` is one of the hosts ``selector`` names."""
    return selector in memberships(policy, host)


def evaluate(policy: Policy, src: Host, dst: Host, proto: str, port: int | None) -> Decision:
    """May ``src`` open a ``proto`` connection to ``port`` of ``dst``? And which rule says so."""
    of_src, of_dst = memberships(policy, src), memberships(policy, dst)
    for index, rule in enumerate(policy.rules):
        if rule.proto not in ("any", proto):
            continue
        if rule.ports and (port is None or not any(p.low <= port <= p.high for p in rule.ports)):
            continue
        if not of_src.isdisjoint(rule.src) and not of_dst.isdisjoint(rule.dst):
            return Decision(True, index, f"allowed by rule {index} ({rule.describe()})")
    return Decision(False, None, "denied: no rule allows it")


def counterparts(policy: Policy, mine: frozenset[str]) -> frozenset[str]:
    """Selectors naming every host with an allowed flow, either way, with the host of
    memberships ``mine``: a peer is one iff its memberships intersect them."""
    sides: set[str] = set()
    for rule in policy.rules:
        if not mine.isdisjoint(rule.src):
            sides.update(rule.dst)
        if not mine.isdisjoint(rule.dst):
            sides.update(rule.src)
    return frozenset(sides)


def first_rule(policy: Policy, src: Host, dst: Host) -> int | None:
    """The first rule that lets ``src`` open any connection at all to ``dst``, if any."""
    of_src, of_dst = memberships(policy, src), memberships(policy, dst)
    return next(
        (
            i
            for i, r in enumerate(policy.rules)
            if not of_src.isdisjoint(r.src) and not of_dst.isdisjoint(r.dst)
        ),
        None,
    )


def has_flow(policy: Policy, src: Host, dst: Host) -> bool:
    """Whether some rule lets ``src`` open any connection at all to ``dst``."""
    return first_rule(policy, src, dst) is not None


def peers_visible(policy: Policy, me: Host, peers: Iterable[Host]) -> set[str]:
    """Ids of the peers with an allowed flow in either direction with ``me``."""
    others = counterparts(policy, memberships(policy, me))
    return {
        str(p.get("id"))
        for p in peers
        if p.get("id") != me.get("id") and not others.isdisjoint(memberships(policy, p))
    }


def _test_host(policy: Policy, selector: str, hosts: Iterable[Host]) -> Host | None:
    """A host ``selector`` names: a real one for ``host:``, else a made-up one."""
    if selector.startswith("group:"):
        members = policy.groups.get(selector[6:], ())
        return _test_host(policy, members[0], hosts) if members else None
    if selector.startswith("host:"):
        return next((h for h in hosts if h.get("name") == selector[5:]), None)
    if selector.startswith("tag:"):
        return {"name": f"({selector})", "tags": [selector[4:]], "labels": {}}
    if selector.startswith("label:"):
        key, _, value = selector[6:].partition("=")
        return {"name": f"({selector})", "tags": [], "labels": {key: value}}
    return {"name": "(any host)", "tags": [], "labels": {}}


def run_tests(policy: Policy, hosts: Iterable[Host] = ()) -> list[str]:
    """The policy's failing tests, each as one readable line (empty: all pass).

    ``host:`` selectors in tests name real hosts (from ``hosts``); ``tag:``/``label:``
    stand for a host carrying just that; ``group:`` for a host its first member names.
    """
    hosts = list(hosts)
    failures = []
    for index, test in enumerate(policy.tests):
        src = _test_host(policy, test.src, hosts)
        dst = _test_host(policy, test.dst, hosts)
        if src is None or dst is None:
            missing = test.src if src is None else test.dst
            failures.append(f"tests[{index}] {test.describe()}: no host {missing}")
            continue
        decision = evaluate(policy, src, dst, test.proto, test.port)
        if decision.allowed != test.expect:
            failures.append(f"tests[{index}] {test.describe()}: {decision.reason}")
    return failures


# --- enforcement ---------------------------------------------------------------------------


def table_name(iface: str) -> str:
    """The nftables table (family inet) of an interface's packet filter."""
    return f"cladnet-{iface}"


def _address(host: Host) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(str(host.get("overlay_ip")))
    except ValueError:
        return None


def _names_everyone(policy: Policy, selectors: Iterable[str]) -> bool:
    return any(
        s == "*" or (s.startswith("group:") and "*" in policy.groups.get(s[6:], ()))
        for s in selectors
    )


def _match_proto(rule: Rule, family: str) -> str:
    if rule.proto in ("tcp", "udp"):
        if rule.ports:
            ports = ", ".join(str(p) for p in rule.ports)
            return f" {rule.proto} dport {{ {ports} }}"
        return f" meta l4proto {rule.proto}"
    if rule.proto == "icmp":
        return " meta l4proto icmp" if family == "ip" else " meta l4proto ipv6-icmp"
    return ""


def nft_ruleset(policy: Policy, me: Host, peers: Iterable[Host], iface: str) -> str:
    """The ``nft -f`` text that replaces this host's filter on ``iface`` in one transaction.

    Input on the WireGuard interface only: established/related accepted, DNS to this
    agent's name server (port 53) accepted, then each rule
    whose ``dst`` includes this host (from the overlay IPs of the peers its ``src``
    names), then drop. Other interfaces are not touched. WireGuard only lets a peer send
    from its own overlay IP, so a source address identifies the peer.
    """
    if not _IFACE_RE.match(iface):
        raise PolicyError(f"invalid interface name {iface!r}")
    mine = memberships(policy, me)
    sources_of = [
        (address, memberships(policy, p))
        for p in peers
        if p.get("id") != me.get("id") and (address := _address(p)) is not None
    ]
    table = table_name(iface)
    lines = [
        f"table inet {table}",  # so that the delete below never fails
        f"delete table inet {table}",
        f"table inet {table} {{",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f'    iifname != "{iface}" accept',
        "    ct state established,related accept",
        "    ct state invalid drop",
        # The agent's own name server (it answers only the zone, only overlay sources):
        # every peer the device holds may ask it, whatever the rules say.
        '    meta l4proto { tcp, udp } th dport 53 accept comment "overlay DNS"',
    ]
    for index, rule in enumerate(policy.rules):
        if mine.isdisjoint(rule.dst):
            continue
        comment = f' comment "rule {index}"'
        if _names_everyone(policy, rule.src):
            if rule.proto == "icmp":
                lines.append(f"    meta l4proto {{ icmp, ipv6-icmp }} accept{comment}")
            else:
                lines.append(f"   {_match_proto(rule, 'ip')} accept{comment}")
            continue
        sources: dict[str, list[str]] = {"ip": [], "ip6": []}
        for address, of_peer in sources_of:
            if not of_peer.isdisjoint(rule.src):
                sources["ip" if address.version == 4 else "ip6"].append(str(address))
        for family, addresses in sources.items():
            if addresses:
                saddr = f"{family} saddr {{ {', '.join(sorted(set(addresses)))} }}"
                lines.append(f"    {saddr}{_match_proto(rule, family)} accept{comment}")
    lines += ["    drop", "  }", "}", ""]
    return "\n".join(lines)


# --- explanation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One direction of a pair: allowed or not, every rule that allows it, and why."""

    allowed: bool
    rules: tuple[int, ...]  # indexes into ``Policy.rules``, in order
    reason: str

    def to_dict(self, policy: Policy) -> dict[str, Any]:
        """The API's shape: the rules by index and as text."""
        return {
            "allowed": self.allowed,
            "rules": [{"index": i, "text": policy.rules[i].describe()} for i in self.rules],
            "reason": self.reason,
        }


def _allows_everything(rule: Rule) -> bool:
    return "*" in rule.src and "*" in rule.dst and rule.proto == "any" and not rule.ports


def _verdict(policy: Policy, src: Host, dst: Host, proto: str | None, port: int | None) -> Verdict:
    of_src, of_dst = memberships(policy, src), memberships(policy, dst)
    found = []
    for index, rule in enumerate(policy.rules):
        if proto is not None and rule.proto not in ("any", proto):
            continue
        # No port asked: a rule for some ports still allows "some" flow of its protocol.
        if rule.ports and port is not None and not any(p.low <= port <= p.high for p in rule.ports):
            continue
        if not of_src.isdisjoint(rule.src) and not of_dst.isdisjoint(rule.dst):
            found.append(index)
    if not found:
        return Verdict(False, (), "default deny: no rule allows it")
    first = policy.rules[found[0]]
    if _allows_everything(first):
        return Verdict(True, tuple(found), f"allow-all policy (rule {found[0]})")
    return Verdict(True, tuple(found), f"allowed by rule {found[0]} ({first.describe()})")


def explain(
    policy: Policy, a: Host, b: Host, proto: str | None = None, port: int | None = None
) -> dict[str, Any]:
    """Why ``a`` and ``b`` may or may not talk, both ways: ``forward`` (``a`` opens to
    ``b``) and ``reverse`` as :class:`Verdict` dicts, and ``peers`` (whether each keeps
    the other in its peer list: some flow either way, whatever ``proto``/``port``).

    Without ``proto`` a direction is allowed when any rule allows any flow; with
    ``proto`` but no ``port`` when a rule allows that protocol on some port.
    """
    if proto is not None and proto not in PROTOCOLS:
        raise PolicyError(f"protocol must be one of {', '.join(PROTOCOLS)}")
    if proto == "any":
        proto = None
    if port is not None and not (1 <= port <= 65535 and proto in ("tcp", "udp")):
        raise PolicyError("a port needs proto tcp or udp and must be within 1-65535")
    forward, reverse = _verdict(policy, a, b, proto, port), _verdict(policy, b, a, proto, port)
    return {
        "forward": forward.to_dict(policy),
        "reverse": reverse.to_dict(policy),
        "peers": has_flow(policy, a, b) or has_flow(policy, b, a),
        "allows_all": policy.allows_all,
    }
