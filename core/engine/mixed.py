"""The plan of a batch that mixes tasks: one pass of the shared backbone per layer.

Ideal fidelity convolves all samples with the backbone's codes once, then recomputes,
for each task's samples, only the output channels the task changed (spare PEs, shifted
columns). Crossbar fidelity reads the backbone's programmed cells once for the whole
batch, each sample's ADC outputs scaled by its own task's shift mask (0 on its replaced
PEs), then adds each task's spare PEs, read for its samples on just their row groups.
The samples are sorted by task, so each task's samples are one block of rows.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from core.engine.prepared import PreparedTask
from core.engine.programmer import ChipProgrammer
from core.nn.forward_context import LayerCall
from core.nn.layers import CrossbarConv2d, SampleChannels, SpareRead
from core.ops.crossbar import restrict_program
from core.ops.fold import replaced_columns
from core.task_state import shift_values


class MixedBatchPlanner:
    """Builds each layer's :class:`LayerCall` for a batch sorted by task."""

    def __init__(self, layers: dict[str, CrossbarConv2d], programmer: ChipProgrammer) -> None:
        self._layers = layers
        self.programmer = programmer
        self._backbone_float: dict[str, tuple[tuple[int, int], Tensor]] = {}

    def layer_calls(self, batch: int, blocks: dict[str, tuple[int, int]],
                    prepared: dict[str, PreparedTask], *, crossbar: bool
                    ) -> dict[nn.Module, LayerCall]:
        """Per layer, what the batch's tasks change (``blocks``: each task's rows)."""
        if crossbar:
            return self._mixed_crossbar_layers(batch, blocks, prepared)
        return self._mixed_ideal_layers(blocks, prepared)

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
        self.programmer.check_adc()
        samples = {t: torch.arange(start, stop) for t, (start, stop) in blocks.items()}
        layers: dict[nn.Module, LayerCall] = {}
        for name, layer in self._layers.items():
            if not layer.on_crossbar:
                continue
            mapping = layer.mapping
            assert mapping is not None
            if self.programmer.backbone_program(name).lossless:  # exact: the ideal code path
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
            layers[layer] = LayerCall(program=self.programmer.backbone_program(name),
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
                    program = prepared.chip_programs(self.programmer)[name]
                    values_read = replaced.index_select(0, groups).index_select(1, outputs)
                    width = program.channels_per_group * program.reads
                    channels = (groups.reshape(-1, 1) * width + torch.arange(width)).flatten()
                    read = SpareRead(torch.zeros(0, dtype=torch.long), groups, outputs,
                                     restrict_program(program, groups, outputs, values_read),
                                     channels)
                entry = (values, read)
            prepared.mixed_reads[name] = entry
        return prepared.mixed_reads[name]

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
