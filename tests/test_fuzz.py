"""Property-based fuzzing of what arrives from the network: the metric-batch decoder
(collector side) and the peer-event handling and planning (agent side). No crash,
only the documented errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.daemon import NetworkAgent
from agent.state import StateDir
from cladnet import mesh, metrics
from cladnet import policy as acl
from lab.peers import NETWORK, host, membership

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


@given(st.binary(max_size=300))
def test_decoder_survives_arbitrary_bytes(payload: bytes) -> None:
    try:
        metrics.decode(payload)
    except metrics.BatchError:
        pass


batch_like = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 2, "1"]),
        "network": st.text(max_size=12),
        "host": st.text(max_size=12),
        "seq": st.integers(-5, 10) | st.floats() | st.booleans(),
        "ts": st.floats() | st.integers() | st.text(max_size=3),
        "samples": st.lists(st.lists(json_values, max_size=4) | json_values, max_size=5),
    }
)


def _decodes_safely(raw: dict[str, Any]) -> None:
    """Whatever the decoder passes is safe to store: names valid, values finite floats."""
    try:
        batch = metrics.decode(json.dumps(raw).encode())
    except metrics.BatchError:
        return
    for name, labels, value in batch.samples:
        assert metrics.NAME_RE.match(name)
        assert all(isinstance(v, str) for v in labels.values())
        assert type(value) is float and math.isfinite(value)


@given(batch_like)
def test_decoder_accepts_only_well_formed_batches(raw: dict[str, Any]) -> None:
    _decodes_safely(raw)


series_entries = st.lists(
    st.lists(st.sampled_from(["cpu_usage_ratio", "9x", "", "a b"]) | json_values, max_size=3)
    | st.tuples(st.sampled_from(["load1", "x"]), st.dictionaries(st.text(max_size=4), json_values))
    | json_values,
    max_size=5,
)
batch_v2_like = st.fixed_dictionaries(
    {
        "v": st.sampled_from([2, 2, 1, True]),
        "network": st.sampled_from(["n", "a b"]),
        "host": st.sampled_from(["h", ""]),
        "seq": st.integers(-1, 3),
        "ts": st.floats() | st.integers(),
        "series": series_entries.map(json.dumps) | st.text(max_size=20) | json_values,
        "values": st.lists(st.floats() | st.integers() | json_values, max_size=5) | json_values,
    }
)


@given(batch_v2_like)
def test_decoder_accepts_only_well_formed_version_2_batches(raw: dict[str, Any]) -> None:
    _decodes_safely(raw)


peer_like = st.fixed_dictionaries(
    {
        "id": st.text(max_size=6),
        "public_key": st.text(max_size=50) | st.just(host(2)["public_key"]),
        "overlay_ip": st.text(max_size=15) | st.sampled_from(["10.77.0.9", "10.78.0.1", "::1"]),
    },
    optional={
        "listen_port": json_values,
        "addresses": json_values,
        "public_address": json_values,
        "labels": json_values,
        "endpoints": json_values,
    },
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(st.lists(peer_like | json_values, max_size=6))
def test_plan_never_crashes_on_hostile_peers(peers: list[Any]) -> None:
    try:
        device = mesh.plan(NETWORK, host(1), peers)
    except (TypeError, ValueError, AttributeError) as exc:  # pragma: no cover - a finding
        raise AssertionError(f"plan crashed on {peers!r}: {exc!r}") from exc
    ips = [p.allowed_ips for p in device.peers.values()]
    assert len(ips) == len(set(ips))  # never two peers with one address


# No deadline: each example builds an agent, slow on a loaded machine.
@settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200, deadline=None
)
@given(
    st.lists(
        json_values
        | st.fixed_dictionaries(
            {
                "type": st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "POLICY"]),
                "revision": json_values,
            },
            optional={"peer": json_values, "id": json_values, "policy": json_values},
        ),
        max_size=8,
    )
)
def test_event_handling_never_crashes(tmp_path_factory, events: list[Any]) -> None:
    m = membership("cl-fuzz", revision=0)
    agent = NetworkAgent(StateDir(Path(tmp_path_factory.mktemp("s"))), m, "c", "k", None)  # type: ignore[arg-type]
    for event in events:
        agent._on_event(event)
    # A policy is kept only if it can be enforced.
    if agent.m.policy is not None:
        acl.parse(agent.m.policy["document"])
    # Whatever the view became, planning from it must not crash either.
    test_plan_never_crashes_on_hostile_peers.hypothesis.inner_test(list(agent.m.peers.values()))  # type: ignore[attr-defined]
