"""Per-host batch sequence tracking: drop duplicates, count gaps, notice restarts.

A batch is identified by (host, seq). QoS 1 may deliver a batch twice; an agent
whose state was wiped starts again at 0 (recognised because a known seq arrives
with a different timestamp).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum


class Verdict(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"


@dataclass
class HostSequence:
    """What one host has sent so far."""

    highest: int = -1
    gaps: int = 0
    duplicates: int = 0
    resets: int = 0
    # seq → batch timestamp for the recent window; tells a re-delivery from a reset.
    recent: OrderedDict[int, float] = field(default_factory=OrderedDict)
    missing: set[int] = field(default_factory=set)


class SequenceTracker:
    """De-duplicates batches by (host, seq) and counts gaps per host."""

    def __init__(self, window: int = 4096, max_missing: int = 4096) -> None:
        self.window, self.max_missing = window, max_missing
        self.hosts: dict[str, HostSequence] = {}

    def check(self, host: str, seq: int, ts: float) -> Verdict:
        """Record a batch; NEW if it must be stored, DUPLICATE if it was seen already."""
        h = self.hosts.setdefault(host, HostSequence())
        seen_ts = h.recent.get(seq)
        if seen_ts is not None:
            if seen_ts == ts:
                h.duplicates += 1
                return Verdict.DUPLICATE
            # Same number, other batch: the agent lost its state and counts from 0 again.
            h.resets += 1
            h.highest, h.recent, h.missing = -1, OrderedDict(), set()
        if seq > h.highest:
            if h.highest >= 0 and seq > h.highest + 1:
                skipped = seq - h.highest - 1
                h.gaps += skipped
                if len(h.missing) + skipped <= self.max_missing:
                    h.missing.update(range(h.highest + 1, seq))
            h.highest = seq
        elif seq in h.missing:  # a late batch fills a gap
            h.missing.discard(seq)
            h.gaps -= 1
        elif seq < h.highest - self.window:
            h.duplicates += 1  # too old to tell; storing it again could double-count
            return Verdict.DUPLICATE
        h.recent[seq] = ts
        while len(h.recent) > self.window:
            h.recent.popitem(last=False)
        return Verdict.NEW

    def stats(self) -> dict[str, dict[str, int]]:
        """Per host: highest seq, gaps (batches never received), duplicates, resets."""
        return {
            host: {
                "highest_seq": h.highest,
                "gaps": h.gaps,
                "duplicates": h.duplicates,
                "resets": h.resets,
            }
            for host, h in self.hosts.items()
        }
