"""The collector's fast batch decoding (msgspec) against the reference path (json).

``metrics.decode`` takes version-2 batches through msgspec when it is installed and
falls back to the reference path for anything unusual; both must accept the same
batches, decode them to the same values and refuse the rest with the same reason.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cladnet import metrics

pytest.importorskip("msgspec")

TOPIC = "cladnet/metrics/prod/vm1"


def _good() -> dict[str, Any]:
    b = metrics.Batch("prod", "vm1", 7, 1_700_000_000.5, 2.0, host_id="h-1", sent=1_700_000_001.0)
    b.add("cpu_usage_ratio", 0.25)
    b.add("cpu_usage_ratio", 0.5, cpu="0")
    b.add("network_receive_bytes_total", 123456789, interface="eth0")
    return json.loads(b.encode())


def _both(payload: bytes, topic: str | None) -> tuple[Any, Any]:
    """What decode gives (or the error it raises) with the fast path, and without."""
    out = []
    for fast in (True, False):
        saved = metrics._fast
        if not fast:
            metrics._fast = False
        try:
            b = metrics.decode(payload, topic)
            out.append((b, b.column, b.values))
        except metrics.BatchError as exc:
            out.append(("error", str(exc)))
        finally:
            metrics._fast = saved
    return out[0], out[1]


def test_the_fast_path_is_taken_for_ordinary_batches() -> None:
    payload = json.dumps(_good()).encode()
    metrics.decode(payload)  # loads msgspec
    assert metrics._fast, "msgspec is installed but not used"
    assert metrics._decode_fast(payload, TOPIC) is not None
    fast, reference = _both(payload, TOPIC)
    assert fast == reference


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=6,
)
FIELDS = ["v", "network", "host", "host_id", "seq", "ts", "sent", "interval", "series", "values"]


@settings(max_examples=400, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from([*FIELDS, "extra"]), json_values, max_size=3),
    dropped=st.sets(st.sampled_from(FIELDS), max_size=2),
    value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans()),
    topic=st.sampled_from([TOPIC, None, "cladnet/metrics/prod/vm2"]),
)
def test_fast_and_reference_decoding_agree(
    changes: dict[str, Any], dropped: set[str], value: Any, topic: str | None
) -> None:
    raw = _good()
    raw["values"][1] = value
    raw.update(changes)
    for name in dropped:
        raw.pop(name, None)
    fast, reference = _both(json.dumps(raw).encode(), topic)
    assert fast == reference


@pytest.mark.parametrize(
    "payload",
    [
        b'{"v":2,"network":"prod","host":"vm1","seq":1,"ts":1,"series":"[]","values":[],'
        b'"x":"\xed\xa0\x80"}',  # invalid UTF-8 where msgspec does not look
        b'{"v":2,"network":"prod","host":"vm1","seq":1.0,"ts":1,"series":"[]","values":[]}',
        b'{"v":2,"network":"prod","host":"vm1","seq":1,"ts":1,"series":"[[\\"a\\",{}]]",'
        b'"values":[1e400]}',
        b'{"v":2,"network":"prod","host":"vm1","seq":1,"ts":1,"series":"[[\\"a\\",{}]]",'
        b'"values":[NaN]}',
        b'{"v":2,"network":"prod","host":"vm1","seq":1,"ts":"1","series":"[]","values":[]}',
    ],
)
def test_edge_cases_decode_alike(payload: bytes) -> None:
    fast, reference = _both(payload, None)
    assert fast == reference
    if fast[0] != "error":
        assert all(math.isfinite(v) for _, _, v in fast[0].samples)
