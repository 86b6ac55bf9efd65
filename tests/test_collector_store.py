"""collector.store: the same behaviour from both backends — SQLite (embedded) and a
real VictoriaMetrics (Debian ``victoria-metrics``) started per test on a random
loopback port."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cladnet import metrics
from cladnet.metrics import Batch, Sample
from collector.store import (
    AmbiguousSeries,
    MetricsStore,
    SqliteStore,
    StoreError,
    VictoriaStore,
    normalize_labels,
    open_store,
)
from collector.store.base import Labels
from lab.components import Victoria, free_port

# ---- a real VictoriaMetrics ------------------------------------------------------------


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[Victoria]:
    server = Victoria(tmp_path / "vm-data", free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "victoria"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetricsStore]:
    s: MetricsStore
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "metrics.db", raw_retention=3600, rollup_retention=86400)
    else:
        server = request.getfixturevalue("victoria")
        s = VictoriaStore(server.url, lookback=3600, hosts_lookback=86400)
    try:
        yield s
    finally:
        await s.close()


async def put(store: MetricsStore, samples: list[Sample]) -> None:
    """Write, then make it queryable (VictoriaMetrics buffers for about a second)."""
    await store.write(samples)
    await store.flush()


# Recent (VictoriaMetrics refuses samples outside its retention), aligned to a minute.
T0 = float(int(time.time()) // 60 * 60 - 1200)


def sample(host: str, name: str, ts: float, value: float, net: str = "prod", **lb: str) -> Sample:
    return Sample(net, host, name, tuple(sorted(lb.items())), ts, value)


def values(points: list[tuple[float, float]]) -> list[float]:
    return [v for _, v in points]


# ---- behaviour, both backends -----------------------------------------------------------


async def test_write_then_latest(store: MetricsStore) -> None:
    await put(store, [sample("vm1", "cpu_percent", T0 + i, 10.0 + i) for i in range(5)])
    await put(
        store,
        [
            sample("vm1", "cpu_percent", T0 + 2, 50.0, core="0"),
            sample("vm2", "cpu_percent", T0 + 1.5, 7.0),
            sample("vm3", "cpu_percent", T0 + 3, 1.0, net="lab"),
            # Arrives late with an older timestamp: must not replace the newest value.
            sample("vm1", "cpu_percent", T0 + 1, 99.0),
        ],
    )
    latest = {(s.network, s.host, s.series): (s.ts, s.value) for s in await store.latest()}
    assert latest == {
        ("prod", "vm1", "cpu_percent"): (T0 + 4, 14.0),
        ("prod", "vm1", 'cpu_percent{core="0"}'): (T0 + 2, 50.0),
        ("prod", "vm2", "cpu_percent"): (T0 + 1.5, 7.0),
        ("lab", "vm3", "cpu_percent"): (T0 + 3, 1.0),
    }
    assert {s.host for s in await store.latest(network="prod")} == {"vm1", "vm2"}
    only_vm2 = await store.latest(network="prod", host="vm2")
    assert [(s.name, s.labels, s.value) for s in only_vm2] == [("cpu_percent", (), 7.0)]
    assert [s.host for s in await store.latest(host="vm3")] == ["vm3"]
    assert await store.latest(network="other") == []
    assert await store.latest(network="prod", host="vm3") == []


async def test_series_buckets_and_aggregations(store: MetricsStore) -> None:
    # One sample a second for 40 s: value i at T0 + i.
    await put(store, [sample("vm1", "load1", T0 + i, float(i)) for i in range(40)])
    end = T0 + 39

    async def q(step: float, agg: str, start: float = T0, stop: float = end) -> list:
        return await store.series("vm1", "load1", None, start, stop, step, agg)

    assert await q(10, "avg") == [(T0, 4.5), (T0 + 10, 14.5), (T0 + 20, 24.5), (T0 + 30, 34.5)]
    assert values(await q(10, "min")) == [0, 10, 20, 30]
    assert values(await q(10, "max")) == [9, 19, 29, 39]
    assert values(await q(10, "last")) == [9, 19, 29, 39]
    assert await q(20, "avg") == [(T0, 9.5), (T0 + 20, 29.5)]
    assert await q(60, "max") == [(T0, 39.0)]
    # Steps below 10 s (SQLite: raw samples) and odd steps.
    assert values(await q(5, "avg")) == [2, 7, 12, 17, 22, 27, 32, 37]
    assert values(await q(1, "last")) == [float(i) for i in range(40)]
    assert await q(4, "min") == [(T0 + 4 * i, 4.0 * i) for i in range(10)]
    # Buckets are aligned to the epoch: a start inside a bucket gets the whole bucket.
    assert await q(10, "avg", start=T0 + 13, stop=T0 + 25) == [(T0 + 10, 14.5), (T0 + 20, 24.5)]
    # end is inclusive: a bucket that starts at end is included.
    assert await q(10, "min", start=T0 + 30, stop=T0 + 30) == [(T0 + 30, 30.0)]
    # Ranges with no samples, unknown metrics and hosts: empty.
    assert await q(10, "avg", start=T0 + 100, stop=T0 + 200) == []
    assert await q(10, "avg", start=T0 - 200, stop=T0 - 100) == []
    assert await store.series("vm1", "nothing", None, T0, end, 10) == []
    assert await store.series("vm9", "load1", None, T0, end, 10) == []


async def test_gaps_are_omitted_and_half_open_buckets(store: MetricsStore) -> None:
    points = [(0.0, 1.0), (9.999, 2.0), (10.0, 3.0), (35.5, 4.0)]
    await put(store, [sample("vm1", "procs", T0 + t, v) for t, v in points])
    assert await store.series("vm1", "procs", None, T0, T0 + 59, 10, "avg") == [
        (T0, 1.5),
        (T0 + 10, 3.0),
        (T0 + 30, 4.0),
    ]
    assert await store.series("vm1", "procs", None, T0, T0 + 59, 10, "last") == [
        (T0, 2.0),
        (T0 + 10, 3.0),
        (T0 + 30, 4.0),
    ]


async def test_labels_select_exactly_one_series(store: MetricsStore) -> None:
    await put(
        store,
        [sample("vm1", "cpu_percent", T0 + i, 40.0) for i in range(3)]
        + [
            sample("vm1", "cpu_percent", T0 + i, 10.0 * (c + 1), core=str(c))
            for i in range(3)
            for c in range(2)
        ]
        + [sample("vm1", "disk_percent", T0 + i, 30.0, mount="/") for i in range(3)]
        + [sample("vm1", "disk_percent", T0 + i, 80.0, mount="/data") for i in range(3)]
        + [sample("vm1", "peer_rtt_ms", T0 + i, 0.5, peer="vm2") for i in range(3)]
        + [sample("vm1", "peer_rtt_ms", T0 + i, 9.0, peer="vm2", path="relay") for i in range(3)]
        + [sample("vm1", "swap_percent", T0 + i, 3.0, zone="a") for i in range(3)],
    )

    async def one(name: str, labels: dict[str, str] | None) -> list[float]:
        return values(await store.series("vm1", name, labels, T0, T0 + 9, 10, "avg"))

    # None prefers the unlabelled series over its labelled siblings.
    assert await one("cpu_percent", None) == [40.0]
    assert await one("cpu_percent", {}) == [40.0]
    assert await one("cpu_percent", {"core": "1"}) == [20.0]
    assert await one("disk_percent", {"mount": "/data"}) == [80.0]
    # Labels are an exact set: {peer} is not {peer, path}.
    assert await one("peer_rtt_ms", {"peer": "vm2"}) == [0.5]
    assert await one("peer_rtt_ms", {"peer": "vm2", "path": "relay"}) == [9.0]
    # One label set only: None picks it.
    assert await one("swap_percent", None) == [3.0]
    # Several label sets and no unlabelled series: an error that lists them.
    with pytest.raises(AmbiguousSeries) as err:
        await one("disk_percent", None)
    assert err.value.label_sets == [{"mount": "/"}, {"mount": "/data"}]
    assert "mount='/data'" in str(err.value)
    assert isinstance(err.value, ValueError)
    # A label set that does not exist, or {} where only labelled series exist: nothing.
    assert await one("disk_percent", {"mount": "/nope"}) == []
    assert await one("disk_percent", {}) == []
    assert await one("cpu_percent", {"core": "0", "extra": "x"}) == []


async def test_label_normalisation_is_the_same_on_both(store: MetricsStore) -> None:
    await put(
        store,
        [
            # An empty label value is no label (the Prometheus model).
            sample("vm1", "mem_percent", T0, 55.0, numa=""),
            # Reserved names would collide with the series' own network/host.
            Sample("prod", "vm1", "peer_rx_bytes", (("host", "spoof"), ("peer", "vm2")), T0, 1.0),
        ],
    )
    latest = {(s.name, s.labels): s.value for s in await store.latest(host="vm1")}
    assert latest == {
        ("mem_percent", ()): 55.0,
        ("peer_rx_bytes", (("exported_host", "spoof"), ("peer", "vm2"))): 1.0,
    }
    assert all(s.host == "vm1" and s.network == "prod" for s in await store.latest())
    assert values(await store.series("vm1", "mem_percent", {"numa": ""}, T0, T0, 10)) == [55.0]
    got = await store.series("vm1", "peer_rx_bytes", {"host": "spoof", "peer": "vm2"}, T0, T0, 10)
    assert values(got) == [1.0]
    assert normalize_labels({"b": "1", "a": "2", "__name__": "x"}) == (
        ("a", "2"),
        ("b", "1"),
        ("exported___name__", "x"),
    )


ODD_VALUES = [
    'disk "/mnt/ü\\x"',
    "Ω≈ç√ 日本語 🚀",
    "a,b=c}{d",
    "line\nbreak\ttab",
    "back\\slash\\",
    "'single' `tick` $dollar .*+?",
]


async def test_unicode_and_odd_label_values_round_trip(store: MetricsStore) -> None:
    await put(
        store,
        [
            sample("vm1", "disk_percent", T0 + i, float(n), mount=odd)
            for n, odd in enumerate(ODD_VALUES)
            for i in range(2)
        ],
    )
    latest = {dict(s.labels)["mount"]: s.value for s in await store.latest(host="vm1")}
    assert latest == {odd: float(n) for n, odd in enumerate(ODD_VALUES)}
    for n, odd in enumerate(ODD_VALUES):
        got = await store.series("vm1", "disk_percent", {"mount": odd}, T0, T0 + 9, 10, "max")
        assert got == [(T0, float(n))], odd


async def test_network_aggregate_over_hosts(store: MetricsStore) -> None:
    await put(
        store,
        [
            sample("vm1", "mem_percent", T0, 20.0),
            sample("vm1", "mem_percent", T0 + 5, 30.0),  # the latest value counts
            sample("vm2", "mem_percent", T0 + 5, 60.0),
            sample("vm3", "mem_percent", T0 - 600, 99.0),  # stale: before `since`
            sample("vm4", "mem_percent", T0 + 5, 100.0, net="lab"),  # another network
            # Unlabelled beats labelled; labelled only → mean over the label sets.
            sample("vm1", "cpu_percent", T0 + 5, 50.0),
            sample("vm1", "cpu_percent", T0 + 5, 90.0, core="0"),
            sample("vm1", "peer_rtt_ms", T0 + 5, 1.0, peer="vm2"),
            sample("vm1", "peer_rtt_ms", T0 + 5, 3.0, peer="vm3"),
            sample("vm2", "peer_rtt_ms", T0 + 5, 8.0, peer="vm1"),
        ],
    )
    since = T0 - 60
    assert await store.aggregate("prod", "mem_percent", since) == {
        "hosts": 2,
        "avg": 45.0,
        "min": 30.0,
        "max": 60.0,
        "max_host": "vm2",
    }
    assert (await store.aggregate("prod", "mem_percent", T0 - 3600))["hosts"] == 3
    assert (await store.aggregate("prod", "cpu_percent", since))["avg"] == 50.0
    rtt = await store.aggregate("prod", "peer_rtt_ms", since)
    assert (rtt["hosts"], rtt["avg"], rtt["max"], rtt["max_host"]) == (2, 5.0, 8.0, "vm2")
    assert await store.aggregate("lab", "mem_percent", since) == {
        "hosts": 1,
        "avg": 100.0,
        "min": 100.0,
        "max": 100.0,
        "max_host": "vm4",
    }
    empty = {"hosts": 0, "avg": None, "min": None, "max": None, "max_host": None}
    assert await store.aggregate("prod", "nothing", since) == empty
    assert await store.aggregate("nowhere", "mem_percent", since) == empty
    assert await store.aggregate("prod", "mem_percent", T0 + 60) == empty


async def test_hosts_with_their_newest_sample(store: MetricsStore) -> None:
    await put(
        store,
        [
            sample("vm1", "load1", T0, 1.0),
            sample("vm1", "uptime_seconds", T0 + 4.25, 1.0),
            sample("vm2", "load1", T0 + 2, 1.0),
            sample("vm9", "load1", T0 + 3, 1.0, net="lab"),
        ],
    )
    assert await store.hosts("prod") == {"vm1": T0 + 4.25, "vm2": T0 + 2}
    assert await store.hosts("lab") == {"vm9": T0 + 3}
    assert await store.hosts("none") == {}


async def test_same_host_name_in_two_networks(store: MetricsStore) -> None:
    await put(
        store,
        [sample("vm1", "load1", T0, 1.0), sample("vm1", "load1", T0, 2.0, net="lab")],
    )
    with pytest.raises(AmbiguousSeries, match="network"):
        await store.series("vm1", "load1", None, T0, T0, 10)
    got = await store.series("vm1", "load1", None, T0, T0, 10, network="lab")
    assert got == [(T0, 2.0)]


async def test_redelivered_batches_count_once(store: MetricsStore) -> None:
    batch = [sample("vm1", "load1", T0 + i, float(i)) for i in range(10)]
    await put(store, batch)
    await put(store, batch[3:])  # the collector restarted before acking these
    assert await store.series("vm1", "load1", None, T0, T0 + 9, 10, "avg") == [(T0, 4.5)]
    assert (await store.latest(host="vm1"))[0].value == 9.0


def _decoded(network: str, host: str, seq: int, ts: float, peers: int) -> Batch:
    """A batch as the collector gets it: encoded (version 2), then decoded."""
    b = Batch(network, host, seq, ts, 2.0)
    b.add("load1", seq + 0.5)
    b.add("cpu_usage_ratio", 0.25, cpu="0", host="x")  # a reserved label, renamed
    for p in range(peers):
        b.add("wireguard_peer_latency_seconds", seq / 1000 + p, peer=f"vm{p}")
    return metrics.decode(b.encode())


async def test_batches_by_column_store_what_their_samples_do(store: MetricsStore) -> None:
    # Two hosts, two flushes; vm2's series change (a peer joins) between them, and one
    # of its batches has a non-finite value, so it has no columns and takes the row path.
    flushes = [
        [_decoded("cols", "vm1", 0, T0, 1), _decoded("cols", "vm2", 0, T0, 1)],
        [
            _decoded("cols", "vm1", 1, T0 + 2, 1),
            _decoded("cols", "vm2", 1, T0 + 2, 2),
            _decoded("cols", "vm1", 2, T0 + 4, 1),
        ],
    ]
    odd = Batch("cols", "vm2", 2, T0 + 4, 2.0)
    odd.add("load1", 7.0)
    odd.add("load5", math.inf)
    flushes[1].append(metrics.decode(odd.encode()))
    assert flushes[1][1].column is not None and flushes[1][3].column is None
    for batches in flushes:
        await store.write_batches(batches)
        # The same samples by rows, under another network name.
        await store.write([s for b in batches for s in b.flat() if math.isfinite(s.value)])
        for b in batches:
            b.network = "rows"
        await store.write([s for b in batches for s in b.flat() if math.isfinite(s.value)])
    await store.write_batches(flushes[1][:2])  # re-delivered: counted once
    await store.flush()

    def view(samples: list[Sample]) -> list[tuple[str, str, Labels, float, float]]:
        return sorted((s.host, s.name, s.labels, s.ts, s.value) for s in samples)

    by_column = view(await store.latest(network="cols"))
    assert by_column == view(await store.latest(network="rows"))
    assert ("vm2", "load1", (), T0 + 4, 7.0) in by_column
    assert ("vm1", "cpu_usage_ratio", (("cpu", "0"), ("exported_host", "x")), T0 + 4, 0.25) in (
        by_column
    )
    assert len([s for s in by_column if s[0] == "vm2"]) == 4  # load1, cpu, 2 peers
    for network in ("cols", "rows"):
        points = await store.series("vm1", "load1", None, T0, T0 + 9, 10, "avg", network=network)
        assert points == [(T0, 1.5)]
        assert await store.series(
            "vm2",
            "wireguard_peer_latency_seconds",
            {"peer": "vm1"},
            T0,
            T0 + 9,
            1,
            "last",
            network=network,
        ) == [(T0 + 2, 1.001)]


async def test_nonfinite_values_are_skipped(store: MetricsStore) -> None:
    await put(
        store,
        [
            sample("vm1", "peer_rtt_ms", T0, math.nan, peer="vm2"),
            sample("vm1", "peer_rtt_ms", T0 + 1, math.inf, peer="vm2"),
            sample("vm1", "peer_rtt_ms", T0 + 2, 0.25, peer="vm2"),
            sample("vm1", "load1", math.nan, 1.0),
        ],
    )
    assert store.skipped == 3
    latest = await store.latest()
    assert [(s.name, s.ts, s.value) for s in latest] == [("peer_rtt_ms", T0 + 2, 0.25)]
    await store.write([])  # nothing to do, no error


async def test_empty_store_answers_empty(store: MetricsStore) -> None:
    assert await store.latest() == []
    assert await store.latest(network="prod", host="vm1") == []
    assert await store.series("vm1", "load1", None, T0, T0 + 3600, 10) == []
    assert await store.series("vm1", "load1", {"a": "b"}, T0, T0 + 3600, 1, "last") == []
    assert await store.hosts("prod") == {}
    assert (await store.aggregate("prod", "load1", 0))["hosts"] == 0
    await store.prune(time.time())
    await store.compact(time.time())


@pytest.mark.parametrize(
    ("start", "end", "step", "agg", "message"),
    [
        (T0, T0 + 60, 10, "p99", "unknown agg 'p99': must be one of avg, min, max, last"),
        (T0 + 60, T0, 10, "avg", r"start \(.*\) is after end"),
        (T0, T0 + 60, 0, "avg", "step must be positive"),
        (T0, T0 + 60, -10, "avg", "step must be positive"),
        (math.nan, T0, 10, "avg", "start must be a finite number"),
        (T0, math.inf, 10, "avg", "end must be a finite number"),
    ],
)
async def test_bad_queries_raise_value_errors(
    store: MetricsStore, start: float, end: float, step: float, agg: str, message: str
) -> None:
    await put(store, [sample("vm1", "load1", T0, 1.0)])
    with pytest.raises(ValueError, match=message):
        await store.series("vm1", "load1", None, start, end, step, agg)


async def test_concurrent_writes_and_reads(store: MetricsStore) -> None:
    hosts = [f"vm{i}" for i in range(20)]

    async def writer(k: int) -> None:
        await store.write([sample(h, "load1", T0 + k, float(k)) for h in hosts])

    async def reader() -> None:
        await store.latest(network="prod")
        await store.series("vm1", "load1", None, T0, T0 + 60, 10)

    await asyncio.gather(*(writer(k) for k in range(30)), *(reader() for _ in range(10)))
    await store.flush()
    got = await store.series("vm3", "load1", None, T0, T0 + 29, 10, "avg")
    assert got == [(T0, 4.5), (T0 + 10, 14.5), (T0 + 20, 24.5)]
    assert len(await store.hosts("prod")) == 20


# ---- both backends agree on random data --------------------------------------------------


async def test_sqlite_and_victoria_agree(tmp_path: Path, victoria: Victoria) -> None:
    rng = random.Random(7)
    data = []
    kinds: list[tuple[str, tuple[tuple[str, str], ...]]] = [
        ("load1", ()),
        ("net_rx_bytes", (("iface", "eth0"),)),
    ]
    for name, labels in kinds:
        ts = T0
        while ts < T0 + 300:
            ts += rng.choice([0.5, 1.0, 1.7, 2.0, 2.0, 4.3])
            ts = round(ts, 3)  # VictoriaMetrics keeps milliseconds
            data.append(Sample("prod", "vm1", name, labels, ts, round(rng.uniform(0, 100), 2)))
    lite = SqliteStore(tmp_path / "m.db")
    vm = VictoriaStore(victoria.url, lookback=3600)
    try:
        for s in (lite, vm):
            await put(s, data)
        for agg in ("avg", "min", "max", "last"):
            for step in (1, 5, 10, 30, 60):
                for name, wanted in (("load1", None), ("net_rx_bytes", {"iface": "eth0"})):
                    a = await lite.series("vm1", name, wanted, T0, T0 + 300, step, agg)
                    b = await vm.series("vm1", name, wanted, T0, T0 + 300, step, agg)
                    assert [t for t, _ in a] == [t for t, _ in b], (agg, step, name)
                    assert values(a) == pytest.approx(values(b)), (agg, step, name)
        assert sorted(await lite.latest(), key=repr) == sorted(await vm.latest(), key=repr)
        assert await lite.aggregate("prod", "load1", T0) == await vm.aggregate("prod", "load1", T0)
    finally:
        await lite.close()
        await vm.close()


# ---- SQLite specifics --------------------------------------------------------------------


async def test_sqlite_rollups_give_the_same_answers_as_raw(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "m.db")
    rng = random.Random(3)
    data, ts = [], T0
    while ts < T0 + 900:
        ts += rng.uniform(0.2, 7.0)  # uneven spacing: buckets hold different counts
        data.append(sample("vm1", "mem_percent", ts, rng.uniform(-50, 50)))
    try:
        # Written out of order, in several batches.
        rng.shuffle(data)
        for i in range(0, len(data), 37):
            await store.write(data[i : i + 37])
        for step in (10, 30, 60, 300):
            for agg in ("avg", "min", "max", "last"):
                rollup = await store.series(
                    "vm1", "mem_percent", None, T0, T0 + 900, step, agg, source="rollup"
                )
                raw = await store.series(
                    "vm1", "mem_percent", None, T0, T0 + 900, step, agg, source="raw"
                )
                assert [t for t, _ in rollup] == [t for t, _ in raw]
                assert values(rollup) == pytest.approx(values(raw), abs=1e-9), (step, agg)
                auto = await store.series("vm1", "mem_percent", None, T0, T0 + 900, step, agg)
                assert auto == rollup
        # Against a plain computation too.
        expect: dict[int, list[float]] = {}
        for s in data:
            expect.setdefault(math.floor(s.ts / 60) * 60, []).append(s.value)
        got = await store.series("vm1", "mem_percent", None, T0, T0 + 900, 60, "avg")
        assert values(got) == pytest.approx([sum(v) / len(v) for _, v in sorted(expect.items())])
        stats = await store.stats()
        assert stats["raw"] == len(data)
        assert stats["rollup"] == len({math.floor(s.ts / 10) for s in data})
    finally:
        await store.close()


async def test_sqlite_rollups_written_in_many_flushes_equal_one_write(tmp_path: Path) -> None:
    """Per-write aggregates merged into existing rollup rows (min/max/sum/count/last and
    latest) give exactly the rows of one write of everything, duplicates included."""
    rng = random.Random(5)
    data = [
        sample(f"vm{h}", "load1", T0 + rng.uniform(0, 95), rng.uniform(-9, 9), core=str(c))
        for h in range(3)
        for c in range(2)
        for _ in range(60)
    ]
    data = list({(s.host, s.labels, s.ts): s for s in data}.values())  # one value per time
    rng.shuffle(data)

    async def tables(store: SqliteStore) -> tuple[list[Any], list[Any]]:
        db = store._r
        rollup = db.execute(
            "SELECT h.host, s.labels, r.bucket, r.min, r.max, r.sum, r.count, r.last, r.last_ts"
            " FROM rollup r JOIN series s ON s.id = r.sid JOIN hosts h ON h.id = r.hid"
            " ORDER BY 1, 2, 3"
        ).fetchall()
        latest = db.execute(
            "SELECT h.host, s.labels, l.ts, l.value FROM latest l JOIN series s ON s.id = l.sid"
            " JOIN hosts h ON h.id = s.hid ORDER BY 1, 2"
        ).fetchall()
        return rollup, latest

    once = SqliteStore(tmp_path / "once.db")
    many = SqliteStore(tmp_path / "many.db")
    try:
        await once.write(data)
        for i in range(0, len(data), 23):
            chunk = data[i : i + 23]
            # Re-deliveries: part of an earlier flush again, and a sample twice in one.
            await many.write(chunk + data[max(0, i - 5) : i] + chunk[:1])
        got, expect = await tables(many), await tables(once)
        # Exact but the sums, which add up in another order.
        assert [r[:5] + r[6:] for r in got[0]] == [r[:5] + r[6:] for r in expect[0]]
        assert [r[5] for r in got[0]] == pytest.approx([r[5] for r in expect[0]])
        assert got[1] == expect[1]
        # And against a plain computation.
        buckets: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
        for s in data:
            key = (s.host, s.labels[0][1], math.floor(s.ts / 10) * 10)
            buckets.setdefault(key, []).append((s.ts, s.value))
        plain = [
            (h, c, b, min(v for _, v in p), max(v for _, v in p), len(p), max(p)[1], max(p)[0])
            for (h, c, b), p in sorted(buckets.items())
        ]
        assert [
            (h, json.loads(lb)["core"], b, mn, mx, n, last, lt)
            for h, lb, b, mn, mx, _, n, last, lt in got[0]
        ] == plain
        assert (await many.stats())["raw"] == len(data)
    finally:
        await once.close()
        await many.close()


async def test_sqlite_retention_prunes_raw_but_keeps_rollups(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = SqliteStore(path, raw_retention=600, rollup_retention=3600)
    old = [sample("vm1", "load1", T0 + i, float(i)) for i in range(20)]
    new = [sample("vm1", "load1", T0 + 1500 + i, float(i)) for i in range(20)]
    gone = [sample("vm2", "load1", T0 - 3000, 5.0)]  # past even the rollup retention
    try:
        await store.write(old + new + gone)
        assert (await store.stats())["raw"] == 41
        await store.prune(now=T0 + 1600)  # raw cut: T0 + 1000, rollup cut: T0 - 2000
        stats = await store.stats()
        assert stats["raw"] == 20  # only the new raw samples remain
        assert stats["rollup"] == 4  # old: 2 buckets, new: 2 buckets; vm2's is gone
        assert stats["hosts"] == 1 and stats["series"] == 1  # vm2 is forgotten entirely
        assert await store.hosts("prod") == {"vm1": T0 + 1519}
        # The old range still answers from the rollups, at any step (10-s resolution).
        assert await store.series("vm1", "load1", None, T0, T0 + 19, 10) == [
            (T0, 4.5),
            (T0 + 10, 14.5),
        ]
        assert await store.series("vm1", "load1", None, T0, T0 + 19, 20, "max") == [(T0, 19.0)]
        assert await store.series("vm1", "load1", None, T0, T0 + 19, 1, "last") == [
            (T0, 9.0),
            (T0 + 10, 19.0),
        ]
        assert await store.series("vm1", "load1", None, T0, T0 + 19, 1, source="raw") == []
        # The new range still has raw samples.
        got = await store.series("vm1", "load1", None, T0 + 1500, T0 + 1519, 5, "avg")
        assert values(got) == [2.0, 7.0, 12.0, 17.0]
        await store.compact(now=T0 + 1600 + 3600)  # now everything is too old
        assert await store.stats() == dict.fromkeys(
            ("hosts", "series", "raw", "rollup", "latest"), 0
        )
    finally:
        await store.close()


async def test_sqlite_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = SqliteStore(path, raw_retention=600, rollup_retention=86400)
    await store.write([sample("vm1", "load1", T0 + i, float(i), q="1") for i in range(10)])
    await store.prune(now=T0 + 700)  # raw is gone: from now on rollups answer
    await store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await store.latest()

    store = SqliteStore(path, raw_retention=600, rollup_retention=86400)
    try:
        assert store.raw_horizon == T0 + 100
        assert [s.value for s in await store.latest()] == [9.0]
        # Same series, same ids after the restart: more samples fold into the same rollup.
        await store.write([sample("vm1", "load1", T0 + 10 + i, 100.0, q="1") for i in range(10)])
        stats = await store.stats()
        assert (stats["series"], stats["rollup"]) == (1, 2)
        assert values(await store.series("vm1", "load1", None, T0, T0 + 19, 20)) == [52.25]
    finally:
        await store.close()


async def test_sqlite_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "m.db")
    try:
        # Labels as a list cannot be hashed: the write fails after interning vm1's series.
        bad = Sample("prod", "vm2", "load1", [("a", "b")], T0, 0.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await store.write([sample("vm1", "cpu_percent", T0, 1.0), bad])
        assert await store.stats() == dict.fromkeys(
            ("hosts", "series", "raw", "rollup", "latest"), 0
        )
        await store.write([sample("vm1", "cpu_percent", T0, 1.0)])
        assert [s.value for s in await store.latest()] == [1.0]
    finally:
        await store.close()


async def test_sqlite_a_failed_column_write_leaves_no_cached_ids(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "m.db")
    try:
        await store.write([sample("vm1", "load5", T0, 1.0)])
        # A list as a label value cannot be hashed: the write fails after vm1's column
        # got its series ids, which the rollback takes back.
        bad = Batch("prod", "vm2", 0, T0, 2.0, column=(("load1",), ({"a": []},)), values=[1.0])  # type: ignore[dict-item]
        with pytest.raises(TypeError):
            await store.write_batches([_decoded("prod", "vm1", 0, T0, 2), bad])
        assert (await store.stats())["series"] == 1
        # Those ids now go to vm3's series; vm1's column must not reuse them.
        await store.write([sample("vm3", f"m{i}", T0, 3.0) for i in range(4)])
        await store.write_batches([_decoded("prod", "vm1", 1, T0 + 2, 2)])
        assert len(await store.latest(host="vm1")) == 5
        assert {s.value for s in await store.latest(host="vm3")} == {3.0}
    finally:
        await store.close()


def test_sqlite_rejects_bad_retention(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not exceed"):
        SqliteStore(tmp_path / "m.db", raw_retention=7200, rollup_retention=3600)
    with pytest.raises(ValueError, match="positive"):
        SqliteStore(tmp_path / "m.db", raw_retention=0)


# ---- VictoriaMetrics specifics ------------------------------------------------------------


async def test_victoria_unreachable_is_a_store_error() -> None:
    store = VictoriaStore(f"http://127.0.0.1:{free_port()}", timeout=2)
    try:
        with pytest.raises(StoreError, match="VictoriaMetrics at"):
            await store.write([sample("vm1", "load1", T0, 1.0)])
        with pytest.raises(StoreError):
            await store.latest()
    finally:
        await store.close()


async def test_victoria_hosts_that_went_quiet(victoria: Victoria) -> None:
    store = VictoriaStore(victoria.url, lookback=300, hosts_lookback=86400)
    try:
        now = time.time()
        await put(
            store,
            [
                sample("vm1", "load1", now - 10, 1.0),
                sample("vm.2", "load1", now - 1800, 1.0),  # quiet for 30 min
            ],
        )
        got = await store.hosts("prod")
        assert got == {
            "vm1": pytest.approx(now - 10, abs=0.002),
            "vm.2": pytest.approx(now - 1800, abs=0.002),
        }
        # latest() only looks back `lookback` seconds.
        assert [s.host for s in await store.latest()] == ["vm1"]
    finally:
        await store.close()


async def test_open_store(tmp_path: Path) -> None:
    stores = [open_store("sqlite", tmp_path), open_store(f"sqlite:{tmp_path / 'x.db'}", tmp_path)]
    try:
        assert all(isinstance(s, SqliteStore) for s in stores)
        assert (tmp_path / "metrics.db").exists() and (tmp_path / "x.db").exists()
        vm = open_store("victoria:http://127.0.0.1:8428", tmp_path)
        stores.append(vm)
        assert isinstance(vm, VictoriaStore) and vm.url == "http://127.0.0.1:8428"
        with pytest.raises(ValueError, match="unknown metrics store"):
            open_store("mongo:x", tmp_path)
    finally:
        for s in stores:
            await s.close()
