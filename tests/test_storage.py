"""The collector's stores, same behaviour on both: SQLite (embedded) and a real
VictoriaMetrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cladnet.metrics import Sample
from collector.storage import MetricsStore, SqliteStore, VictoriaStore
from tests.components import Victoria, free_port


@pytest.fixture(params=["sqlite", "victoria"])
async def store(request, tmp_path: Path) -> AsyncIterator[MetricsStore]:
    if request.param == "sqlite":
        s: MetricsStore = SqliteStore(tmp_path / "m.db", raw_retention=3600)
        yield s
        await s.close()
        return
    vm = Victoria(tmp_path / "vm", free_port())
    vm.start()
    s = VictoriaStore(vm.url)
    try:
        yield s
    finally:
        await s.close()
        vm.stop()


async def _flush(store: MetricsStore) -> None:
    if isinstance(store, VictoriaStore):
        await store.flush()


def _t0() -> float:
    """A minute-aligned start two minutes ago: recent enough for VictoriaMetrics'
    retention and the 10-minute lookback of ``latest``, computed when the test runs."""
    return (int(time.time()) // 60) * 60 - 120.0


def _s(host: str, name: str, ts: float, value: float, **labels: str) -> Sample:
    return Sample("prod", host, name, tuple(sorted(labels.items())), ts, value)


async def test_latest_is_the_newest_value_of_every_series(store: MetricsStore) -> None:
    T0 = _t0()
    await store.write([_s("vm1", "cpu_percent", T0 + i, 10.0 + i) for i in range(5)])
    await store.write([_s("vm1", "cpu_percent", T0 + 2, 50.0, core="0")])
    await store.write([_s("vm2", "cpu_percent", T0 + 1, 7.0)])
    await _flush(store)
    latest = {(s.host, s.series): s.value for s in await store.latest(network="prod")}
    assert latest == {
        ("vm1", "cpu_percent"): 14.0,
        ("vm1", 'cpu_percent{core="0"}'): 50.0,
        ("vm2", "cpu_percent"): 7.0,
    }
    only_vm2 = await store.latest(network="prod", host="vm2")
    assert [s.value for s in only_vm2] == [7.0]
    assert await store.latest(network="other") == []


async def test_series_bucketed_by_step_with_each_aggregation(store: MetricsStore) -> None:
    T0 = _t0()
    # 1 sample per second for 40 s: values 0..39.
    await store.write([_s("vm1", "load1", T0 + i, float(i)) for i in range(40)])
    await _flush(store)
    if isinstance(store, SqliteStore):
        avg = await store.series("vm1", "load1", None, T0, T0 + 39, 10, "avg")
        assert avg == [(T0, 4.5), (T0 + 10, 14.5), (T0 + 20, 24.5), (T0 + 30, 34.5)]
        assert [v for _, v in await store.series("vm1", "load1", None, T0, T0 + 39, 10, "max")] == [
            9,
            19,
            29,
            39,
        ]
        assert [v for _, v in await store.series("vm1", "load1", None, T0, T0 + 39, 10, "min")] == [
            0,
            10,
            20,
            30,
        ]
        # Below the rollup step, raw samples answer — same average as the rollups.
        raw = await store.series("vm1", "load1", None, T0, T0 + 39, 5, "avg")
        assert [v for _, v in raw] == [2.0, 7.0, 12.0, 17.0, 22.0, 27.0, 32.0, 37.0]
    else:
        # Prometheus semantics: each point looks back one step from its timestamp.
        avg = await store.series("vm1", "load1", None, T0 + 10, T0 + 39, 10, "avg")
        assert [round(v, 1) for _, v in avg] == [5.5, 15.5, 25.5]
        maxed = await store.series("vm1", "load1", None, T0 + 10, T0 + 39, 10, "max")
        assert [v for _, v in maxed] == [10, 20, 30]
    assert await store.series("vm1", "nothing", None, T0, T0 + 39, 10) == []


async def test_labels_pick_one_series_and_odd_values_survive(store: MetricsStore) -> None:
    T0 = _t0()
    odd = 'disk "/mnt/ü\\x"'
    await store.write(
        [_s("vm1", "disk_percent", T0 + i, 10.0, mount="/") for i in range(3)]
        + [_s("vm1", "disk_percent", T0 + i, 90.0, mount=odd) for i in range(3)]
    )
    await _flush(store)
    one = await store.series("vm1", "disk_percent", {"mount": odd}, T0, T0 + 9, 10, "avg")
    assert [v for _, v in one] == [90.0]
    both = await store.series("vm1", "disk_percent", None, T0, T0 + 9, 10, "avg")
    assert [v for _, v in both] == [50.0]
    assert odd in {dict(s.labels).get("mount") for s in await store.latest(host="vm1")}


async def test_network_aggregate_over_hosts(store: MetricsStore) -> None:
    T0 = _t0()
    await store.write(
        [_s("vm1", "mem_percent", T0, 20.0), _s("vm2", "mem_percent", T0, 60.0),
         _s("vm3", "mem_percent", T0 - 3600, 99.0)]  # stale: not in the window
    )  # fmt: skip
    await _flush(store)
    agg = await store.aggregate("prod", "mem_percent", since=T0 - 60)
    assert agg == {"hosts": 2, "avg": 40.0, "max": 60.0}
    assert (await store.aggregate("prod", "nothing", since=T0))["hosts"] == 0


async def test_bad_queries_are_value_errors(store: MetricsStore) -> None:
    T0 = _t0()
    with pytest.raises(ValueError, match="agg"):
        await store.series("vm1", "x", None, T0, T0 + 1, 10, "p99")
    with pytest.raises(ValueError, match="start"):
        await store.series("vm1", "x", None, T0 + 10, T0, 10)


async def test_sqlite_retention_keeps_rollups(tmp_path: Path) -> None:
    T0 = _t0()
    store = SqliteStore(tmp_path / "m.db", raw_retention=60, rollup_retention=86400)
    try:
        await store.write([_s("vm1", "load1", T0 + i, float(i)) for i in range(10)])
        await store.prune(now=T0 + 3600)  # raw samples are an hour old: gone
        assert await store.series("vm1", "load1", None, T0, T0 + 9, 1, "avg") == []
        assert await store.series("vm1", "load1", None, T0, T0 + 9, 10, "avg") == [(T0, 4.5)]
    finally:
        await store.close()
