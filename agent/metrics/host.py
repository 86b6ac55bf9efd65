"""Host figures from psutil: CPU, memory, swap, disks, disk and network I/O, load."""

from __future__ import annotations

import os
import time

import psutil

from cladnet.metrics import Batch

# Pseudo and container file systems say nothing about the VM's disks.
_SKIP_FSTYPES = {"tmpfs", "devtmpfs", "overlay", "squashfs", "proc", "sysfs", "nsfs", "ramfs"}


class HostCollector:
    """Adds one pass of host samples to a batch; keeps psutil's CPU baselines between passes."""

    def __init__(self, max_mounts: int = 32, max_nics: int = 64) -> None:
        self.max_mounts, self.max_nics = max_mounts, max_nics
        # The first cpu_percent call only sets the baseline; prime it now.
        psutil.cpu_percent(percpu=True)
        psutil.cpu_percent()

    def collect(self, batch: Batch) -> None:
        batch.add("cpu_percent", psutil.cpu_percent())
        for core, pct in enumerate(psutil.cpu_percent(percpu=True)):
            batch.add("cpu_percent", pct, core=str(core))
        vm = psutil.virtual_memory()
        batch.add("mem_total_bytes", vm.total)
        batch.add("mem_used_bytes", vm.total - vm.available)
        batch.add("mem_percent", vm.percent)
        sw = psutil.swap_memory()
        batch.add("swap_used_bytes", sw.used)
        batch.add("swap_percent", sw.percent)
        self._disks(batch)
        self._nics(batch)
        load1, load5, load15 = os.getloadavg()
        batch.add("load1", load1)
        batch.add("load5", load5)
        batch.add("load15", load15)
        batch.add("procs", len(psutil.pids()))
        batch.add("uptime_seconds", time.time() - psutil.boot_time())

    def _disks(self, batch: Batch) -> None:
        mounts = [p for p in psutil.disk_partitions(all=False) if p.fstype not in _SKIP_FSTYPES][
            : self.max_mounts
        ]
        for part in mounts:
            try:
                usage = psutil.disk_usage(part.mountpoint)
            except OSError:  # unmounted between the two calls, or no permission
                continue
            batch.add("disk_total_bytes", usage.total, mount=part.mountpoint)
            batch.add("disk_used_bytes", usage.used, mount=part.mountpoint)
            batch.add("disk_percent", usage.percent, mount=part.mountpoint)
        io = psutil.disk_io_counters(perdisk=True) or {}
        for disk, c in list(io.items())[: self.max_mounts]:
            batch.add("disk_read_bytes", c.read_bytes, disk=disk)
            batch.add("disk_write_bytes", c.write_bytes, disk=disk)

    def _nics(self, batch: Batch) -> None:
        counters = psutil.net_io_counters(pernic=True) or {}
        for nic, c in list(counters.items())[: self.max_nics]:
            if nic == "lo":
                continue
            batch.add("net_rx_bytes", c.bytes_recv, iface=nic)
            batch.add("net_tx_bytes", c.bytes_sent, iface=nic)
            batch.add("net_rx_dropped", c.dropin, iface=nic)
