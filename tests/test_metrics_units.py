"""Monitoring logic without I/O: wire format, spool, sequence tracking, alarms, exposition."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agent.metrics.exposition import render
from agent.metrics.spool import Spool, SpoolLimits
from cladnet import metrics
from cladnet.alarms import HOST_DOWN, AlarmEngine, Rule, RuleError
from cladnet.metrics import Batch, BatchError, Sample
from cladnet.sequence import SequenceTracker, Verdict


def _batch(seq: int = 0, ts: float = 1000.0, **kw) -> Batch:
    b = Batch(network="prod", host="vm1", seq=seq, ts=ts, interval=2.0, **kw)
    b.add("cpu_usage_ratio", 12.5)
    b.add("cpu_usage_ratio", 50.0, core="0")
    return b


# --- wire format -----------------------------------------------------------------------


def test_batch_round_trip_and_topic() -> None:
    b = _batch(seq=7)
    back = metrics.decode(b.encode(), "cladnet/metrics/prod/vm1")
    assert (back.network, back.host, back.seq, back.ts) == ("prod", "vm1", 7, 1000.0)
    assert back.flat() == [
        Sample("prod", "vm1", "cpu_usage_ratio", (), 1000.0, 12.5),
        Sample("prod", "vm1", "cpu_usage_ratio", (("core", "0"),), 1000.0, 50.0),
    ]
    assert back.flat()[1].series == 'cpu_usage_ratio{core="0"}'


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "version-1"),
        (b'{"v": 1}', "missing"),
        (b'{"v":1,"network":"a b","host":"h","seq":1,"ts":1,"samples":[]}', "bad network"),
        (b'{"v":1,"network":"n","host":"h","seq":-1,"ts":1,"samples":[]}', "seq"),
        (b'{"v":1,"network":"n","host":"h","seq":true,"ts":1,"samples":[]}', "seq"),
        (b'{"v":1,"network":"n","host":"h","seq":1,"ts":1,"samples":[["9x",{},1]]}', "name"),
        (b'{"v":1,"network":"n","host":"h","seq":1,"ts":1,"samples":[["x",{"a":1},1]]}', "labels"),
        (b'{"v":1,"network":"n","host":"h","seq":1,"ts":1,"samples":[["x",{},"1"]]}', "number"),
        (b'{"v":1,"network":"n","host":"h","seq":1,"ts":1,"samples":[["x",{}]]}', "sample"),
    ],
)
def test_bad_batches_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BatchError, match=reason):
        metrics.decode(payload)


def test_a_batch_on_another_hosts_topic_is_rejected() -> None:
    with pytest.raises(BatchError, match="published on"):
        metrics.decode(_batch().encode(), "cladnet/metrics/prod/vm2")


def _v1(batch: Batch) -> dict:
    """``batch`` in the version-1 wire form (what older agents' spools still hold)."""
    raw = json.loads(batch.encode())
    raw["v"] = 1
    raw["samples"] = [[n, lb, v] for n, lb, v in batch.samples]
    del raw["series"], raw["values"]
    return raw


def test_non_finite_values_are_dropped_not_fatal() -> None:
    raw = _v1(_batch())
    raw["samples"].append(["wireguard_peer_latency_seconds", {"peer": "vm2"}, 1e999])
    raw["samples"].append(["wireguard_peer_latency_seconds", {"peer": "vm3"}, 10**400])
    assert len(metrics.decode(json.dumps(raw).encode()).samples) == 2
    raw = json.loads(_batch().encode())
    raw["series"] = raw["series"][:-1] + ',["x",{}],["y",{}]]'
    raw["values"] += [1e999, 10**400]
    assert len(metrics.decode(json.dumps(raw).encode()).samples) == 2


def test_version_1_and_2_decode_alike() -> None:
    b = _batch(seq=3)
    assert json.loads(b.encode())["v"] == 2
    old = metrics.decode(json.dumps(_v1(b)).encode(), "cladnet/metrics/prod/vm1")
    new = metrics.decode(b.encode(), "cladnet/metrics/prod/vm1")
    assert old == new
    assert new.samples == [(n, lb, float(v)) for n, lb, v in b.samples]
    assert all(type(v) is float for _, _, v in new.samples)
    assert metrics.decode(b.encode()).samples == new.samples  # from the series cache


def test_version_2_batches_carry_their_columns() -> None:
    b = _batch(seq=4)
    first, again = metrics.decode(b.encode()), metrics.decode(_batch(seq=5).encode())
    assert first.column is not None and first.values == [12.5, 50.0]
    assert list(zip(*first.column, first.values, strict=True)) == first.samples
    # The same series text: the same parsed column object, what stores key their caches on.
    assert again.column is first.column
    # A non-finite value is dropped from samples, so the columns are not the samples.
    raw = json.loads(b.encode())
    raw["values"][0] = 1e999
    partial = metrics.decode(json.dumps(raw).encode())
    assert (partial.column, partial.values, len(partial.samples)) == (None, None, 1)
    assert metrics.decode(json.dumps(_v1(b)).encode()).column is None


def _v2(series: object, values: object) -> bytes:
    raw = json.loads(_batch().encode())
    raw["series"], raw["values"] = series, values
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_v2([["x", {}]], [1]), "JSON string"),
        (_v2("[[", [1]), "series is not JSON"),
        (_v2('{"x":1}', [1]), "list"),
        (_v2('[["x",{}, 1]]', [1]), r"\[name, labels\]"),
        (_v2('[["9x",{}]]', [1]), "name"),
        (_v2('[["x",{"a":1}]]', [1]), "labels"),
        (_v2('[["x",{}]]', [1, 2]), "as long as"),
        (_v2('[["x",{}]]', "1"), "as long as"),
        (_v2('[["x",{}]]', [True]), "number"),
        (_v2('[["x",{}]]', ["1"]), "number"),
        (b'{"v":2,"network":"n","host":"h","seq":1,"ts":1,"samples":[]}', "missing"),
    ],
)
def test_bad_version_2_batches_are_rejected(payload: bytes, reason: str) -> None:
    with pytest.raises(BatchError, match=reason):
        metrics.decode(payload)


# --- spool -------------------------------------------------------------------------------


def test_spool_keeps_order_and_sequence_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    for _ in range(3):
        seq = spool.next_seq()
        spool.append(seq, f"batch {seq}".encode())
    assert [body for _, body in spool.pending(10)] == [b"batch 0", b"batch 1", b"batch 2"]
    path, _ = spool.pending(1)[0]
    spool.done(path)
    # A restart: the two unsent batches are still there, and numbering continues.
    again = Spool(tmp_path / "s")
    assert [body for _, body in again.pending(10)] == [b"batch 1", b"batch 2"]
    assert again.next_seq() == 3
    # Even with everything sent, the sequence does not restart.
    for path, _ in again.pending(10):
        again.done(path)
    assert Spool(tmp_path / "s").next_seq() == 4


def test_spool_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", SpoolLimits(max_batches=3))
    for _ in range(5):
        seq = spool.next_seq()
        spool.append(seq, str(seq).encode())
    assert [b for _, b in spool.pending(10)] == [b"2", b"3", b"4"]
    assert spool.dropped == 2
    by_size = Spool(tmp_path / "t", SpoolLimits(max_bytes=10))
    for seq in range(4):
        by_size.append(seq, b"12345")
    assert len(by_size) == 2 and by_size.size_bytes == 10 and by_size.dropped == 2


def test_spool_ignores_a_half_written_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.append(spool.next_seq(), b"ok")
    (tmp_path / "s" / "00000000000000000001.batch.tmp").write_bytes(b"cut")
    again = Spool(tmp_path / "s")
    assert [b for _, b in again.pending(10)] == [b"ok"]
    assert not list((tmp_path / "s").glob("*.tmp"))


# --- sequence tracking -------------------------------------------------------------------


def test_duplicates_are_dropped_and_gaps_counted() -> None:
    t = SequenceTracker()
    assert t.check("vm1", 0, 10.0) is Verdict.NEW
    assert t.check("vm1", 0, 10.0) is Verdict.DUPLICATE
    assert t.check("vm1", 3, 16.0) is Verdict.NEW  # 1 and 2 missing
    assert t.stats()["vm1"] == {"highest_seq": 3, "gaps": 2, "duplicates": 1, "resets": 0}
    assert t.check("vm1", 1, 12.0) is Verdict.NEW  # late, fills a gap
    assert t.check("vm1", 1, 12.0) is Verdict.DUPLICATE
    assert t.stats()["vm1"]["gaps"] == 1


def test_an_agent_that_lost_its_state_is_a_reset_not_a_duplicate() -> None:
    t = SequenceTracker()
    for seq in range(5):
        t.check("vm1", seq, 10.0 + seq)
    assert t.check("vm1", 0, 500.0) is Verdict.NEW
    assert t.check("vm1", 1, 502.0) is Verdict.NEW
    assert t.stats()["vm1"]["resets"] == 1
    assert t.check("other", 0, 10.0) is Verdict.NEW  # hosts are independent


# --- alarms ------------------------------------------------------------------------------


def _s(value: float, ts: float, host: str = "vm1", name: str = "cpu_usage_ratio") -> Sample:
    return Sample("prod", host, name, (), ts, value)


def test_a_rule_fires_once_per_episode_after_its_duration() -> None:
    engine = AlarmEngine([Rule("r1", "hot", "cpu_usage_ratio", ">", 90, "prod", for_s=10)])
    assert engine.observe([_s(95, 0)]) == []  # pending
    assert engine.observe([_s(96, 5)]) == []
    fired = engine.observe([_s(97, 10)])
    assert [(e.state, e.host, e.value) for e in fired] == [("firing", "vm1", 97)]
    assert engine.observe([_s(99, 12), _s(99, 14)]) == []  # no repeat while firing
    assert engine.active()[0]["rule_id"] == "r1"
    resolved = engine.observe([_s(10, 16)])
    assert [e.state for e in resolved] == ["resolved"]
    assert engine.active() == []
    # A dip resets the pending timer.
    engine.observe([_s(95, 20)])
    engine.observe([_s(50, 25)])
    assert engine.observe([_s(95, 31)]) == []


def test_rules_select_by_host_labels_and_network() -> None:
    rule = Rule("r", "core0", "cpu_usage_ratio", ">=", 50, "prod", host="vm2", labels={"core": "0"})
    engine = AlarmEngine([rule])
    assert engine.observe([_s(99, 1)]) == []  # vm1: other host
    core0 = Sample("prod", "vm2", "cpu_usage_ratio", (("core", "0"),), 1, 60)
    core1 = Sample("prod", "vm2", "cpu_usage_ratio", (("core", "1"),), 1, 60)
    other_net = Sample("test", "vm2", "cpu_usage_ratio", (("core", "0"),), 1, 60)
    assert [e.series for e in engine.observe([core0, core1, other_net])] == [
        'cpu_usage_ratio{core="0"}'
    ]


def test_invalid_rules_are_refused() -> None:
    with pytest.raises(RuleError, match="op"):
        Rule("r", "x", "cpu_usage_ratio", "=>", 1, "prod")
    with pytest.raises(RuleError, match="metric"):
        Rule("r", "x", "cpu percent", ">", 1, "prod")


def test_host_down_fires_once_and_resolves() -> None:
    engine = AlarmEngine()
    seen = {("prod", "vm1"): (100.0, 2.0)}
    assert engine.check_down(seen, 105.0) == []
    down = engine.check_down(seen, 107.0)
    assert [(e.rule_id, e.state) for e in down] == [(HOST_DOWN, "firing")]
    assert "host down" in down[0].text()
    assert engine.check_down(seen, 200.0) == []
    seen[("prod", "vm1")] = (201.0, 2.0)
    assert [e.state for e in engine.check_down(seen, 202.0)] == ["resolved"]


# --- pull exposition ---------------------------------------------------------------------


def test_prometheus_text_has_types_labels_and_escaping() -> None:
    b = _batch()
    b.add("disk_percent", 40.0, mount='/mnt/"odd"\\dir')
    text = render([b]).decode()
    assert "# TYPE cpu_usage_ratio gauge" in text
    assert 'cpu_usage_ratio{network="prod",host="vm1",core="0"} 50.0 1000000' in text
    assert r'mount="/mnt/\"odd\"\\dir"' in text
    assert text.count("# TYPE cpu_usage_ratio") == 1
    assert not math.isnan(float(text.splitlines()[1].split()[1]))
