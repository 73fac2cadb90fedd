from __future__ import annotations

import pytest

from core.lru import CapacityError, LRUCache


def test_lru_evicts_least_recent_unpinned_and_reports():
    evicted: list[str] = []
    cache: LRUCache[str, int] = LRUCache(2, on_evict=lambda k, _v: evicted.append(k))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now most recent
    cache.put("c", 3)
    assert evicted == ["b"] and cache.keys() == ["a", "c"]
    cache.pin("a")
    cache.put("d", 4)
    assert evicted == ["b", "c"] and cache.keys() == ["a", "d"]
    cache.pin("d")
    with pytest.raises(CapacityError, match="pinned"):
        cache.put("e", 5)
    assert cache.peek("a") == 1
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 0, 2)
    assert cache.get("zzz") is None and cache.stats.misses == 1
