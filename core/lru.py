"""A bounded LRU map with pinning, eviction hook and statistics.

One implementation serves every cache of task state (prepared effective
weights here, decoded task files in the store). Pinned entries are never
evicted; inserting into a cache whose entries are all pinned raises instead of
silently exceeding the bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from core.errors import Xma2Error

K = TypeVar("K")
V = TypeVar("V")


class CapacityError(Xma2Error, RuntimeError):
    """Every cached entry is pinned and a new one does not fit."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class LRUCache(Generic[K, V]):
    """Least-recently-used map of at most ``capacity`` entries.

    Args:
        capacity: maximum number of entries (>= 1).
        on_evict: called with (key, value) after an entry leaves the cache.
    """

    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.on_evict = on_evict
        self._data: OrderedDict[K, V] = OrderedDict()
        self._pinned: set[K] = set()
        self.stats = CacheStats()

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[K]:
        """Keys from least to most recently used."""
        return list(self._data)

    def get(self, key: K) -> V | None:
        if key not in self._data:  # membership, not the value: a stored None is an entry
            self.stats.misses += 1
            return None
        self._data.move_to_end(key)
        self.stats.hits += 1
        return self._data[key]

    def peek(self, key: K) -> V | None:
        """The entry without touching recency or statistics."""
        return self._data.get(key)

    def put(self, key: K, value: V) -> None:
        """Insert (or refresh) an entry, evicting unpinned LRU entries to make room."""
        if key in self._data:
            self._data[key] = value
            self._data.move_to_end(key)
            return
        while len(self._data) >= self.capacity:
            victim = next((k for k in self._data if k not in self._pinned), None)
            if victim is None:
                raise CapacityError(
                    f"all {self.capacity} cached entries are pinned; unpin one or raise capacity"
                )
            self.pop(victim)
            self.stats.evictions += 1
        self._data[key] = value

    def pop(self, key: K) -> V | None:
        """Remove an entry (pinned or not), calling ``on_evict``; None when absent."""
        self._pinned.discard(key)
        if key not in self._data:
            return None
        value = self._data.pop(key)
        if self.on_evict is not None:
            self.on_evict(key, value)
        return value

    def pin(self, key: K) -> None:
        if key not in self._data:
            raise KeyError(key)
        self._pinned.add(key)

    def unpin(self, key: K) -> None:
        self._pinned.discard(key)

    def is_pinned(self, key: K) -> bool:
        return key in self._pinned
