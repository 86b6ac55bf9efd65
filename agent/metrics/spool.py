"""A bounded on-disk queue of metric batches, so a broker outage or an agent restart
loses nothing until the limits say so (then the oldest go first, and are counted)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cladnet.files import write_atomic

log = logging.getLogger("cladnet.agent")

# Files next to the batches: the last sequence number taken, the batches dropped at the
# bound so far (both survive restarts), and how the publisher is acknowledged.
SEQ_FILE, DROPPED_FILE, DELIVERY_FILE = "seq", "dropped", "delivery.json"


@dataclass
class SpoolLimits:
    max_batches: int = 43_200  # a day at the default 2 s interval
    max_bytes: int = 64 * 1024 * 1024
    max_age: float = 24 * 3600.0


def spool_dir(state_root: Path, network_id: str) -> Path:
    """Where an agent keeps one network's metrics spool."""
    return state_root / "networks" / network_id / "spool"


def _read_int(path: Path, default: int) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return default


class Spool:
    """Batches as files named by sequence number; the sequence survives restarts."""

    def __init__(self, directory: Path, limits: SpoolLimits | None = None) -> None:
        self.dir = directory
        self.limits = limits or SpoolLimits()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.dir.glob("*.tmp"):  # a write cut by a crash
            stale.unlink(missing_ok=True)
        self._files = sorted(self.dir.glob("*.batch"))
        self._bytes = sum(p.stat().st_size for p in self._files)
        # A counter for the life of the state directory, like the sequence: an agent
        # restarted with a full spool still reports what the bound cost.
        self.dropped = _read_int(self.dir / DROPPED_FILE, 0)
        self._warned = -math.inf
        self._seq_file = self.dir / SEQ_FILE
        last = int(self._files[-1].stem) if self._files else -1
        self._next_seq = max(last, _read_int(self._seq_file, -1)) + 1
        self._enforce(time.time())  # limits may have shrunk, or batches aged, while down

    def __len__(self) -> int:
        return len(self._files)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def next_seq(self) -> int:
        """Take the next sequence number (persisted, so restarts continue the count)."""
        seq = self._next_seq
        self._next_seq += 1
        self._write(self._seq_file, str(self._next_seq - 1).encode())
        return seq

    def path_of(self, seq: int) -> Path:
        return self.dir / f"{seq:020d}.batch"

    def append(self, seq: int, payload: bytes) -> None:
        path = self.path_of(seq)
        self._write(path, payload)
        self._files.append(path)
        self._bytes += len(payload)
        self._enforce(time.time())

    def pending(self, limit: int) -> list[tuple[Path, bytes]]:
        """Up to ``limit`` of the oldest batches still to send (kept until ``done``)."""
        out = []
        for path in list(self._files[:limit]):
            try:
                out.append((path, path.read_bytes()))
            except FileNotFoundError:  # removed behind our back
                self._files.remove(path)
        return out

    def done(self, path: Path) -> bool:
        """The batch is delivered (stored by a collector, or accepted by the broker): forget
        it. False if it was gone already (acknowledged twice, or dropped at the bound)."""
        if path not in self._files:
            return False
        self._files.remove(path)
        self._remove(path)
        return True

    def save_delivery(self, state: dict[str, Any]) -> None:
        """Record how batches are acknowledged, for ``cladnet-agent status``."""
        self._write(self.dir / DELIVERY_FILE, json.dumps(state).encode())

    def _enforce(self, now: float) -> None:
        lim = self.limits
        dropped = self.dropped
        while self._files and (
            len(self._files) > lim.max_batches
            or self._bytes > lim.max_bytes
            or now - self._files[0].stat().st_mtime > lim.max_age
        ):
            self._remove(self._files.pop(0))
            self.dropped += 1
        if self.dropped > dropped:
            self._write(self.dir / DROPPED_FILE, str(self.dropped).encode())
            # Once a minute at most: a full spool drops one batch per interval.
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning(
                    "metrics spool full, dropping the oldest batches",
                    extra={"dropped": self.dropped, "limits": str(lim)},
                )

    def _remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
            self._bytes -= size
        except FileNotFoundError:
            pass

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        # Not fsynced: written every interval on every VM; a power loss costs the last
        # few batches at most, a restart (the common case) nothing.
        write_atomic(path, data, durable=False)


def spool_status(directory: Path, limits: SpoolLimits | None = None) -> dict[str, Any]:
    """What ``cladnet-agent status`` shows of a spool, read without changing it."""
    lim = limits or SpoolLimits()
    files = sorted(directory.glob("*.batch")) if directory.is_dir() else []
    sizes = []
    for path in files:
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:  # sent meanwhile by the running agent
            pass
    try:
        delivery = json.loads((directory / DELIVERY_FILE).read_text())
    except (FileNotFoundError, ValueError):
        delivery = {"acknowledgement": "unknown", "reason": "not connected to a broker yet"}
    return {
        "batches": len(sizes),
        "bytes": sum(sizes),
        "dropped": _read_int(directory / DROPPED_FILE, 0),
        "limits": {"batches": lim.max_batches, "bytes": lim.max_bytes, "age_s": lim.max_age},
        **delivery,
    }
