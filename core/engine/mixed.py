"""The plan of a batch that mixes tasks: one pass of the shared backbone per layer.

Ideal fidelity convolves all samples with the backbone's codes once, then recomputes,
for each task's samples, only the output channels the task changed (spare PEs, shifted
columns). Crossbar fidelity reads each task's block of samples with that task's own
programmed cells, as the chip does: a sample's pass reads the PEs its task uses (the
backbone's, its spare PEs in place of the replaced ones), each PE once. Reading the
shared cells once for the whole batch and the spare PEs on top (the dataflow's other
order) costs more here, since XMA2 replaces PEs mostly in the early layers with the
largest maps, where the replaced PEs' reads come to 40-56% of the layer's work.
The samples are sorted by task, so each task's samples are one block of rows.

The calls speak of tasks, not rows (the rows of each task come with the batch's
context), so the planner keeps them per set of tasks: a batch of tasks that came
together before reuses its calls and what its layers made from the weights (int8 codes
in one unit, packed forms), which a mixed batch would otherwise make again each time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.engine.prepared import PreparedTask, norm_terms
from core.engine.programmer import ChipProgrammer
from core.lru import CacheStats, LRUCache
from core.nn.forward_context import LayerCall, NormCall
from core.nn.layers import CrossbarConv2d, SampleChannels
from core.nn.periphery import DigitalNorm
from core.ops.crossbar import CrossbarProgram

TASK_SETS_KEPT = 128
"""Sets of tasks whose mixed-batch calls the planner keeps. Zipf draws over eight tasks
in batches of 4-16 find 94-98% of their sets kept at 128 (a simulation), and each set
is about 640 objects that every full garbage collection walks (about 30 ms per 100,000
here), so more would lengthen those pauses for little. A set is dropped when a task's
prepared state leaves the engine; it holds int8 forms of its tasks' weights where the
set's units differ."""


@dataclass(frozen=True, slots=True)
class TaskSetCalls:
    """The calls of a batch mixing one ordered set of tasks, whatever its rows."""

    layers: dict[nn.Module, LayerCall]
    """Ideal fidelity's layer calls (and crossbar fidelity's on lossless layers): the
    tasks' codes of every layer a task of the set changed."""
    norms: dict[nn.Module, NormCall]
    """Per BatchNorm that a task of the set overrides, each task's terms."""


class MixedBatchPlanner:
    """Builds each layer's :class:`LayerCall` and each norm's :class:`NormCall` for a
    batch sorted by task, and keeps them per set of tasks."""

    def __init__(self, layers: dict[str, CrossbarConv2d], norms: dict[str, DigitalNorm],
                 programmer: ChipProgrammer) -> None:
        self._layers = layers
        self._norms = norms
        self.programmer = programmer
        self._backbone_float: dict[str, tuple[tuple[int, int], Tensor]] = {}
        self._plain_calls: dict[str, LayerCall] = {}
        self.stats = CacheStats()
        """Batches whose set of tasks had its calls kept (hits) or made (misses), and sets
        dropped (evictions)."""
        self._sets: LRUCache[tuple[str, ...], TaskSetCalls] = LRUCache(
            TASK_SETS_KEPT, on_evict=self._dropped)

    def calls(self, prepared: dict[str, PreparedTask], task_rows: list[tuple[int, int]], *,
              crossbar: bool) -> tuple[dict[nn.Module, LayerCall], dict[nn.Module, NormCall]]:
        """Per layer and norm, the calls of a batch whose tasks are ``prepared`` (in the
        order of their rows, ``task_rows``)."""
        task_set = self.task_set(prepared)
        if not crossbar:
            return task_set.layers, task_set.norms
        return self._mixed_crossbar_layers(task_set, prepared, task_rows), task_set.norms

    def task_set(self, prepared: dict[str, PreparedTask]) -> TaskSetCalls:
        """The calls of this ordered set of tasks, kept or made now."""
        key = tuple(prepared)
        kept = self._sets.get(key)
        if kept is not None:
            self.stats.hits += 1
            return kept
        self.stats.misses += 1
        kept = self._task_set(prepared)
        self._sets.put(key, kept)
        return kept

    def kept_sets(self) -> list[tuple[str, ...]]:
        """The sets of tasks whose calls are kept, least recently used first."""
        return self._sets.keys()

    def forget(self, task_id: str) -> None:
        """Drop the kept calls of every set with this task: the engine calls it whenever
        the task's prepared state leaves its cache and when the task is registered anew
        or removed, so kept calls always hold the tasks' current weights (and no weights
        of a task the engine has let go)."""
        for key in [key for key in self._sets.keys() if task_id in key]:
            self._sets.pop(key)

    def _dropped(self, _key: tuple[str, ...], _calls: TaskSetCalls) -> None:
        self.stats.evictions += 1

    def _task_set(self, prepared: dict[str, PreparedTask]) -> TaskSetCalls:
        # Every layer's call names the backbone's codes (the layer's own weight: a buffer
        # lookup per use otherwise); a layer no task of the set changed shares one call.
        layers: dict[nn.Module, LayerCall] = {}
        for name, layer in self._layers.items():
            plan = self._sample_channels(name, layer, prepared)
            codes = self._backbone_codes(name, layer)
            if plan is not None:
                layers[layer] = LayerCall(codes=codes, sample_channels=plan)
                continue
            plain = self._plain_calls.get(name)
            if plain is None or plain.codes is not codes:
                plain = self._plain_calls[name] = LayerCall(codes=codes)
            layers[layer] = plain
        norm_names = sorted({m for p in prepared.values() for m in p.norms})
        return TaskSetCalls(
            layers=layers,
            norms={self._norms[name]: NormCall([norm_terms(p, name, self._norms[name])
                                                for p in prepared.values()])
                   for name in norm_names})

    def _mixed_crossbar_layers(self, task_set: TaskSetCalls,
                               prepared: dict[str, PreparedTask],
                               task_rows: list[tuple[int, int]]
                               ) -> dict[nn.Module, LayerCall]:
        """Each task's block of samples read with its own programmed cells (the
        backbone's where it keeps the layer); adjacent blocks that read the same cells
        share a call."""
        self.programmer.check_adc()
        layers: dict[nn.Module, LayerCall] = {}
        for name, layer in self._layers.items():
            if not layer.on_crossbar:
                continue
            backbone = self.programmer.backbone_program(name)
            if backbone.lossless:  # exact: the ideal code path
                layers[layer] = task_set.layers[layer]
                continue
            reads: list[tuple[int, int, CrossbarProgram]] = []
            for p, (start, stop) in zip(prepared.values(), task_rows, strict=True):
                program = p.chip_programs(self.programmer).get(name, backbone)
                if reads and reads[-1][2] is program:
                    reads[-1] = (reads[-1][0], stop, program)
                else:
                    reads.append((start, stop, program))
            layers[layer] = LayerCall(block_programs=reads)
        return layers

    def _backbone_codes(self, name: str, layer: CrossbarConv2d) -> Tensor:
        """The backbone's codes of a layer as the float weight it convolves (kept until the
        codes change)."""
        source = layer.weight_codes
        key = (id(source), source._version)
        cached = self._backbone_float.get(name)
        if cached is None or cached[0] != key:
            cached = self._backbone_float[name] = (key, source.float())
        return cached[1]

    def _changed(self, prepared: PreparedTask) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer, the output channels whose codes differ from the backbone's and the
        task's codes of them as a ``[Cin * kh * kw, c]`` matrix (every channel of a
        grouped layer: a subset of its channels is not a convolution of the same
        input)."""
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
                own = codes.index_select(0, channels)
                changed[name] = (channels, own.flatten(1).t().contiguous())
            prepared.changed = changed
        return prepared.changed

    def _sample_channels(self, name: str, layer: CrossbarConv2d,
                         prepared: dict[str, PreparedTask]) -> SampleChannels | None:
        """One layer's plan for these tasks, in this order (None: no task changed it)."""
        changed = [self._changed(p).get(name) for p in prepared.values()]
        if all(entry is None for entry in changed):
            return None
        runs: list[tuple[int, int]] = []
        codes_of_runs: list[Tensor] = []
        for index, (p, entry) in enumerate(zip(prepared.values(), changed, strict=True)):
            own = p.weights.get(name) if entry is not None else None
            codes = self._backbone_codes(name, layer) if own is None else own
            if runs and own is None and codes_of_runs[-1] is codes:
                runs[-1] = (runs[-1][0], index + 1)  # both keep the backbone's
            else:
                runs.append((index, index + 1))
                codes_of_runs.append(codes)
        kept = [(index, entry) for index, entry in enumerate(changed) if entry is not None]
        return SampleChannels(changed=tuple(index for index, _ in kept),
                              channels=[entry[0] for _, entry in kept],
                              matrices=[entry[1] for _, entry in kept],
                              segment_tasks=tuple(runs), segment_codes=codes_of_runs)
