"""The emulated chip's spare-PE pool: which tasks are resident and what switching costs.

Besides the backbone's PEs the chip has a fixed number of spare PEs and mask buffers
with a fixed number of entries per logical column. A task is *resident* when its
spare-PE weights are programmed into spare PEs (one spare PE per replaced backbone PE)
and its column codes sit in one mask-buffer entry. Serving a resident task costs no
programming; making a task resident writes cells, and the energy is the level change
of every written cell (:func:`core.chip.programming.programming_cost`) from whatever the
spare PE held before. Every programming event is recorded with the task that caused it.

Cells of a spare PE that the task does not use (rows of a short row group, columns of
an edge PE) keep their old level: they are not written.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import torch
from torch import Tensor

from core.chip.mapping import ModelMapping, PEId
from core.chip.programming import (
    CellWriteCounter,
    ProgrammingConfig,
    ProgrammingReport,
    programming_cost,
    weight_codes_to_cell_levels,
)
from core.errors import ConfigError, TaskNotFound
from core.lru import CapacityError
from core.task_state import TaskState, column_code_bits

__all__ = [
    "EnergyAwareEviction",
    "EventKind",
    "EvictionPolicy",
    "LRUEviction",
    "PoolConfig",
    "ProgrammingEvent",
    "Residency",
    "SlotInfo",
    "SparePEPool",
    "TaskPoolStats",
    "default_spare_pes",
    "task_pe_levels",
]


LAYOUT_CACHE_SIZE = 32
"""Tasks whose spare-PE levels the pool keeps (about 0.5 MB each at P = 10%)."""


def default_spare_pes(mapping: ModelMapping, *, tasks: int = 2, pe_fraction: float = 0.1) -> int:
    """Spare PEs for ``tasks`` tasks that each replace ``pe_fraction`` of the crossbar PEs."""
    return tasks * math.ceil(pe_fraction * mapping.num_pes)


@dataclass(frozen=True)
class PoolConfig:
    """Spare-PE and mask-buffer capacity of the chip."""

    spare_pes: int | None = None
    """Spare PEs; None: :func:`default_spare_pes` (two tasks at P = 10%: 206 for MobileNetV2)."""
    mask_entries: int = 4
    """Mask-buffer entries per logical column: at most this many tasks' column masks are held
    at once (4 entries of 3 bits over MobileNetV2's 35,088 logical columns is 51 KiB)."""
    initial_level: int = 0
    """Level of every cell of a spare PE that was never written (the off state)."""
    mask_write_energy_j_per_bit: float = 0.05e-12
    """Energy to write one mask-buffer bit: the per-bit buffer energy of docs/energy.md."""
    event_history: int = 10_000
    """Programming events kept in :attr:`SparePEPool.events` (totals are kept for all)."""

    def __post_init__(self) -> None:
        if self.spare_pes is not None and self.spare_pes < 0:
            raise ConfigError(f"spare_pes must be >= 0, got {self.spare_pes}")
        if self.mask_entries < 1:
            raise ConfigError(f"mask_entries must be >= 1, got {self.mask_entries}")
        if self.initial_level < 0:
            raise ConfigError(f"initial_level must be >= 0, got {self.initial_level}")
        if not (math.isfinite(self.mask_write_energy_j_per_bit)
                and self.mask_write_energy_j_per_bit >= 0):
            raise ConfigError("mask_write_energy_j_per_bit must be finite and >= 0")
        if self.event_history < 1:
            raise ConfigError(f"event_history must be >= 1, got {self.event_history}")


class EventKind(StrEnum):
    PROGRAM = "program"
    """A task was made resident: spare PEs written, column masks loaded."""
    EVICT = "evict"
    """A task stopped being resident; its spare PEs keep their cells until overwritten."""


@dataclass(frozen=True)
class ProgrammingEvent:
    """One change of residency, charged to the task that caused it."""

    seq: int
    kind: EventKind
    task_id: str
    slots: tuple[int, ...] = ()
    report: ProgrammingReport = field(default_factory=ProgrammingReport)
    mask_bits_written: int = 0
    mask_energy_j: float = 0.0
    evicted: tuple[str, ...] = ()
    """Tasks this event displaced to make room."""

    @property
    def energy_j(self) -> float:
        return self.report.energy_j + self.mask_energy_j


@dataclass(frozen=True)
class TaskPoolStats:
    """Residency history of one task. Replaced whole on every change, so a reader on
    another thread (the metrics scrape) never sees a load without its energy."""

    loads: int = 0
    hits: int = 0
    evictions: int = 0
    programming: ProgrammingReport = field(default_factory=ProgrammingReport)
    mask_energy_j: float = 0.0

    @property
    def energy_j(self) -> float:
        return self.programming.energy_j + self.mask_energy_j


@dataclass(frozen=True)
class Residency:
    """What :meth:`SparePEPool.ensure_resident` did for one request."""

    task_id: str
    programmed: bool
    slots: tuple[int, ...]
    mask_entry: int
    event: ProgrammingEvent | None = None

    @property
    def evicted(self) -> tuple[str, ...]:
        return self.event.evicted if self.event is not None else ()


@dataclass(frozen=True)
class SlotInfo:
    """One spare PE: the resident task using it, and whose weights its cells hold."""

    slot: int
    owner: str | None
    holds: PEId | None
    holds_task: str | None


# -- eviction policies -------------------------------------------------------------------


class EvictionPolicy(Protocol):
    """Chooses which resident task leaves when a new one does not fit."""

    name: str

    def on_load(self, task_id: str, reload_energy_j: float) -> None: ...
    def on_access(self, task_id: str) -> None: ...
    def on_evict(self, task_id: str) -> None: ...
    def choose_victim(self, candidates: Sequence[str]) -> str: ...


class LRUEviction:
    """Evict the least recently used resident task."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def on_load(self, task_id: str, reload_energy_j: float) -> None:
        self._order[task_id] = None
        self._order.move_to_end(task_id)

    def on_access(self, task_id: str) -> None:
        self._order.move_to_end(task_id)

    def on_evict(self, task_id: str) -> None:
        self._order.pop(task_id, None)

    def choose_victim(self, candidates: Sequence[str]) -> str:
        allowed = set(candidates)
        return next(t for t in self._order if t in allowed)


class EnergyAwareEviction:
    """Prefer evicting tasks whose reload is cheap (GreedyDual, Young 1994).

    Each resident task holds a credit ``L + reload_energy`` set when it is loaded or
    used; the victim is the lowest credit (ties: least recently used) and ``L`` rises
    to the victim's credit, so an expensive task that stops being used still ages out.
    Tasks without spare PEs (column masks only) cost nothing to reload and go first.
    """

    name = "energy"

    def __init__(self) -> None:
        self._inflation = 0.0
        self._cost: dict[str, float] = {}
        self._credit: dict[str, float] = {}
        self._order: OrderedDict[str, None] = OrderedDict()

    def on_load(self, task_id: str, reload_energy_j: float) -> None:
        self._cost[task_id] = reload_energy_j
        self.on_access(task_id)

    def on_access(self, task_id: str) -> None:
        self._credit[task_id] = self._inflation + self._cost[task_id]
        self._order[task_id] = None
        self._order.move_to_end(task_id)

    def on_evict(self, task_id: str) -> None:
        for table in (self._cost, self._credit, self._order):
            table.pop(task_id, None)

    def choose_victim(self, candidates: Sequence[str]) -> str:
        recency = {t: i for i, t in enumerate(self._order)}
        victim = min(candidates, key=lambda t: (self._credit[t], recency[t]))
        self._inflation = self._credit[victim]
        return victim


# -- cell levels of a task ---------------------------------------------------------------


def task_pe_levels(task: TaskState, mapping: ModelMapping,
                   bits_per_cell: int) -> tuple[list[PEId], Tensor, Tensor]:
    """Cell levels a task's spare PEs must hold, in layer then ``pe_mask.nonzero()`` order.

    Returns the replaced PEs, their levels uint8 ``[n, rows, cols * arrays_per_pe]`` (row =
    unrolled weight row inside the row group, column = ``(output mod outputs_per_pe) *
    columns + column``, where a differential weight's columns are its positive then its
    negative slices: the two arrays of the pair side by side) and
    a bool mask of the cells the task uses.
    """
    rows, cols = mapping.config.rows, mapping.config.cols * mapping.config.arrays_per_pe
    pe_ids: list[PEId] = []
    all_levels, all_valid = [], []
    for layer in mapping.crossbar_layers:
        state = task.layers.get(layer.name)
        if state is None or state.replaced_pes == 0:
            continue
        n = state.replaced_pes
        levels = weight_codes_to_cell_levels(state.spare_codes, weight_bits=layer.weight_bits,
                                             bits_per_cell=bits_per_cell,
                                             encoding=layer.weight_encoding)
        slices = levels.shape[-1]
        used_cols = layer.outputs_per_pe * slices
        grid = levels.permute(0, 2, 1, 3).reshape(n, layer.rows_per_group, used_cols)
        full = torch.zeros(n, rows, cols, dtype=torch.uint8)
        full[:, : layer.rows_per_group, :used_cols] = grid
        row_groups, col_groups = state.pe_mask.nonzero(as_tuple=True)
        row_limit = torch.tensor([layer.rows_in_group(int(r)) for r in row_groups])
        col_limit = torch.tensor([layer.outputs_in_col_group(int(c)) * slices
                                  for c in col_groups])
        valid = ((torch.arange(rows).view(1, -1, 1) < row_limit.view(-1, 1, 1))
                 & (torch.arange(cols).view(1, 1, -1) < col_limit.view(-1, 1, 1)))
        pe_ids += [PEId(layer.name, int(r), int(c)) for r, c in zip(row_groups, col_groups,
                                                                      strict=True)]
        all_levels.append(full)
        all_valid.append(valid)
    if not pe_ids:
        empty = torch.zeros(0, rows, cols)
        return [], empty.to(torch.uint8), empty.to(torch.bool)
    return pe_ids, torch.cat(all_levels), torch.cat(all_valid)


def _task_digest(task: TaskState) -> str:
    """Content identity of what residency loads (spare weights and column codes)."""
    digest = hashlib.sha256(str(task.shift_levels).encode())
    for name in sorted(task.layers):
        state = task.layers[name]
        digest.update(name.encode())
        for t in (state.pe_mask, state.spare_codes, state.column_codes):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class _Resident:
    task: TaskState
    digest: str
    slots: tuple[int, ...]
    mask_entry: int


# -- the pool ----------------------------------------------------------------------------


class SparePEPool:
    """Spare PEs and mask buffers of one chip, shared by every task on its backbone.

    Args:
        mapping: the backbone's PE mapping (crossbar geometry and layer precisions).
        config: spare-PE and mask-buffer capacity.
        programming: write physics; its ``bits_per_cell`` must match the crossbar's.
        policy: eviction policy (default :class:`LRUEviction`).
    """

    def __init__(
        self, mapping: ModelMapping, config: PoolConfig | None = None, *,
        programming: ProgrammingConfig | None = None, policy: EvictionPolicy | None = None,
    ) -> None:
        self.mapping = mapping
        self.config = config or PoolConfig()
        self.programming = programming or ProgrammingConfig(
            bits_per_cell=mapping.config.bits_per_cell)
        if self.programming.bits_per_cell != mapping.config.bits_per_cell:
            raise ConfigError(
                f"programming model has {self.programming.bits_per_cell}-bit cells, the "
                f"crossbar {mapping.config.bits_per_cell}-bit cells; make them equal")
        if self.config.initial_level >= self.programming.levels:
            raise ConfigError(f"initial_level must be below {self.programming.levels}")
        self.policy: EvictionPolicy = policy or LRUEviction()
        self.num_slots = (self.config.spare_pes if self.config.spare_pes is not None
                          else default_spare_pes(mapping))
        rows, cols = mapping.config.rows, mapping.config.cols * mapping.config.arrays_per_pe
        self._levels = torch.full((self.num_slots, rows, cols), self.config.initial_level,
                                  dtype=torch.uint8)
        self.write_counter = (CellWriteCounter(self.num_slots, rows, cols,
                                               endurance=self.programming.endurance)
                              if self.num_slots else None)
        self._owner: list[str | None] = [None] * self.num_slots
        self._holds: list[tuple[str, PEId] | None] = [None] * self.num_slots
        self._resident: dict[str, _Resident] = {}
        self._pinned: set[str] = set()
        self._mask_entries: list[str | None] = [None] * self.config.mask_entries
        self._logical_columns = sum(m.row_groups * m.out_channels
                                    for m in mapping.crossbar_layers)
        self.events: deque[ProgrammingEvent] = deque(maxlen=self.config.event_history)
        self.task_stats: dict[str, TaskPoolStats] = {}
        self._layouts: OrderedDict[str, tuple[list[PEId], Tensor, Tensor, ProgrammingReport]] = (
            OrderedDict())
        self._seq = 0

    # -- queries -----------------------------------------------------------------------

    def is_resident(self, task_id: str) -> bool:
        return task_id in self._resident

    def resident_tasks(self) -> list[str]:
        return list(self._resident)

    def slots_of(self, task_id: str) -> tuple[int, ...]:
        return self._resident[task_id].slots if task_id in self._resident else ()

    @property
    def free_slots(self) -> int:
        return self._owner.count(None)

    def slot_table(self) -> list[SlotInfo]:
        table = []
        for i in range(self.num_slots):
            holds_task, holds = self._holds[i] or (None, None)
            table.append(SlotInfo(i, self._owner[i], holds, holds_task))
        return table

    def mask_table(self) -> list[str | None]:
        """The task in each mask-buffer entry."""
        return list(self._mask_entries)

    def cell_levels(self, slot: int) -> Tensor:
        return self._levels[slot].clone()

    def energy_by_task(self) -> dict[str, float]:
        return {t: s.energy_j for t, s in self.task_stats.items()}

    @property
    def total_energy_j(self) -> float:
        return sum(s.energy_j for s in self.task_stats.values())

    def mask_bits(self, shift_levels: int) -> int:
        """Bits written to load one task's column masks (every logical column's entry)."""
        return self._logical_columns * column_code_bits(shift_levels)

    # -- residency ---------------------------------------------------------------------

    def pin(self, task_id: str) -> None:
        """Keep a resident task resident (e.g. while a batch that mixes tasks runs)."""
        if task_id not in self._resident:
            raise TaskNotFound(f"task {task_id!r} is not resident; make it resident first")
        self._pinned.add(task_id)

    def unpin(self, task_id: str) -> None:
        self._pinned.discard(task_id)

    def ensure_resident(self, task: TaskState) -> Residency:
        """Make ``task`` resident, evicting others as the policy says; free if it already is."""
        task_id = task.task_id
        current = self._resident.get(task_id)
        if current is not None and (current.task is task
                                    or current.digest == _task_digest(task)):
            current.task = task
            self.policy.on_access(task_id)
            self._update_stats(task_id, hits=1)
            return Residency(task_id, False, current.slots, current.mask_entry)
        digest = _task_digest(task)
        pe_ids, levels, valid, reload = self._layout(task, digest)
        if len(pe_ids) > self.num_slots:
            raise CapacityError(
                f"task {task_id} replaces {len(pe_ids)} PEs but the chip has "
                f"{self.num_slots} spare PEs; raise PoolConfig.spare_pes or replace fewer PEs")
        keep_pinned = task_id in self._pinned
        # A new version of a resident task loads before the old one leaves: beside it when
        # PEs and a mask entry are free, else in its place (others evicted as needed), and
        # only once that is known to fit, so a refusal leaves the old version resident.
        beside = current is not None and (self.free_slots >= len(pe_ids)
                                          and None in self._mask_entries)
        # Whether it fits is decided before anything is evicted: a refusal changes nothing.
        if not beside and not self._has_room(len(pe_ids), exclude=task_id, reusing=current):
            if current is not None:
                raise CapacityError(
                    f"task {task_id}: the new version needs {len(pe_ids)} spare PEs and a "
                    f"mask entry; even in place of the old version only "
                    f"{self._freeable_slots(task_id, current)} PEs can be freed (other tasks "
                    "are pinned); the old version stays resident")
            raise CapacityError(
                f"task {task_id} needs {len(pe_ids)} spare PEs and a mask entry, but evicting "
                f"every unpinned task frees only {self._freeable_slots(task_id)} PEs"
                f"{'' if self._freeable_entry(task_id) else ' and no mask entry'} (the others "
                "are pinned); unpin a task or enlarge the pool; nothing was evicted")
        if current is not None and not beside:
            self._release(task_id)
        evicted = self._make_room(len(pe_ids), exclude=task_id)
        slots = self._assign(task_id, pe_ids)
        entry = self._mask_entries.index(None)
        if beside:  # the new version has its PEs and entry: the old one leaves
            self._release(task_id)
        if keep_pinned:
            self._pinned.add(task_id)
        old = self._levels[list(slots)]
        new = torch.where(valid, levels, old)
        report = programming_cost(old, new, self.programming)
        if slots:
            assert self.write_counter is not None
            self.write_counter.record(list(slots), old, new)
            self._levels[list(slots)] = new
        for slot, pe in zip(slots, pe_ids, strict=True):
            self._owner[slot] = task_id
            self._holds[slot] = (task_id, pe)
        self._mask_entries[entry] = task_id
        self._resident[task_id] = _Resident(task, digest, slots, entry)
        bits = self.mask_bits(task.shift_levels)
        event = self._record(EventKind.PROGRAM, task_id, slots, report, bits, evicted)
        self._update_stats(task_id, loads=1, programming=report,
                           mask_energy_j=event.mask_energy_j)
        self.policy.on_load(task_id, reload.energy_j + event.mask_energy_j)
        return Residency(task_id, True, slots, entry, event)

    def _layout(self, task: TaskState, digest: str
                ) -> tuple[list[PEId], Tensor, Tensor, ProgrammingReport]:
        """A task's spare-PE levels and the cost of writing them into blank PEs, computed
        once per task content (switching back and forth must not redo it)."""
        cached = self._layouts.get(digest)
        if cached is not None:
            self._layouts.move_to_end(digest)
            return cached
        task.validate(self.mapping)
        pe_ids, levels, valid = task_pe_levels(task, self.mapping,
                                               self.programming.bits_per_cell)
        initial = torch.full_like(levels, self.config.initial_level)
        reload = programming_cost(initial, torch.where(valid, levels, initial), self.programming)
        self._layouts[digest] = (pe_ids, levels, valid, reload)
        while len(self._layouts) > LAYOUT_CACHE_SIZE:
            self._layouts.popitem(last=False)
        return pe_ids, levels, valid, reload

    def evict(self, task_id: str) -> ProgrammingEvent:
        """Stop holding a task (pinned or not); its cells stay until overwritten."""
        if task_id not in self._resident:
            raise TaskNotFound(f"task {task_id!r} is not resident")
        slots = self._resident[task_id].slots
        self._release(task_id)
        self.policy.on_evict(task_id)
        self._update_stats(task_id, evictions=1)
        return self._record(EventKind.EVICT, task_id, slots, ProgrammingReport(), 0, ())

    def _release(self, task_id: str) -> None:
        resident = self._resident.pop(task_id)
        for slot in resident.slots:
            self._owner[slot] = None
        self._mask_entries[resident.mask_entry] = None
        self._pinned.discard(task_id)

    def _movable(self, exclude: str, reusing: _Resident | None = None) -> list[_Resident]:
        """Residents that may leave to make room for ``exclude`` (``reusing``: its old version)."""
        movable = [r for t, r in self._resident.items()
                   if t not in self._pinned and t != exclude]
        return movable + ([reusing] if reusing is not None else [])

    def _freeable_slots(self, exclude: str, reusing: _Resident | None = None) -> int:
        return self.free_slots + sum(len(r.slots) for r in self._movable(exclude, reusing))

    def _freeable_entry(self, exclude: str, reusing: _Resident | None = None) -> bool:
        return None in self._mask_entries or bool(self._movable(exclude, reusing))

    def _has_room(self, slots_needed: int, *, exclude: str,
                  reusing: _Resident | None = None) -> bool:
        """Whether evicting unpinned tasks other than ``exclude`` (and giving up ``reusing``'s
        PEs and mask entry) frees ``slots_needed`` spare PEs and a mask entry."""
        return (self._freeable_slots(exclude, reusing) >= slots_needed
                and self._freeable_entry(exclude, reusing))

    def _make_room(self, slots_needed: int, *, exclude: str) -> tuple[str, ...]:
        evicted = []
        while self.free_slots < slots_needed or None not in self._mask_entries:
            candidates = [t for t in self._resident if t not in self._pinned and t != exclude]
            if not candidates:
                raise CapacityError(
                    f"task {exclude} needs {slots_needed} spare PEs and a mask entry, but "
                    f"only {self.free_slots} PEs are free and every resident task is pinned; "
                    "unpin a task or enlarge the pool")
            victim = self.policy.choose_victim(candidates)
            self.evict(victim)
            evicted.append(victim)
        return tuple(evicted)

    def _assign(self, task_id: str, pe_ids: list[PEId]) -> tuple[int, ...]:
        """Free slots for each PE: one still holding that PE of this task, else the lowest."""
        free = [i for i in range(self.num_slots) if self._owner[i] is None]
        still_held = {self._holds[i]: i for i in free if self._holds[i] is not None}
        chosen: list[int | None] = [still_held.get((task_id, pe)) for pe in pe_ids]
        taken = {i for i in chosen if i is not None}
        rest = iter(i for i in free if i not in taken)
        return tuple(i if i is not None else next(rest) for i in chosen)

    def _record(self, kind: EventKind, task_id: str, slots: tuple[int, ...],
                report: ProgrammingReport, mask_bits: int,
                evicted: tuple[str, ...]) -> ProgrammingEvent:
        self._seq += 1
        event = ProgrammingEvent(self._seq, kind, task_id, slots, report, mask_bits,
                                 mask_bits * self.config.mask_write_energy_j_per_bit, evicted)
        self.events.append(event)
        return event

    def _update_stats(self, task_id: str, *, loads: int = 0, hits: int = 0,
                      evictions: int = 0, programming: ProgrammingReport | None = None,
                      mask_energy_j: float = 0.0) -> None:
        """Add to a task's history in one assignment (see :class:`TaskPoolStats`)."""
        old = self.task_stats.get(task_id, TaskPoolStats())
        self.task_stats[task_id] = TaskPoolStats(
            loads=old.loads + loads, hits=old.hits + hits, evictions=old.evictions + evictions,
            programming=old.programming if programming is None else old.programming + programming,
            mask_energy_j=old.mask_energy_j + mask_energy_j)

    def forget(self, task_id: str) -> None:
        """A task was unregistered: evict it if resident (its history stays)."""
        if task_id in self._resident:
            self.evict(task_id)

    def __repr__(self) -> str:
        return (f"SparePEPool(spare_pes={self.num_slots}, mask_entries="
                f"{self.config.mask_entries}, policy={self.policy.name}, "
                f"resident={self.resident_tasks()})")
