"""Token-bucket rate limiting by key (a client address), with a bounded key table."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

IPV6_BUCKET_PREFIX = 64  # one IPv6 customer usually holds a whole /64


def source_key(address: str) -> str:
    """The limiter key of a client address: IPv4 as is, IPv6 by its /64.

    Anyone with one IPv6 host can pick from 2**64 addresses of its /64; keyed per address,
    a guesser would get a fresh burst from each and flush everyone else out of the table.
    """
    if ":" not in address:  # IPv4 (or not an address): as is, without parsing it
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_BUCKET_PREFIX), strict=False))
    return address


class RateLimiter:
    """``rate`` events per second per key, bursts up to ``burst``.

    Time is passed in, so the limiter is pure and testable. The table keeps at most
    ``max_keys`` keys (least recently seen dropped first; about 230 bytes each): a
    flood of source addresses cannot grow memory without bound.
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_keys >= 1")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

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
