"""One network's metrics loop: collect every interval, spool, publish, probe."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.metrics.exposition import MetricsServer
from agent.metrics.host import HostCollector
from agent.metrics.overlay import LatencyProber, peer_samples
from agent.metrics.publisher import Broker, Publisher
from agent.metrics.spool import Spool, SpoolLimits
from cladnet import metrics
from cladnet.mesh import DeviceState
from cladnet.tasks import cancel_and_wait

log = logging.getLogger("cladnet.agent")


class MetricsReporter:
    """Host + overlay metrics of one network membership.

    ``device`` reads the WireGuard device; ``peers`` returns the current peers
    (id → peer dict); ``gauges`` (optional) adds the agent's own state (name → value)
    to every batch. Per-peer health (handshake age, transfer, latency) is part of
    every batch: the collector serves it, etcd never sees it.
    """

    def __init__(
        self,
        *,
        network: str,
        host: str,
        host_id: str,
        overlay_ip: str,
        spool_dir: Path,
        interval: float,
        device: Callable[[], Awaitable[DeviceState]],
        peers: Callable[[], dict[str, dict[str, Any]]],
        broker: Broker | None = None,
        server: MetricsServer | None = None,
        ack_topic: str | None = None,
        resend_after: float = 30.0,
        probe_interval: float = 10.0,
        spool_limits: SpoolLimits | None = None,
        gauges: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.network, self.host, self.host_id = network, host, host_id
        self.interval = max(1.0, interval)
        self.device, self.peers = device, peers
        self.server, self.probe_interval = server, probe_interval
        self.spool = Spool(spool_dir, spool_limits)
        self.host_metrics = HostCollector()
        self.prober = LatencyProber(overlay_ip)
        self.rtt: dict[str, float | None] = {}
        self.publisher = (
            Publisher(
                broker,
                f"cladnet-{host_id}",
                metrics.topic(network, host),
                self.spool,
                # The agent knows its ack topic: a controller that does not name it (an
                # open broker, or an older one) still gets end-to-end acknowledgement.
                ack_topic=ack_topic or metrics.ack_topic(network, host),
                resend_after=resend_after,
            )
            if broker is not None
            else None
        )
        self.errors = 0
        self.gauges = gauges

    def build(self, now: float) -> metrics.Batch:
        """A batch of everything but the device (pure apart from psutil)."""
        batch = metrics.Batch(
            network=self.network,
            host=self.host,
            host_id=self.host_id,
            seq=self.spool.next_seq(),
            ts=now,
            interval=self.interval,
        )
        self.host_metrics.collect(batch)
        for name, rtt in self.rtt.items():
            if rtt is not None:
                batch.add("wireguard_peer_latency_seconds", rtt / 1000, peer=name)
        batch.add("agent_spool_batches", len(self.spool))
        batch.add("agent_spool_bytes", self.spool.size_bytes)
        batch.add("agent_spool_dropped_batches_total", self.spool.dropped)
        if self.publisher is not None:
            # 1: a batch leaves the spool when a collector stored it; 0: on the broker's PUBACK.
            batch.add("agent_metrics_collector_ack", int(self.publisher.end_to_end))
        batch.add("agent_metric_errors_total", self.errors)
        for name, value in (self.gauges() if self.gauges else {}).items():
            batch.add(name, value)
        return batch

    async def _probe_loop(self) -> None:
        while True:
            try:
                if not self.prober.started:
                    await self.prober.start()
                targets = {
                    str(p.get("name", pid)): str(p["overlay_ip"]) for pid, p in self.peers().items()
                }
                self.rtt = await self.prober.probe(targets)
            except OSError as exc:  # the overlay address is not up yet
                log.debug("latency probe not ready", extra={"error": repr(exc)})
            await asyncio.sleep(self.probe_interval)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._probe_loop(), name="latency-probe")]
        if self.publisher is not None:
            tasks.append(asyncio.create_task(self.publisher.run(), name="mqtt-publisher"))
        try:
            while True:
                started = time.monotonic()
                now = time.time()
                try:
                    batch = self.build(now)
                    device = await self.device()
                    peer_samples(batch, device, self.peers(), now)
                    batch.sent = time.time()
                    if self.publisher is not None:
                        self.spool.append(batch.seq, batch.encode())
                        self.publisher.wake.set()
                    if self.server is not None:
                        self.server.latest[self.network] = batch
                except Exception as exc:  # one bad pass must not stop the metrics
                    self.errors += 1
                    log.warning("metrics pass failed", extra={"error": repr(exc)})
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            await cancel_and_wait(tasks)
            self.prober.close()
