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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.engine.prepared import PreparedTask
from core.engine.programmer import ChipProgrammer
from core.nn.forward_context import LayerCall
from core.nn.layers import CrossbarConv2d, SampleChannels
from core.ops.crossbar import CrossbarProgram


class MixedBatchPlanner:
    """Builds each layer's :class:`LayerCall` for a batch sorted by task."""

    def __init__(self, layers: dict[str, CrossbarConv2d], programmer: ChipProgrammer) -> None:
        self._layers = layers
        self.programmer = programmer
        self._backbone_float: dict[str, tuple[tuple[int, int], Tensor]] = {}

    def layer_calls(self, blocks: dict[str, tuple[int, int]],
                    prepared: dict[str, PreparedTask], *, crossbar: bool
                    ) -> dict[nn.Module, LayerCall]:
        """Per layer, what the batch's tasks change (``blocks``: each task's rows)."""
        if crossbar:
            return self._mixed_crossbar_layers(blocks, prepared)
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

    def _mixed_crossbar_layers(self, blocks: dict[str, tuple[int, int]],
                               prepared: dict[str, PreparedTask]
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
                plan = self._sample_channels(name, layer, blocks, prepared)
                if plan is not None:
                    layers[layer] = LayerCall(sample_channels=plan)
                continue
            reads: list[tuple[int, int, CrossbarProgram]] = []
            for task_id, (start, stop) in blocks.items():
                program = prepared[task_id].chip_programs(self.programmer).get(name, backbone)
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
