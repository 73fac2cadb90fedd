"""The server takes what it loaded at start-up out of the garbage collector's sight.

A full collection walks every tracked object; with the backbone, the tasks and the
libraries loaded that took about 200 ms in a serving process, during which no request
moved (docs/performance.md). Frozen objects are skipped."""

from __future__ import annotations

import gc
import weakref

from server.runtime import freeze_loaded_objects
from tests.server.live import LiveServer


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_freezing_collects_the_garbage_first_and_freezes_what_lives() -> None:
    cycle_a, cycle_b = _Node(), _Node()
    cycle_a.other, cycle_b.other = cycle_b, cycle_a  # garbage only a collection frees
    collected = weakref.ref(cycle_a)
    del cycle_a, cycle_b
    kept = [_Node()]
    try:
        frozen = freeze_loaded_objects()
        assert collected() is None  # collected, not frozen along
        assert frozen == gc.get_freeze_count() > 0
        assert kept[0] is not None
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_the_served_process_freezes_its_start_up_objects(server: LiveServer) -> None:
    log = server.log_path.read_text(errors="replace")
    line = next(line for line in log.splitlines() if "loaded at start-up frozen" in line)
    count = int(line.split("heap: ", 1)[1].split(" ", 1)[0])
    assert count > 10_000, line  # the model, the tasks and the libraries' objects
