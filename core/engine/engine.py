"""Runs the shared, frozen backbone for any registered task.

Each task's masks and spare PEs are folded once into effective weights
(:func:`core.ops.fold.fold_effective_weight`) and kept in a bounded LRU of
:class:`PreparedTask`, so a call for a cached task costs what the plain quantized
backbone costs: the task's weights, programs and BatchNorm terms reach the layers
by reference with the call (:mod:`core.nn.forward_context`), and the shared model
never holds a task.

Crossbar fidelity runs every crossbar layer through the crossbar-exact operator
(:mod:`core.ops.crossbar`) on the cells as programmed
(:class:`core.engine.programmer.ChipProgrammer`). The fidelity can be chosen per
call. The engine is owned by one worker; it is not thread-safe.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.chip.config import CrossbarSettings, Fidelity
from core.chip.energy import (
    EnergyConfig,
    EnergyReport,
    OpCounts,
    energy_of,
)
from core.chip.mapping import ModelMapping
from core.chip.pool import Residency, SparePEPool
from core.chip.programming import part_seed
from core.engine.costs import CostCounter
from core.engine.mixed import MixedBatchPlanner
from core.engine.prepared import PreparedTask, by_module, norm_terms
from core.engine.programmer import ChipProgrammer
from core.errors import ConfigError, TaskNotFound, TaskStateError
from core.lru import LRUCache
from core.nn.forward_context import ForwardContext, LayerCall, NormCall, forward_context
from core.nn.model import CrossbarModel
from core.nn.periphery import DigitalNorm
from core.ops.fold import fold_effective_weight
from core.ops.int8 import int8_products
from core.task_state import TaskState, shift_values


@dataclass(frozen=True)
class BatchResult:
    """What the chip did for one batch, returned rather than left on the engine."""

    logits: list[Tensor]
    """One row per sample, in the batch's order (tasks differ in classes)."""
    residencies: dict[str, Residency]
    """Per task that holds spare PEs, what making it resident did to the pool (with a
    pool; empty without one)."""
    load_seconds: float
    """Wall time spent folding, programming and swapping tasks in before computing."""
    prepared_now: frozenset[str]
    """Tasks folded for this batch (they were not in the prepared cache)."""


@dataclass
class EngineStats:
    switches: int = 0
    prepares: int = 0
    prepare_seconds: float = 0.0
    last_activate_seconds: float = 0.0
    """Wall time of the last :meth:`CrossbarEngine.activate` (folding, programming, swap)."""


class CrossbarEngine:
    """The emulated chip's compute path for many tasks on one backbone.

    Args:
        model: the calibrated, quantized backbone; the engine runs a copy of it, so the
            caller's model never holds a task's state.
        max_prepared_tasks: how many tasks keep folded weights in memory.
        energy: per-operation energy constants (defaults derive from the chip).
        fidelity: the default fidelity of :meth:`forward` and :meth:`features`.
        crossbar: how crossbar fidelity emulates the chip (ADC, DAC, non-idealities).
        pool: the chip's spare PEs and mask buffers; when given, every activation makes the
            task resident (programming its spare PEs, evicting others) and
            :attr:`last_residency` says what that cost.
    """

    def __init__(
        self, model: CrossbarModel, *, max_prepared_tasks: int = 8,
        energy: EnergyConfig | None = None, fidelity: Fidelity | str = Fidelity.IDEAL,
        crossbar: CrossbarSettings | None = None, pool: SparePEPool | None = None,
    ) -> None:
        if model.mapping is None:
            raise ConfigError("the backbone has no crossbar mapping: calibrate or load it first")
        # The engine's own copy, in inference mode: a trainer may go on changing the
        # caller's model. Tasks never change it: their weights, cells and BatchNorm terms
        # reach the layers with each call (core.nn.forward_context).
        self.model = copy.deepcopy(model).eval()
        self.mapping: ModelMapping = model.mapping
        self.crossbar = crossbar or CrossbarSettings()
        self.chip = self.crossbar.chip(model.config)
        """The chip as emulated: the backbone's config with the settings' ADC and DAC."""
        self.fidelity = _fidelity(fidelity)
        self.energy_config = energy or EnergyConfig.for_crossbar(self.chip)
        self.tasks: dict[str, TaskState] = {}
        self.prepared: LRUCache[str, PreparedTask] = LRUCache(
            max_prepared_tasks, on_evict=lambda task_id, _: self.mixed.forget(task_id))
        self.active: str | None = None
        """The task of the last single-task call (a switch is counted when it changes)."""
        self.stats = EngineStats()
        self.pool = pool
        self.last_residency: Residency | None = None
        """What the last :meth:`activate` did to the pool (None without a pool or state)."""
        self._layers = dict(self.model.layers())
        self._norm_modules = {name: module for name, module in self.model.body.named_modules()
                              if isinstance(module, DigitalNorm)}
        self._digital_names = self._overridable_names()
        self.programmer = ChipProgrammer(self.model, self.crossbar, self.chip)
        # The once-per-process choice of the products' kernels (checks, and a timing where
        # torch's int8 product may be slow) is made here, not on the first request.
        int8_products()
        self.mixed = MixedBatchPlanner(self._layers, self._norm_modules, self.programmer)
        self.costs = CostCounter(self.model, self.chip)
        noise = self.crossbar.non_idealities
        self._read_generator = torch.Generator().manual_seed(part_seed(noise.seed, "read"))
        for layer in self._layers.values():  # the model may hold a trainer's task
            layer.reset_effective_weight()
        if self.fidelity is Fidelity.CROSSBAR:
            self.programmer.check_adc()

    # -- registration ----------------------------------------------------------------

    def add_task(self, task: TaskState) -> None:
        """Validate and register a task (replacing one with the same id)."""
        task.validate(self.mapping)
        unknown = sorted(set(task.digital) - self._digital_names)
        if unknown:
            raise TaskStateError(
                f"task {task.task_id}: {unknown[:3]} are not digital backbone tensors "
                "(only BatchNorm parameters and statistics can be task-specific)"
            )
        for name, value in task.digital.items():
            expected = self.backbone_digital(name).shape
            if value.shape != expected:
                raise TaskStateError(
                    f"task {task.task_id}: {name} must have shape {list(expected)}, "
                    f"got {list(value.shape)}"
                )
        if self.prepared.pop(task.task_id) is not None and self.active == task.task_id:
            self.active = None
        self.mixed.forget(task.task_id)  # also where its prepared state had left already
        self.tasks[task.task_id] = task

    def backbone_digital(self, name: str) -> Tensor:
        """The backbone's own value of a tensor a task may override (``features.1.1.bias``)."""
        if name not in self._digital_names:
            raise TaskStateError(f"{name} is not a digital backbone tensor")
        module_name, _, attr = name.rpartition(".")
        value: Tensor = getattr(self.model.body.get_submodule(module_name), attr)
        return value.detach()

    def remove_task(self, task_id: str) -> None:
        self._task(task_id)
        self.prepared.pop(task_id)
        self.mixed.forget(task_id)
        del self.tasks[task_id]
        if self.pool is not None:
            self.pool.forget(task_id)
        if self.active == task_id:
            self.active = None

    def _task(self, task_id: str) -> TaskState:
        try:
            return self.tasks[task_id]
        except KeyError as e:
            known = sorted(self.tasks)
            raise TaskNotFound(f"unknown task {task_id!r}; registered: {known}") from e

    # -- preparing and switching -----------------------------------------------------

    def prepare(self, task_id: str) -> PreparedTask:
        """Folded weights of a task, from the cache or computed now."""
        cached = self.prepared.get(task_id)
        if cached is not None:
            return cached
        task = self._task(task_id)
        started = time.perf_counter()
        values = shift_values(task.shift_levels)
        weights: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, state in task.layers.items():
                layer = self._layers[name]
                assert layer.mapping is not None
                weights[name] = fold_effective_weight(
                    layer.weight_codes, torch.ones_like(layer.weight_scale), layer.mapping,
                    column_values=values[state.column_codes.long()],
                    pe_mask=state.pe_mask, spare_codes=state.spare_codes,
                )
        digital = {name: t.detach().float().clone() for name, t in task.digital.items()}
        seconds = time.perf_counter() - started
        prepared = PreparedTask(task, weights, seconds, norms=by_module(digital))
        self.stats.prepares += 1
        self.stats.prepare_seconds += seconds
        self.prepared.put(task_id, prepared)
        return prepared

    def activate(self, task_id: str, fidelity: Fidelity | str | None = None) -> PreparedTask:
        """Fold the task, make it resident on the pool and program its cells (crossbar
        fidelity), so that the next call runs at once."""
        started = time.perf_counter()
        try:
            return self._activate(task_id, fidelity)
        finally:
            self.stats.last_activate_seconds = time.perf_counter() - started

    def _activate(self, task_id: str, fidelity: Fidelity | str | None) -> PreparedTask:
        prepared = self.prepare(task_id)
        crossbar = _fidelity(fidelity or self.fidelity) is Fidelity.CROSSBAR
        self.last_residency = (self.pool.ensure_resident(prepared.task)
                               if self.pool is not None and prepared.task.layers else None)
        self._task_context(prepared, crossbar=crossbar)
        if self.active != task_id:
            self.active = task_id
            self.stats.switches += 1
        return prepared

    def _task_context(self, prepared: PreparedTask, *, crossbar: bool) -> ForwardContext:
        """The call of the shared model for one task: its folded weights per layer (its
        programmed cells in crossbar fidelity) and its BatchNorm terms."""
        context = prepared.contexts.get(crossbar)
        if context is None:
            programs = prepared.chip_programs(self.programmer) if crossbar else {}
            layers: dict[nn.Module, LayerCall] = {}
            for name, layer in self._layers.items():
                codes, program = prepared.weights.get(name), programs.get(name)
                if codes is not None or program is not None:
                    layers[layer] = LayerCall(codes=codes, program=program)
            context = prepared.contexts[crossbar] = self._context(
                layers, {module: NormCall([norm_terms(prepared, module_name, module)])
                         for module_name, module in self._norms(prepared.norms)})
        return context

    def _context(self, layers: dict[nn.Module, LayerCall], norms: dict[nn.Module, NormCall],
                 task_rows: list[tuple[int, int]] | None = None) -> ForwardContext:
        return ForwardContext(layers, norms, implementation=self.crossbar.implementation,
                              read_generator=self._read_generator,
                              max_chunk_elements=self.crossbar.max_chunk_elements,
                              task_rows=task_rows)

    def _norms(self, module_names: Iterable[str]) -> list[tuple[str, DigitalNorm]]:
        return [(module_name, self._norm_modules[module_name]) for module_name in module_names]

    # -- inference -------------------------------------------------------------------

    @torch.no_grad()
    def features(self, x: Tensor, task_id: str, fidelity: Fidelity | str | None = None
                 ) -> Tensor:
        prepared = self.activate(task_id, fidelity)
        crossbar = _fidelity(fidelity or self.fidelity) is Fidelity.CROSSBAR
        with forward_context(self._task_context(prepared, crossbar=crossbar)):
            features: Tensor = self.model(x)
        return features

    @torch.no_grad()
    def forward(self, x: Tensor, task_id: str, fidelity: Fidelity | str | None = None
                ) -> Tensor:
        """Logits of the task's head for a batch ``[B, 3, H, W]``."""
        head = self._task(task_id).head
        features = self.features(x, task_id, fidelity)
        return torch.nn.functional.linear(features, head.weight, head.bias)

    def forward_mixed(self, x: Tensor, task_ids: Sequence[str],
                      fidelity: Fidelity | str | None = None) -> list[Tensor]:
        """Logits of each sample's own task for a batch that mixes tasks.

        This is the crossbar dataflow: per-column partial sums of the shared backbone,
        then a per-task shift and sum. Ideal fidelity convolves all samples with the
        backbone's codes once, then recomputes, for each task's samples, only the output
        channels the task changed (spare PEs, shifted columns); its results equal
        :meth:`forward` on each task's samples alone bit for bit. Crossbar fidelity reads
        each task's samples with its own programmed cells, the call the task alone
        makes on them (equal bit for bit without read noise; with it, the draws differ).
        Per-task BatchNorm terms are applied to each task's samples.
        With a pool, every task of the batch is made resident and pinned for the batch
        (:meth:`run_batch` also says what that cost).

        Returns:
            one logits row ``[classes of its task]`` per sample (tasks differ in classes).
        """
        return self.run_batch(x, task_ids, fidelity).logits

    @torch.no_grad()  # whatever the caller's mode: the one-pass path (_exact) needs it
    def run_batch(self, x: Tensor, task_ids: Sequence[str],
                  fidelity: Fidelity | str | None = None) -> BatchResult:
        """:meth:`forward_mixed`, with what the batch cost the chip besides compute."""
        if len(task_ids) != x.shape[0]:
            raise ConfigError(f"{len(task_ids)} task ids for a batch of {x.shape[0]} samples")
        groups: dict[str, list[int]] = {}
        for i, task_id in enumerate(task_ids):
            groups.setdefault(task_id, []).append(i)
        started = time.perf_counter()
        cold = frozenset(t for t in groups if self.prepared.peek(t) is None)
        prepared = {t: self.prepare(t) for t in groups}
        fidelity = _fidelity(fidelity or self.fidelity)
        out: list[Tensor | None] = [None] * len(task_ids)
        residencies: dict[str, Residency] = {}
        pinned = self._pin_all(prepared, residencies)
        load = self.stats.last_activate_seconds = time.perf_counter() - started
        try:
            if len(groups) == 1 or not self._exact():
                for task_id, rows in groups.items():
                    index = torch.tensor(rows)
                    logits = self.forward(x.index_select(0, index), task_id, fidelity)
                    load += self.stats.last_activate_seconds
                    if self.last_residency is not None:  # _pin_all saw it first otherwise
                        residencies.setdefault(task_id, self.last_residency)
                    for row, value in zip(rows, logits, strict=True):
                        out[row] = value
            else:
                features = self._mixed_features(x, groups, prepared,
                                                crossbar=fidelity is Fidelity.CROSSBAR)
                for task_id, rows in groups.items():
                    head = prepared[task_id].task.head
                    index = torch.tensor(rows)
                    logits = torch.nn.functional.linear(features.index_select(0, index),
                                                        head.weight, head.bias)
                    for row, value in zip(rows, logits, strict=True):
                        out[row] = value
        finally:
            if self.pool is not None:
                for task_id in pinned:
                    self.pool.unpin(task_id)
        return BatchResult([value for value in out if value is not None], residencies,
                           load, cold)

    def _exact(self) -> bool:
        """Whether every layer takes the code-domain path that mixed batches extend."""
        return all(layer._exact_inputs() for layer in self._layers.values())

    def _pin_all(self, prepared: dict[str, PreparedTask],
                 residencies: dict[str, Residency]) -> list[str]:
        """Make every task of a batch resident at once; refuse a set the pool can't hold."""
        if self.pool is None:
            return []
        pinned: list[str] = []
        try:
            for task_id, p in prepared.items():
                if not p.task.layers:
                    continue
                residencies[task_id] = self.pool.ensure_resident(p.task)
                self.pool.pin(task_id)
                pinned.append(task_id)
        except BaseException:
            for task_id in pinned:
                self.pool.unpin(task_id)
            raise
        return pinned

    def _mixed_features(self, x: Tensor, groups: dict[str, list[int]],
                        prepared: dict[str, PreparedTask], *, crossbar: bool) -> Tensor:
        self.active = None
        # Sorted by task, each task's samples are one block of rows: its layers and
        # BatchNorm then read and write them in place (no gathers or scatters). The tasks
        # go in name order, so that batches of the same tasks reuse the same calls.
        tasks = sorted(groups)
        order = [row for task_id in tasks for row in groups[task_id]]
        task_rows, start = [], 0
        for task_id in tasks:
            task_rows.append((start, start + len(groups[task_id])))
            start += len(groups[task_id])
        order_index = torch.tensor(order)
        sorted_x = x if order == sorted(order) else x.index_select(0, order_index)
        layers, norms = self.mixed.calls({t: prepared[t] for t in tasks}, task_rows,
                                         crossbar=crossbar)
        with forward_context(self._context(layers, norms, task_rows)):
            features: Tensor = self.model(sorted_x)
        if sorted_x is x:
            return features
        return features.index_copy(0, order_index, features)

    # -- energy ----------------------------------------------------------------------

    def ops_per_image(self, task_id: str, image_size: tuple[int, int]) -> OpCounts:
        """Operations the chip performs for one image of this task at this input size."""
        return self.costs.ops_per_image(self.prepare(task_id), image_size)

    def energy_per_image(self, task_id: str, image_size: tuple[int, int]) -> EnergyReport:
        return energy_of(self.ops_per_image(task_id, image_size), self.energy_config)

    # -- digital tensors -------------------------------------------------------------

    def _overridable_names(self) -> set[str]:
        names = set()
        for module_name, module in self.model.body.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    names.add(f"{module_name}.{attr}")
        return names



def _fidelity(value: Fidelity | str) -> Fidelity:
    try:
        return Fidelity(value)
    except ValueError as e:
        allowed = ", ".join(f.value for f in Fidelity)
        raise ConfigError(f"fidelity must be one of {allowed}, got {value!r}") from e
