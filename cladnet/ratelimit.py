"""Token-bucket rate limiting by key (a client address), with a bounded key table."""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """``rate`` events per second per key, bursts up to ``burst``.

    Time is passed in, so the limiter is pure and testable. The table keeps at most
    ``max_keys`` keys (least recently seen dropped first): a flood of source
    addresses cannot grow memory without bound.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, now: float) -> float:
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def blocked_for(self, key: str, now: float) -> float:
        """Seconds until ``key`` may act again (0 if it may now); consumes nothing."""
        level = self._level(key, now)
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def hit(self, key: str, now: float) -> float:
        """Record one event; returns 0 if allowed, else the seconds to wait (not recorded)."""
        level = self._level(key, now)
        if level < 1:
            return (1 - level) / self.rate
        self._buckets[key] = (level - 1, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0
