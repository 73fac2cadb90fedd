"""Properties of the LRU map, checked against a plain reference model over random
sequences of puts, gets, pins and pops."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core.lru import CapacityError, LRUCache

KEYS = st.integers(0, 7)
VALUES = st.none() | st.integers(-3, 3)  # None too: a stored None is still an entry


class LRUMachine(RuleBasedStateMachine):
    """The cache next to a model: an ordered list (least recent first) and a pinned set."""

    def __init__(self) -> None:
        super().__init__()
        self.evicted: list[tuple[int, int | None]] = []
        self.cache: LRUCache[int, int | None] = LRUCache(1)
        self.order: list[int] = []
        self.values: dict[int, int | None] = {}
        self.pinned: set[int] = set()
        self.expected_evicted: list[tuple[int, int | None]] = []
        self.hits = self.misses = self.evictions = 0

    @initialize(capacity=st.integers(1, 5))
    def make(self, capacity: int) -> None:
        self.cache = LRUCache(capacity, on_evict=lambda k, v: self.evicted.append((k, v)))

    def _touch(self, key: int) -> None:
        self.order.remove(key)
        self.order.append(key)

    def _drop(self, key: int) -> None:
        self.order.remove(key)
        self.pinned.discard(key)
        self.expected_evicted.append((key, self.values.pop(key)))

    @rule(key=KEYS, value=VALUES)
    def put(self, key: int, value: int | None) -> None:
        if key in self.values:
            self.values[key] = value
            self._touch(key)
            self.cache.put(key, value)
            return
        unpinned = [k for k in self.order if k not in self.pinned]
        if len(self.order) >= self.cache.capacity and not unpinned:
            before = self.cache.keys()
            try:
                self.cache.put(key, value)
            except CapacityError:
                assert self.cache.keys() == before and key not in self.cache
                return
            raise AssertionError("an insert into a cache of pinned entries must be refused")
        if len(self.order) >= self.cache.capacity:
            self._drop(unpinned[0])  # the least recently used entry that is not pinned
            self.evictions += 1
        self.order.append(key)
        self.values[key] = value
        self.cache.put(key, value)

    @rule(key=KEYS)
    def get(self, key: int) -> None:
        got = self.cache.get(key)
        if key in self.values:
            assert got == self.values[key]
            self._touch(key)
            self.hits += 1
        else:
            assert got is None
            self.misses += 1

    @rule(key=KEYS)
    def peek(self, key: int) -> None:
        assert self.cache.peek(key) == self.values.get(key)

    @rule(key=KEYS)
    def pop(self, key: int) -> None:
        got = self.cache.pop(key)
        if key in self.values:
            assert got == self.values[key]
            self._drop(key)
        else:
            assert got is None

    @precondition(lambda self: bool(self.order))
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(self.order))
        self.cache.pin(key)
        self.pinned.add(key)

    @rule(key=KEYS)
    def unpin(self, key: int) -> None:
        self.cache.unpin(key)
        self.pinned.discard(key)

    @rule(key=KEYS)
    def pin_absent(self, key: int) -> None:
        if key not in self.values:
            try:
                self.cache.pin(key)
            except KeyError:
                return
            raise AssertionError("pinning an absent key must raise KeyError")

    @invariant()
    def matches_the_model(self) -> None:
        assert self.cache.keys() == self.order
        assert len(self.cache) == len(self.order) <= self.cache.capacity
        assert all(self.cache.is_pinned(k) == (k in self.pinned) for k in range(8))
        assert all((k in self.cache) == (k in self.values) for k in range(8))
        assert self.evicted == self.expected_evicted
        stats = self.cache.stats
        assert (stats.hits, stats.misses, stats.evictions) == (
            self.hits, self.misses, self.evictions)


LRUMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                        deadline=None)
TestLRU = LRUMachine.TestCase


def test_a_stored_none_is_an_entry() -> None:
    """Regression: a None value counted as a miss and left without its eviction hook."""
    evicted: list[tuple[str, None]] = []
    cache: LRUCache[str, None] = LRUCache(1, on_evict=lambda k, v: evicted.append((k, v)))
    cache.put("a", None)
    assert cache.get("a") is None and (cache.stats.hits, cache.stats.misses) == (1, 0)
    cache.put("b", None)
    assert evicted == [("a", None)] and cache.keys() == ["b"]
    cache.pop("b")
    assert evicted == [("a", None), ("b", None)]
