"""Runs the shared, frozen backbone for any registered task.

Each task's masks and spare PEs are folded once into effective weights
(:func:`core.ops.fold.fold_effective_weight`) and kept in a bounded LRU, so
switching between cached tasks is a pointer swap per layer and a forward pass
for a task costs what the plain quantized backbone costs.

Crossbar fidelity runs every crossbar layer through the crossbar-exact operator
(:mod:`core.ops.crossbar`) on the cells as programmed: the engine programs the
backbone's cells once (with the device non-idealities of its settings, drawn
once, so every request sees the same chip), programs each task's spare PEs the
first time the task runs, and keeps the per-task layout beside the folded
weights. The fidelity can be chosen per call. The engine is owned by one
worker; it is not thread-safe.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from core.config import AdcRange, CrossbarSettings, Fidelity
from core.energy import (
    EnergyConfig,
    EnergyReport,
    OpCounts,
    count_head_ops,
    count_layer_ops,
    energy_of,
)
from core.errors import ConfigError, TaskNotFound, TaskStateError
from core.forward_context import ForwardContext, LayerCall, NormCall, forward_context
from core.layers import CrossbarConv2d, DigitalNorm, SampleChannels, SpareRead
from core.lru import LRUCache
from core.mapping import ModelMapping
from core.model import DAC_MODES, CrossbarModel
from core.ops.crossbar import (
    CrossbarProgram,
    adc_code_range,
    build_program,
    full_scale_adc_step,
    layer_cell_levels,
    restrict_program,
    spare_cell_levels,
    task_cell_levels,
)
from core.ops.fold import fold_effective_weight, replaced_columns
from core.pool import Residency, SparePEPool
from core.programming import part_seed, program_cells
from core.task_state import LayerTaskState, TaskState, shift_values


@dataclass
class PreparedTask:
    """A task's state decoded into the tensors the forward pass uses (weights in code units)."""

    task: TaskState
    weights: dict[str, Tensor]
    prepare_seconds: float
    ops_per_image: dict[tuple[int, int], OpCounts] = field(default_factory=dict)
    programs: dict[str, CrossbarProgram] | None = None
    """Crossbar-fidelity layout of every crossbar layer, built on first crossbar use."""
    norms: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """The task's BatchNorm terms by module (``{"features.1.1": {"weight": w, ...}}``)."""
    contexts: dict[bool, ForwardContext] = field(default_factory=dict)
    """The task's call of the shared model alone, in ideal (False) and crossbar (True)
    fidelity, built on first use."""
    mixed_reads: dict[str, tuple[Tensor, SpareRead | None] | None] = field(
        default_factory=dict)
    """Per crossbar layer, the task's part of a mixed crossbar batch (built on first use)."""
    norm_terms: dict[str, Tensor] = field(default_factory=dict)
    """Per module, the four terms a mixed batch gathers (``[4, C]``), built on first use."""
    changed: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None
    """Per layer: output channels whose codes differ from the backbone's, the task's
    codes of those channels and the same as a ``[Cin * kh * kw, c]`` matrix; built on
    first mixed batch."""


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
        # reach the layers with each call (core.forward_context).
        self.model = copy.deepcopy(model).eval()
        self.mapping: ModelMapping = model.mapping
        self.crossbar = crossbar or CrossbarSettings()
        self.chip = self.crossbar.chip(model.config)
        """The chip as emulated: the backbone's config with the settings' ADC and DAC."""
        self.fidelity = _fidelity(fidelity)
        self.energy_config = energy or EnergyConfig.for_crossbar(self.chip)
        self.tasks: dict[str, TaskState] = {}
        self.prepared: LRUCache[str, PreparedTask] = LRUCache(max_prepared_tasks)
        self.active: str | None = None
        """The task of the last single-task call (a switch is counted when it changes)."""
        self.stats = EngineStats()
        self.pool = pool
        self.last_residency: Residency | None = None
        """What the last :meth:`activate` did to the pool (None without a pool or state)."""
        self._layers = dict(self.model.layers())
        self._digital_names = self._overridable_names()
        self._backbone_float: dict[str, tuple[tuple[int, int], Tensor]] = {}
        self._positions: dict[tuple[int, int], dict[str, int]] = {}
        self._backbone_cells: dict[str, Tensor] = {}
        self._backbone_programs: dict[str, CrossbarProgram] = {}
        noise = self.crossbar.non_idealities
        self._read_generator = torch.Generator().manual_seed(part_seed(noise.seed, "read"))
        for name, layer in self._layers.items():  # the model may hold a trainer's task
            layer.effective_codes = self._backbone_codes(name, layer)
        if self.fidelity is Fidelity.CROSSBAR:
            self._check_adc()

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
        prepared = PreparedTask(task, weights, seconds, norms=_by_module(digital))
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
            programs = self._programs(prepared) if crossbar else {}
            layers: dict[nn.Module, LayerCall] = {}
            for name, layer in self._layers.items():
                codes, program = prepared.weights.get(name), programs.get(name)
                if codes is not None or program is not None:
                    layers[layer] = LayerCall(codes=codes, program=program)
            context = prepared.contexts[crossbar] = self._context(
                layers, {module: NormCall([_norm_terms(prepared, module_name, module)])
                         for module_name, module in self._norms(prepared.norms)})
        return context

    def _context(self, layers: dict[nn.Module, LayerCall], norms: dict[nn.Module, NormCall]
                 ) -> ForwardContext:
        return ForwardContext(layers, norms, implementation=self.crossbar.implementation,
                              read_generator=self._read_generator,
                              max_chunk_elements=self.crossbar.max_chunk_elements)

    def _norms(self, module_names: Iterable[str]) -> list[tuple[str, DigitalNorm]]:
        modules = []
        for module_name in module_names:
            module = self.model.body.get_submodule(module_name)
            assert isinstance(module, DigitalNorm)
            modules.append((module_name, module))
        return modules

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

    @torch.no_grad()
    def forward_mixed(self, x: Tensor, task_ids: Sequence[str],
                      fidelity: Fidelity | str | None = None) -> list[Tensor]:
        """Logits of each sample's own task for a batch that mixes tasks.

        This is the crossbar dataflow: per-column partial sums of the shared backbone,
        then a per-task shift and sum. Ideal fidelity convolves all samples with the
        backbone's codes once, then recomputes, for each task's samples, only the output
        channels the task changed (spare PEs, shifted columns); its results equal
        :meth:`forward` on each task's samples alone bit for bit. Crossbar fidelity reads
        the backbone's programmed cells once for the whole batch, each sample's ADC
        outputs scaled by its own task's shift mask (0 on its replaced PEs), then adds
        each task's spare PEs, read for its samples on just their row groups; results
        equal each task alone up to float summation order (and read noise, if any).
        Per-task BatchNorm terms are applied to each task's samples.
        With a pool, every task of the batch is made resident and pinned for the batch
        (:meth:`run_batch` also says what that cost).

        Returns:
            one logits row ``[classes of its task]`` per sample (tasks differ in classes).
        """
        return self.run_batch(x, task_ids, fidelity).logits

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
        # BatchNorm then read and write them in place (no gathers or scatters).
        order = [row for rows in groups.values() for row in rows]
        blocks, start = {}, 0
        for task_id, rows in groups.items():
            blocks[task_id] = (start, start + len(rows))
            start += len(rows)
        order_index = torch.tensor(order)
        sorted_x = x if order == sorted(order) else x.index_select(0, order_index)
        layers = (self._mixed_crossbar_layers(x.shape[0], blocks, prepared) if crossbar
                  else self._mixed_ideal_layers(blocks, prepared))
        block_rows = list(blocks.values())
        norms: dict[nn.Module, NormCall] = {
            module: NormCall([_norm_terms(p, module_name, module) for p in prepared.values()],
                             block_rows)
            for module_name, module in self._norms({m for p in prepared.values()
                                                    for m in p.norms})}
        with forward_context(self._context(layers, norms)):
            features: Tensor = self.model(sorted_x)
        if sorted_x is x:
            return features
        return features.index_copy(0, order_index, features)

    def _mixed_ideal_layers(self, blocks: dict[str, tuple[int, int]],
                            prepared: dict[str, PreparedTask]) -> dict[nn.Module, LayerCall]:
        """Per layer, every task's changed channels for its own block of samples."""
        layers: dict[nn.Module, LayerCall] = {}
        for name, layer in self._layers.items():
            plan = self._sample_channels(name, layer, blocks, prepared)
            if plan is not None:
                layers[layer] = LayerCall(sample_channels=plan)
        return layers

    def _mixed_crossbar_layers(self, batch: int, blocks: dict[str, tuple[int, int]],
                               prepared: dict[str, PreparedTask]
                               ) -> dict[nn.Module, LayerCall]:
        """The backbone's programmed cells for the whole batch with each sample's shift
        mask (0 on its task's replaced PEs), plus each task's spare PEs read on their own
        row groups for its samples."""
        self._check_adc()
        samples = {t: torch.arange(start, stop) for t, (start, stop) in blocks.items()}
        layers: dict[nn.Module, LayerCall] = {}
        for name, layer in self._layers.items():
            if not layer.on_crossbar:
                continue
            mapping = layer.mapping
            assert mapping is not None
            if self._backbone_program(name, layer).lossless:  # exact: the ideal code path
                plan = self._sample_channels(name, layer, blocks, prepared)
                if plan is not None:
                    layers[layer] = LayerCall(sample_channels=plan)
                continue
            column_values = torch.ones(batch, mapping.row_groups, mapping.out_channels)
            reads = []
            for task_id, rows in samples.items():
                mixed = self._mixed_reads(prepared[task_id], name, layer)
                if mixed is None:
                    continue
                values, read = mixed
                if read is not None:
                    reads.append(replace(read, samples=rows))
                column_values[rows] = values
            layers[layer] = LayerCall(program=self._backbone_program(name, layer),
                                      sample_column_values=column_values, spare_reads=reads)
        return layers

    def _mixed_reads(self, prepared: PreparedTask, name: str, layer: CrossbarConv2d
                     ) -> tuple[Tensor, SpareRead | None] | None:
        """A task's part of a mixed crossbar batch on one layer (None: it keeps the layer):
        its shift-mask values with 0 on replaced PEs, and its spare PEs' read (samples
        left empty), built once per task."""
        if name not in prepared.mixed_reads:
            task = prepared.task
            state = task.layers.get(name)
            entry: tuple[Tensor, SpareRead | None] | None = None
            if state is not None:
                mapping = layer.mapping
                assert mapping is not None
                values = shift_values(task.shift_levels)[state.column_codes.long()]
                read = None
                if state.replaced_pes:
                    replaced = replaced_columns(state.pe_mask, mapping)
                    values = torch.where(replaced, 0.0, values)
                    groups = replaced.any(1).nonzero().flatten()
                    outputs = replaced.any(0).nonzero().flatten()
                    program = self._programs(prepared)[name]
                    values_read = replaced.index_select(0, groups).index_select(1, outputs)
                    width = program.channels_per_group * program.reads
                    channels = (groups.reshape(-1, 1) * width + torch.arange(width)).flatten()
                    read = SpareRead(torch.zeros(0, dtype=torch.long), groups, outputs,
                                     restrict_program(program, groups, outputs, values_read),
                                     channels)
                entry = (values, read)
            prepared.mixed_reads[name] = entry
        return prepared.mixed_reads[name]

    def _exact(self) -> bool:
        """Whether every layer takes the code-domain path that mixed batches extend."""
        return all(layer._exact_inputs() for layer in self._layers.values())

    def _backbone_codes(self, name: str, layer: CrossbarConv2d) -> Tensor:
        """The backbone's codes of a layer as the float weight it convolves (kept until the
        codes change)."""
        source = layer.weight_codes
        key = (id(source), source._version)
        cached = self._backbone_float.get(name)
        if cached is None or cached[0] != key:
            cached = self._backbone_float[name] = (key, source.float())
        return cached[1]

    def _changed(self, prepared: PreparedTask) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Per layer, the output channels whose codes differ from the backbone's and the
        task's codes of them (every channel of a grouped layer: a subset of its channels
        is not a convolution of the same input)."""
        if prepared.changed is None:
            changed = {}
            for name, codes in prepared.weights.items():
                layer = self._layers[name]
                differs = (codes != layer.weight_codes).flatten(1).any(1)
                if not bool(differs.any()):
                    continue
                if layer.groups != 1:
                    differs = torch.ones_like(differs)
                channels = differs.nonzero().flatten()
                own = codes.index_select(0, channels).contiguous()
                changed[name] = (channels, own, own.flatten(1).t().contiguous())
            prepared.changed = changed
        return prepared.changed

    def _sample_channels(self, name: str, layer: CrossbarConv2d,
                         blocks: dict[str, tuple[int, int]],
                         prepared: dict[str, PreparedTask]) -> SampleChannels | None:
        """One layer's plan in a mixed batch sorted by task (None: no task changed it)."""
        changed = {t: self._changed(p).get(name) for t, p in prepared.items()}
        kept = [(blocks[t], entry) for t, entry in changed.items() if entry is not None]
        if not kept:
            return None
        segments: list[tuple[int, int, Tensor]] = []
        for task_id, (start, stop) in blocks.items():
            own = prepared[task_id].weights.get(name) if changed[task_id] else None
            codes = self._backbone_codes(name, layer) if own is None else own
            if segments and own is None and segments[-1][2] is codes:
                segments[-1] = (segments[-1][0], stop, codes)  # both keep the backbone's
            else:
                segments.append((start, stop, codes))
        return SampleChannels(blocks=[block for block, _ in kept],
                              channels=[entry[0] for _, entry in kept],
                              codes=[entry[1] for _, entry in kept],
                              matrices=[entry[2] for _, entry in kept], segments=segments)

    # -- the programmed chip (crossbar fidelity) -------------------------------------

    def _check_adc(self) -> None:
        if self.crossbar.adc_range is not AdcRange.CALIBRATED:
            return
        if not self.model.adc_calibrated:
            raise ConfigError(
                "this backbone's ADC ranges are not calibrated: run "
                "CrossbarModel.calibrate_adc (xma2 quantize does) or use "
                "CrossbarSettings(adc_range='full_scale')"
            )
        if self.model.adc_calibrated_bits != self.chip.adc_bits:
            raise ConfigError(
                f"the backbone's ADC ranges were calibrated for {self.model.adc_calibrated_bits}"
                f"-bit ADCs, not {self.chip.adc_bits}: run calibrate_adc(images, adc_bits="
                f"{self.chip.adc_bits}) on the backbone, or use adc_range='full_scale'"
            )

    def _programs(self, prepared: PreparedTask) -> dict[str, CrossbarProgram]:
        if prepared.programs is None:
            self._check_adc()
            task = prepared.task
            values = shift_values(task.shift_levels)
            programs = {}
            for name, layer in self._layers.items():
                if not layer.on_crossbar:
                    continue
                state = task.layers.get(name)
                if state is None:
                    programs[name] = self._backbone_program(name, layer)
                else:
                    programs[name] = self._task_program(task.task_id, name, layer, state, values)
            prepared.programs = programs
        return prepared.programs

    def layer_program(self, name: str, state: LayerTaskState | None = None, *,
                      task_id: str = "") -> CrossbarProgram:
        """One crossbar layer as this chip programs it: the backbone's cells, or ``state``
        on them (spare PEs drawn as the chip draws task ``task_id``'s). A trainer reads
        the chip through it while a task's state is still changing."""
        layer = self._layers[name]
        if not layer.on_crossbar:
            raise ConfigError(f"layer {name} is not on crossbars")
        self._check_adc()
        if state is None:
            return self._backbone_program(name, layer)
        return self._task_program(task_id, name, layer, state,
                                  shift_values(self.model.config.shift_levels))

    def _backbone_program(self, name: str, layer: CrossbarConv2d) -> CrossbarProgram:
        if name not in self._backbone_programs:
            mapping = layer.mapping
            assert mapping is not None
            ones = torch.ones(mapping.row_groups, mapping.out_channels)
            self._backbone_programs[name] = self._layout(name, layer, self._cells(name, layer),
                                                         ones)
        return self._backbone_programs[name]

    def _task_program(self, task_id: str, name: str, layer: CrossbarConv2d,
                      state: LayerTaskState, values: Tensor) -> CrossbarProgram:
        mapping = layer.mapping
        assert mapping is not None
        column_values = values[state.column_codes.long()]
        cells = self._cells(name, layer)
        if state.replaced_pes:
            spare = spare_cell_levels(state.spare_codes, state.pe_mask, mapping)
            spare = self._program_cells(spare, part_seed(self.crossbar.non_idealities.seed,
                                                     f"spare/{task_id}/{name}"))
            cells = task_cell_levels(cells, spare, state.pe_mask, mapping)
            column_values = torch.where(replaced_columns(state.pe_mask, mapping),
                                        1.0, column_values)
        return self._layout(name, layer, cells, column_values)

    def _cells(self, name: str, layer: CrossbarConv2d) -> Tensor:
        """The backbone's cell levels of a layer as programmed on this chip (once)."""
        if name not in self._backbone_cells:
            mapping = layer.mapping
            assert mapping is not None
            levels = layer_cell_levels(layer.weight_codes, mapping)
            seed = part_seed(self.crossbar.non_idealities.seed, f"backbone/{name}")
            self._backbone_cells[name] = self._program_cells(levels, seed)
        return self._backbone_cells[name]

    def _program_cells(self, levels: Tensor, seed: int) -> Tensor:
        return program_cells(levels, self.crossbar.non_idealities,
                             bits_per_cell=self.chip.bits_per_cell, seed=seed)

    def _layout(self, name: str, layer: CrossbarConv2d, cells: Tensor,
                column_values: Tensor) -> CrossbarProgram:
        mapping = layer.mapping
        assert mapping is not None and layer.adc_range is not None
        chip = self.chip
        qmax = adc_code_range(chip.adc_bits, chip.adc_signed)[1]
        if self.crossbar.adc_range is AdcRange.FULL_SCALE:
            step = full_scale_adc_step(mapping, dac_bits=chip.dac_bits, adc_bits=chip.adc_bits)
        else:
            step = layer.adc_range[DAC_MODES.index(chip.dac_mode)] / qmax
        noise = self.crossbar.non_idealities
        offset = 0.0
        if noise.adc_offset_sigma:
            generator = torch.Generator().manual_seed(part_seed(noise.seed, f"adc/{name}"))
            offset = float(torch.randn((), generator=generator)) * noise.adc_offset_sigma
            if noise.adc_offset_trimmed:
                offset -= round(offset)
        return build_program(cells, column_values, mapping, dac_bits=chip.dac_bits,
                             adc_step=step, adc_bits=chip.adc_bits, adc_offset_lsb=offset,
                             read_sigma=noise.read_sigma,
                             cells_as_encoded=not noise.alters_cells)

    # -- energy ----------------------------------------------------------------------

    def ops_per_image(self, task_id: str, image_size: tuple[int, int]) -> OpCounts:
        """Operations the chip performs for one image of this task at this input size."""
        prepared = self.prepare(task_id)
        cached = prepared.ops_per_image.get(image_size)
        if cached is not None:
            return cached
        positions = self._output_positions(image_size)
        task = prepared.task
        total = OpCounts()
        for name, layer in self._layers.items():
            assert layer.mapping is not None
            state = task.layers.get(name)
            total = total + count_layer_ops(
                layer.mapping, images=1, positions_per_image=positions[name],
                config=self.chip,
                column_codes=None if state is None else state.column_codes,
                pe_mask=None if state is None else state.pe_mask,
            )
        head = task.head.weight
        total = total + count_head_ops(head.shape[1], head.shape[0], images=1)
        prepared.ops_per_image[image_size] = total
        return total

    def energy_per_image(self, task_id: str, image_size: tuple[int, int]) -> EnergyReport:
        return energy_of(self.ops_per_image(task_id, image_size), self.energy_config)

    def _output_positions(self, image_size: tuple[int, int]) -> dict[str, int]:
        """Output pixels of every layer for one image (input vectors of its crossbars)."""
        if image_size not in self._positions:
            sizes: dict[str, int] = {}

            def record(name: str) -> Callable[..., None]:
                def hook(_module: nn.Module, _inputs: object, out: Tensor) -> None:
                    sizes[name] = out.shape[-2] * out.shape[-1]
                return hook

            hooks = [layer.register_forward_hook(record(name))
                     for name, layer in self._layers.items()]
            try:
                with torch.no_grad():
                    self.model(torch.zeros(1, 3, *image_size))
            finally:
                for hook in hooks:
                    hook.remove()
            self._positions[image_size] = sizes
        return self._positions[image_size]

    # -- digital tensors -------------------------------------------------------------

    def _overridable_names(self) -> set[str]:
        names = set()
        for module_name, module in self.model.body.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    names.add(f"{module_name}.{attr}")
        return names



def _by_module(digital: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{"a.b.weight": w}`` -> ``{"a.b": {"weight": w}}``."""
    modules: dict[str, dict[str, Tensor]] = {}
    for name, value in digital.items():
        module_name, _, attr = name.rpartition(".")
        modules.setdefault(module_name, {})[attr] = value
    return modules


NORM_TERMS = ("running_mean", "running_var", "weight", "bias")


def _norm_terms(prepared: PreparedTask, module_name: str, module: DigitalNorm) -> Tensor:
    """A task's terms of one BatchNorm as ``[4, C]`` (the backbone's where it has none).

    A call hands the task's to the module (a mixed batch one per block of samples,
    :class:`core.forward_context.NormCall`); the tensor is kept, so the module's folded
    terms of it are too.
    """
    cached = prepared.norm_terms.get(module_name)
    if cached is None:
        own = prepared.norms.get(module_name, {})
        cached = torch.stack([own.get(attr, getattr(module, attr)).detach().float()
                              for attr in NORM_TERMS])
        prepared.norm_terms[module_name] = cached
    return cached


def _fidelity(value: Fidelity | str) -> Fidelity:
    try:
        return Fidelity(value)
    except ValueError as e:
        allowed = ", ".join(f.value for f in Fidelity)
        raise ConfigError(f"fidelity must be one of {allowed}, got {value!r}") from e
