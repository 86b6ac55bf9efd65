"""One capped exponential backoff for every retry loop (agent, collector, controller)."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Delays doubling from ``low`` up to ``high``, each scaled by a random factor in
    ``jitter`` so that a fleet cut off together does not come back in lockstep."""

    def __init__(self, low: float, high: float, jitter: tuple[float, float] = (0.8, 1.2)) -> None:
        self.low, self.high, self.jitter, self.current = low, high, jitter, low

    def reset(self) -> None:
        """Start again from ``low`` (after a success)."""
        self.current = self.low

    def next_delay(self) -> float:
        """The next delay to wait, doubling the one after it."""
        delay = self.current * random.uniform(*self.jitter)
        self.current = min(self.current * 2, self.high)
        return delay

    async def wait(self) -> None:
        """Sleep the next delay."""
        await asyncio.sleep(self.next_delay())
