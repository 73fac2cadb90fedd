"""Bounded cache of decoded task versions, with pinning and load statistics."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from core.lru import CapacityError, LRUCache
from core.task_state import TaskState
from task_store.format import Manifest

CacheKey = tuple[str, int]


@dataclass(frozen=True)
class StoredTask:
    """A decoded task version: the state the engine serves and the manifest it came with."""

    task: TaskState
    manifest: Manifest
    manifest_sha256: str

    @property
    def name(self) -> str:
        return self.manifest.task

    @property
    def version(self) -> int:
        return self.manifest.version


@dataclass
class TaskCacheStats:
    """Counts since the cache was built; ``load_seconds`` is per task, summed over loads."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_seconds_total: float = 0.0
    load_seconds: dict[str, float] = field(default_factory=dict)
    loads_by_task: dict[str, int] = field(default_factory=dict)


class TaskCache:
    """LRU of decoded versions keyed by (task, version); pinned versions stay.

    Args:
        capacity: decoded versions kept in memory (>= 1).
    """

    def __init__(self, capacity: int = 16) -> None:
        self._lru: LRUCache[CacheKey, StoredTask] = LRUCache(capacity)
        self._lock = threading.RLock()
        self._load_stats = TaskCacheStats()

    @property
    def capacity(self) -> int:
        return self._lru.capacity

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def keys(self) -> list[CacheKey]:
        """Keys from least to most recently used."""
        return self._lru.keys()

    def get(self, key: CacheKey, manifest_sha256: str) -> StoredTask | None:
        """The cached version if it is the one the index names now (same manifest hash)."""
        with self._lock:
            cached = self._lru.peek(key)
            if cached is not None and cached.manifest_sha256 != manifest_sha256:
                self._lru.pop(key)
            return self._lru.get(key)

    def put(self, key: CacheKey, value: StoredTask, load_seconds: float) -> None:
        with self._lock:
            try:
                self._lru.put(key, value)
            except CapacityError:
                pass  # every entry is pinned: serve this load uncached rather than fail it
            s = self._load_stats
            s.loads += 1
            s.load_seconds_total += load_seconds
            s.load_seconds[key[0]] = s.load_seconds.get(key[0], 0.0) + load_seconds
            s.loads_by_task[key[0]] = s.loads_by_task.get(key[0], 0) + 1

    def invalidate(self, name: str, version: int | None = None) -> None:
        with self._lock:
            for key in self._lru.keys():
                if key[0] == name and (version is None or key[1] == version):
                    self._lru.pop(key)

    def pin(self, key: CacheKey) -> None:
        with self._lock:
            self._lru.pin(key)

    def unpin(self, key: CacheKey) -> None:
        with self._lock:
            self._lru.unpin(key)

    def is_pinned(self, key: CacheKey) -> bool:
        return self._lru.is_pinned(key)

    def pinned(self, name: str) -> list[int]:
        """Pinned versions of a task."""
        return [v for n, v in self._lru.keys() if n == name and self._lru.is_pinned((n, v))]

    def stats(self) -> TaskCacheStats:
        """A snapshot of hit, miss, eviction and load-time counters."""
        with self._lock:
            s = self._load_stats
            return TaskCacheStats(
                hits=self._lru.stats.hits, misses=self._lru.stats.misses,
                evictions=self._lru.stats.evictions, loads=s.loads,
                load_seconds_total=s.load_seconds_total, load_seconds=dict(s.load_seconds),
                loads_by_task=dict(s.loads_by_task),
            )
