"""A small LRU cache whose entries also expire: bounded memory whatever the keys."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most ``max_entries`` values, each for ``ttl`` seconds; least recently used go first.

    Time is passed in, so the cache is pure and testable.
    """

    def __init__(self, max_entries: int, ttl: float) -> None:
        if max_entries < 1 or ttl <= 0:
            raise ValueError("max_entries must be >= 1 and ttl > 0")
        self.max_entries, self.ttl = max_entries, ttl
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> V | None:
        """The value if present and fresh (it becomes the most recently used), else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, now: float) -> None:
        """Store ``value`` until ``now + ttl``, evicting the least recently used when full."""
        self._entries[key] = (value, now + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> None:
        """Forget ``key`` (absent keys are fine)."""
        self._entries.pop(key, None)
