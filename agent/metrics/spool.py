"""A bounded on-disk queue of metric batches, so a broker outage or an agent restart
loses nothing until the limits say so (then the oldest go first, and are counted)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cladnet.agent")


@dataclass
class SpoolLimits:
    max_batches: int = 43_200  # a day at the default 2 s interval
    max_bytes: int = 64 * 1024 * 1024
    max_age: float = 24 * 3600.0


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
        self.dropped = 0
        self._seq_file = self.dir / "seq"
        last = int(self._files[-1].stem) if self._files else -1
        saved = int(self._seq_file.read_text()) if self._seq_file.exists() else -1
        self._next_seq = max(last, saved) + 1

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

    def done(self, path: Path) -> None:
        """The broker acknowledged this batch: forget it."""
        if path in self._files:
            self._files.remove(path)
            self._remove(path)

    def _enforce(self, now: float) -> None:
        lim = self.limits
        while self._files and (
            len(self._files) > lim.max_batches
            or self._bytes > lim.max_bytes
            or now - self._files[0].stat().st_mtime > lim.max_age
        ):
            self._remove(self._files.pop(0))
            self.dropped += 1
            log.warning(
                "metrics spool full, dropped the oldest batch", extra={"dropped": self.dropped}
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
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
