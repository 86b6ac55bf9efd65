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
        batch.add("cpu_usage_ratio", psutil.cpu_percent() / 100)
        for cpu, pct in enumerate(psutil.cpu_percent(percpu=True)):
            batch.add("cpu_usage_ratio", pct / 100, cpu=str(cpu))
        vm = psutil.virtual_memory()
        batch.add("memory_total_bytes", vm.total)
        batch.add("memory_used_bytes", vm.total - vm.available)
        batch.add("memory_usage_ratio", vm.percent / 100)
        sw = psutil.swap_memory()
        batch.add("swap_used_bytes", sw.used)
        batch.add("swap_usage_ratio", sw.percent / 100)
        self._disks(batch)
        self._nics(batch)
        load1, load5, load15 = os.getloadavg()
        batch.add("load1", load1)
        batch.add("load5", load5)
        batch.add("load15", load15)
        batch.add("processes", len(psutil.pids()))
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
            batch.add("filesystem_size_bytes", usage.total, mountpoint=part.mountpoint)
            batch.add("filesystem_used_bytes", usage.used, mountpoint=part.mountpoint)
            batch.add("filesystem_usage_ratio", usage.percent / 100, mountpoint=part.mountpoint)
        io = psutil.disk_io_counters(perdisk=True) or {}
        for disk, c in list(io.items())[: self.max_mounts]:
            batch.add("disk_read_bytes_total", c.read_bytes, device=disk)
            batch.add("disk_written_bytes_total", c.write_bytes, device=disk)

    def _nics(self, batch: Batch) -> None:
        counters = psutil.net_io_counters(pernic=True) or {}
        for nic, c in list(counters.items())[: self.max_nics]:
            if nic == "lo":
                continue
            batch.add("network_receive_bytes_total", c.bytes_recv, interface=nic)
            batch.add("network_transmit_bytes_total", c.bytes_sent, interface=nic)
            batch.add("network_receive_drop_total", c.dropin, interface=nic)
