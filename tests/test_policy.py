"""The access policy as pure functions: parsing, evaluation, visibility, nftables text."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.daemon import NetworkAgent
from agent.state import Membership, StateDir
from cladnet import mesh
from cladnet import policy as acl
from cladnet.cli.status import summary
from lab.peers import NETWORK, host

DOC: dict[str, Any] = {
    "groups": {"web": ["tag:web"], "db": ["tag:db", "host:legacy-db"]},
    "rules": [
        {"src": ["group:web"], "dst": ["group:db"], "proto": "tcp", "ports": [5432, "6000-6010"]},
        {"src": "*", "dst": "tag:bastion", "proto": "icmp"},
    ],
    "tests": [
        {"src": "group:web", "dst": "group:db", "proto": "tcp", "port": 5432, "expect": "allow"},
        {"src": "group:web", "dst": "tag:bastion", "proto": "tcp", "port": 22, "expect": "deny"},
    ],
}


def tagged(n: int, *tags: str, **fields: Any) -> dict[str, Any]:
    return host(n, tags=list(tags), **fields)


WEB, DB, BASTION, OTHER = tagged(1, "web"), tagged(2, "db"), tagged(3, "bastion"), tagged(4)


def test_a_valid_document_parses_and_round_trips() -> None:
    policy = acl.parse(DOC)
    assert policy.rules[0].ports == (acl.PortRange(5432, 5432), acl.PortRange(6000, 6010))
    assert acl.parse(acl.to_doc(policy)) == policy
    assert not policy.allows_all
    assert acl.parse(acl.ALLOW_ALL).allows_all


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"rules": [{"src": "*", "dst": "*", "proto": "sctp"}]}, "rules[0].proto: protocol"),
        ({"rules": [{"src": "*", "dst": "*", "proto": "icmp", "ports": [1]}]}, "ports need"),
        ({"rules": [{"src": "*", "dst": "*", "proto": "tcp", "ports": [70000]}]}, "outside"),
        ({"rules": [{"src": "*", "dst": "*", "proto": "tcp", "ports": ["9-3"]}]}, "is empty"),
        ({"rules": [{"src": "group:nope", "dst": "*"}]}, "unknown group 'nope'"),
        ({"rules": [{"src": "web", "dst": "*"}]}, "rules[0].src[0]"),
        ({"rules": [{"dst": "*"}]}, "src is required"),
        ({"groups": {"a": ["group:b"]}, "rules": []}, "groups cannot contain groups"),
        ({"rules": [], "acls": []}, "unknown field(s) acls"),
        ({"tests": [{"src": "*", "dst": "*", "proto": "tcp", "expect": "allow"}]}, "needs a port"),
        ({"tests": [{"src": "*", "dst": "*", "proto": "icmp", "expect": "maybe"}]}, "expect"),
        ([], "expected an object"),
    ],
)
def test_bad_documents_say_what_is_wrong(doc: Any, message: str) -> None:
    with pytest.raises(acl.PolicyError, match=re.escape(message)):
        acl.parse(doc)


def test_evaluate_names_the_deciding_rule_and_denies_by_default() -> None:
    policy = acl.parse(DOC)
    allowed = acl.evaluate(policy, WEB, DB, "tcp", 5432)
    assert allowed.allowed and allowed.rule == 0
    assert acl.evaluate(policy, WEB, DB, "tcp", 6005).allowed
    assert acl.evaluate(policy, WEB, DB, "udp", 5432) == acl.Decision(
        False, None, "denied: no rule allows it"
    )
    assert not acl.evaluate(policy, DB, WEB, "tcp", 5432).allowed  # directional
    assert not acl.evaluate(policy, WEB, BASTION, "tcp", 22).allowed
    assert acl.evaluate(policy, OTHER, BASTION, "icmp", None).rule == 1
    legacy = host(9, name="legacy-db")
    assert acl.evaluate(policy, WEB, legacy, "tcp", 5432).allowed


def test_a_host_with_only_a_label_is_not_in_a_tag_group() -> None:
    """Labels are the host's own claim; a group of tags is not fooled by one."""
    policy = acl.parse(DOC)
    claims = host(5, labels={"tag": "web", "web": ""})
    assert not acl.evaluate(policy, claims, DB, "tcp", 5432).allowed


def test_tests_are_run_and_failures_name_the_case() -> None:
    assert acl.run_tests(acl.parse(DOC)) == []
    wrong = {**DOC, "tests": [{**DOC["tests"][0], "port": 22}]}
    failures = acl.run_tests(acl.parse(wrong))
    assert failures == ["tests[0] group:web → group:db tcp:22 allowed: denied: no rule allows it"]
    missing = {
        "rules": [],
        "tests": [{"src": "host:x", "dst": "*", "proto": "icmp", "expect": "deny"}],
    }
    assert acl.run_tests(acl.parse(missing)) == ["tests[0] host:x → * icmp denied: no host host:x"]


def test_peers_visible_counts_flows_in_either_direction() -> None:
    policy = acl.parse(DOC)
    everyone = [WEB, DB, BASTION, OTHER]
    # Everyone may ping the bastion; web → db is one way, and both see each other.
    assert acl.peers_visible(policy, DB, everyone) == {"h-1", "h-3"}
    assert acl.peers_visible(policy, WEB, everyone) == {"h-2", "h-3"}
    assert acl.peers_visible(policy, OTHER, everyone) == {"h-3"}
    assert acl.peers_visible(policy, BASTION, everyone) == {"h-1", "h-2", "h-4"}


def test_plan_leaves_out_peers_without_any_flow() -> None:
    policy = acl.parse(DOC)
    desired = mesh.plan(NETWORK, DB, [WEB, BASTION, OTHER], policy=policy)
    assert set(desired.peers) == {WEB["public_key"], BASTION["public_key"]}
    assert desired.skipped == ()
    # Without a policy (an old controller) every peer stays.
    assert len(mesh.plan(NETWORK, DB, [WEB, BASTION, OTHER]).peers) == 3


def test_the_ruleset_accepts_allowed_sources_only_on_the_interface() -> None:
    text = acl.nft_ruleset(acl.parse(DOC), DB, [DB, WEB, BASTION, OTHER], "wg-x")
    assert text.splitlines()[:3] == [
        "table inet cladnet-wg-x",
        "delete table inet cladnet-wg-x",
        "table inet cladnet-wg-x {",
    ]
    body = text.split("ct state invalid drop\n", 1)[1]
    assert body.splitlines() == [
        '    meta l4proto { tcp, udp } th dport 53 accept comment "overlay DNS"',
        '    ip saddr { 10.77.0.1 } tcp dport { 5432, 6000-6010 } accept comment "rule 0"',
        "    drop",
        "  }",
        "}",
    ]
    assert 'iifname != "wg-x" accept' in text
    assert "ct state established,related accept" in text
    web = acl.nft_ruleset(acl.parse(DOC), WEB, [DB, BASTION], "wg-x")
    assert "saddr" not in web  # nothing may open a connection to web (but ask its DNS)


def test_the_ruleset_never_carries_text_from_hosts() -> None:
    """Overlay IPs are parsed, interface names checked: a peer cannot inject nft syntax."""
    evil = tagged(6, "web", overlay_ip='10.77.0.6 } accept; #"')
    text = acl.nft_ruleset(acl.parse(DOC), DB, [WEB, evil], "wg0")
    assert "10.77.0.6" not in text and "#" not in text
    assert "ip saddr { 10.77.0.1 } tcp" in text
    with pytest.raises(acl.PolicyError):
        acl.nft_ruleset(acl.parse(DOC), DB, [], 'wg0" accept')


selector = st.sampled_from(["*", "tag:a", "tag:b", "label:role=x", "host:vm1", "group:g"])
protocol = st.sampled_from(["tcp", "udp", "icmp", "any"])
rules = st.lists(
    st.fixed_dictionaries(
        {
            "src": st.lists(selector, min_size=1, max_size=3),
            "dst": st.lists(selector, min_size=1, max_size=3),
        },
        optional={"proto": protocol},
    ),
    max_size=6,
)
hosts = st.lists(
    st.builds(
        lambda n, tags, role: tagged(n, *tags, labels={"role": role}),
        st.integers(1, 20),
        st.lists(st.sampled_from(["a", "b", "c"]), max_size=2),
        st.sampled_from(["x", "y"]),
    ),
    min_size=2,
    max_size=6,
    unique_by=lambda h: h["id"],
)


@settings(max_examples=200, deadline=None)
@given(
    rules=rules,
    hosts=hosts,
    port=st.integers(1, 65535),
    proto=st.sampled_from(["tcp", "udp", "icmp"]),
)
def test_properties(
    rules: list[dict[str, Any]], hosts: list[dict[str, Any]], port: int, proto: str
) -> None:
    policy = acl.parse({"groups": {"g": ["tag:c", "label:role=y"]}, "rules": rules})
    me, *others = hosts
    visible = acl.peers_visible(policy, me, others)
    # Visible exactly when some rule allows a flow one way or the other (brute force).
    assert visible == {
        p["id"] for p in others if acl.has_flow(policy, me, p) or acl.has_flow(policy, p, me)
    }
    planned = mesh.plan(NETWORK, me, others, policy=policy)
    assert set(planned.peers) == {p["public_key"] for p in others if p["id"] in visible}
    for peer in others:
        decision = acl.evaluate(policy, peer, me, proto, None if proto == "icmp" else port)
        # Any allowed flow makes the peer visible; a decision names a rule iff it allows.
        if decision.allowed:
            assert peer["id"] in visible
        assert (decision.rule is not None) == decision.allowed
        if decision.rule is not None:
            assert policy.rules[decision.rule].proto in ("any", proto)
    # The ruleset only ever names overlay addresses of real peers.
    text = acl.nft_ruleset(policy, me, others, "wg0")
    for line in text.splitlines():
        if "saddr" in line:
            addresses = line.split("{ ", 1)[1].split(" }", 1)[0].split(", ")
            assert {str(ipaddress.ip_address(a)) for a in addresses} <= {
                p["overlay_ip"] for p in others
            }
    assert acl.parse(acl.to_doc(policy)) == policy


def test_the_agent_keeps_only_usable_policies(tmp_path: Path) -> None:
    m = Membership(
        controller="http://127.0.0.1:9",
        host_id="h-2",
        interface="cl-p",
        network=NETWORK,
        me=DB,
        peers={"h-1": WEB},
    )
    agent = NetworkAgent(StateDir(tmp_path), m, "c", "k", None)  # type: ignore[arg-type]
    good = {"version": 3, "document": acl.to_doc(acl.parse(DOC), with_tests=False)}
    assert agent._on_event({"type": "POLICY", "revision": 9, "policy": good})
    assert m.policy == good and m.revision == 9
    assert not agent._on_event({"type": "POLICY", "revision": 10, "policy": good})  # no change
    bad = {"version": 4, "document": {"rules": [{"src": "nope", "dst": "*"}]}}
    assert not agent._on_event({"type": "POLICY", "revision": 11, "policy": bad})
    assert m.policy == good and agent.bad_input == 1
    # A damaged saved policy fails closed: nothing allowed, not everything.
    m.policy = bad
    assert agent._policy() == acl.Policy(groups={}, rules=())


def test_status_names_the_rule_and_blocked_pairs_are_not_broken() -> None:
    now = 1_700_000_100.0
    up = {"last_seen": now, "created_at": 0.0, "status": {"peers": []}}
    hosts = [WEB | up, DB | up, OTHER | up]
    hosts[0]["status"] = {"peers": [{"peer_id": "h-2", "handshake_age_s": 5.0}]}
    hosts[1]["status"] = {"peers": [{"peer_id": "h-1", "handshake_age_s": 5.0}]}
    view = summary({"name": "n", "cidr": NETWORK["cidr"]}, hosts, now, acl.parse(DOC))
    said = {(p["from"], p["to"]): (p["state"], p["policy"]) for p in view["pairs"]}
    assert said[("vm1", "vm2")] == ("ok", "rule 0")
    assert said[("vm2", "vm1")] == ("ok", "reverse only")  # in the list, filtered
    assert said[("vm1", "vm4")] == ("blocked", "blocked")
    assert view["healthy"] and view["broken_pairs"] == 0
    # Without a policy the same hosts are unhealthy: vm4 never reports its pairs.
    assert not summary({"name": "n", "cidr": NETWORK["cidr"]}, hosts, now)["healthy"]


def test_explain_names_the_rules_both_ways_and_the_default_deny() -> None:
    policy = acl.parse(DOC)
    said = acl.explain(policy, WEB, DB, "tcp", 5432)
    assert said["forward"] == {
        "allowed": True,
        "rules": [{"index": 0, "text": "group:web → group:db tcp:5432,6000-6010"}],
        "reason": "allowed by rule 0 (group:web → group:db tcp:5432,6000-6010)",
    }
    # One-way: db may not open to web, yet they stay each other's peers.
    assert said["reverse"]["allowed"] is False and said["reverse"]["rules"] == []
    assert said["reverse"]["reason"] == "default deny: no rule allows it"
    assert said["peers"] is True and said["allows_all"] is False
    assert not acl.explain(policy, WEB, DB, "tcp", 22)["forward"]["allowed"]
    assert acl.explain(policy, WEB, DB, "tcp")["forward"]["allowed"]  # some tcp port
    assert not acl.explain(policy, WEB, DB, "icmp")["forward"]["allowed"]
    # Every host may ping the bastion: one rule; web and other share none.
    assert acl.explain(policy, OTHER, BASTION)["forward"]["rules"][0]["index"] == 1
    assert acl.explain(policy, WEB, OTHER)["peers"] is False
    # A new network's policy says so.
    everything = acl.explain(acl.parse(acl.ALLOW_ALL), WEB, OTHER, "udp", 53)
    assert everything["forward"]["reason"] == "allow-all policy (rule 0)"
    assert everything["reverse"]["allowed"] and everything["allows_all"]
    for proto, port in (("sctp", None), ("icmp", 1), ("tcp", 0), (None, 80)):
        with pytest.raises(acl.PolicyError):
            acl.explain(policy, WEB, DB, proto, port)


ported_rules = st.lists(
    st.fixed_dictionaries(
        {
            "src": st.lists(selector, min_size=1, max_size=3),
            "dst": st.lists(selector, min_size=1, max_size=3),
            "proto": protocol,
        }
    ).map(lambda r: r if r["proto"] in ("icmp", "any") else {**r, "ports": [22, "5000-5010"]}),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    rules=ported_rules,
    pair=hosts,
    port=st.sampled_from([22, 80, 5005]),
    proto=st.sampled_from(["tcp", "udp", "icmp"]),
)
def test_explain_agrees_with_evaluation_and_visibility(
    rules: list[dict[str, Any]], pair: list[dict[str, Any]], port: int, proto: str
) -> None:
    policy = acl.parse({"groups": {"g": ["tag:c", "label:role=y"]}, "rules": rules})
    a, b = pair[:2]
    port_or_none = None if proto == "icmp" else port
    said = acl.explain(policy, a, b, proto, port_or_none)
    for key, src, dst in (("forward", a, b), ("reverse", b, a)):
        decision = acl.evaluate(policy, src, dst, proto, port_or_none)
        verdict = said[key]
        # The same answer as the filter's, the first rule named is the one that decides,
        # and every rule named allows that flow on its own.
        assert verdict["allowed"] == decision.allowed == bool(verdict["rules"])
        if decision.allowed:
            assert verdict["rules"][0]["index"] == decision.rule
        for named in verdict["rules"]:
            alone = acl.Policy(groups=policy.groups, rules=(policy.rules[named["index"]],))
            assert acl.evaluate(alone, src, dst, proto, port_or_none).allowed
        # Without a protocol: allowed iff some flow is (what keeps them peers).
        assert acl.explain(policy, a, b)[key]["allowed"] == acl.has_flow(policy, src, dst)
    assert said["peers"] == (b["id"] in acl.peers_visible(policy, a, [b]))
