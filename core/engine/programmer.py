"""Programs the chip's cells: every rule from a layer's codes to the program the
crossbar operator reads.

The backbone's cells are programmed once (with the device non-idealities of the
settings, drawn once, so every request sees the same chip); a task's spare PEs are
programmed on top of them, drawn per task and layer, when the task first runs in
crossbar fidelity. A trainer reads the same programs while a task is still learning
(:meth:`ChipProgrammer.layer_program`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.chip.adc import adc_step
from core.chip.config import AdcRange, CrossbarConfig, CrossbarSettings
from core.chip.programming import part_seed, program_cells
from core.errors import ConfigError
from core.nn.layers import CrossbarConv2d
from core.nn.model import CrossbarModel
from core.ops.crossbar import (
    CrossbarProgram,
    build_program,
    layer_cell_levels,
    spare_cell_levels,
    task_cell_levels,
)
from core.ops.fold import replaced_columns
from core.task_state import LayerTaskState, TaskState, shift_values


class ChipProgrammer:
    """The cells of one emulated chip for its backbone and any task on it.

    Args:
        model: the calibrated backbone whose layers are programmed.
        crossbar: how the chip is emulated (ADC range rule, non-idealities).
        chip: the chip configuration (the backbone's with the settings' ADC and DAC).
    """

    def __init__(self, model: CrossbarModel, crossbar: CrossbarSettings,
                 chip: CrossbarConfig) -> None:
        self.model = model
        self.crossbar = crossbar
        self.chip = chip
        self._layers = dict(model.layers())
        self.backbone_programs: dict[str, CrossbarProgram] = {}
        self._backbone_cells: dict[str, Tensor] = {}

    def check_adc(self) -> None:
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

    def task_programs(self, task: TaskState) -> dict[str, CrossbarProgram]:
        """Every crossbar layer of a task: its spare PEs on the backbone's cells."""
        self.check_adc()
        values = shift_values(task.shift_levels)
        programs = {}
        for name, layer in self._layers.items():
            if not layer.on_crossbar:
                continue
            state = task.layers.get(name)
            if state is None:
                programs[name] = self.backbone_program(name)
            else:
                programs[name] = self._task_program(task.task_id, name, layer, state, values)
        return programs

    def layer_program(self, name: str, state: LayerTaskState | None = None, *,
                      task_id: str = "") -> CrossbarProgram:
        """One crossbar layer as this chip programs it: the backbone's cells, or ``state``
        on them (spare PEs drawn as the chip draws task ``task_id``'s). A trainer reads
        the chip through it while a task's state is still changing."""
        layer = self._layers[name]
        if not layer.on_crossbar:
            raise ConfigError(f"layer {name} is not on crossbars")
        self.check_adc()
        if state is None:
            return self.backbone_program(name)
        return self._task_program(task_id, name, layer, state,
                                  shift_values(self.model.config.shift_levels))

    def backbone_program(self, name: str) -> CrossbarProgram:
        """A crossbar layer's backbone cells as programmed (built once)."""
        if name not in self.backbone_programs:
            layer = self._layers[name]
            mapping = layer.mapping
            assert mapping is not None
            ones = torch.ones(mapping.row_groups, mapping.out_channels)
            self.backbone_programs[name] = self._layout(name, layer, self.backbone_cells(name),
                                                        ones)
        return self.backbone_programs[name]

    def _task_program(self, task_id: str, name: str, layer: CrossbarConv2d,
                      state: LayerTaskState, values: Tensor) -> CrossbarProgram:
        mapping = layer.mapping
        assert mapping is not None
        column_values = values[state.column_codes.long()]
        cells = self.backbone_cells(name)
        if state.replaced_pes:
            spare = spare_cell_levels(state.spare_codes, state.pe_mask, mapping)
            spare = self._program_cells(spare, part_seed(self.crossbar.non_idealities.seed,
                                                     f"spare/{task_id}/{name}"))
            cells = task_cell_levels(cells, spare, state.pe_mask, mapping)
            column_values = torch.where(replaced_columns(state.pe_mask, mapping),
                                        1.0, column_values)
        return self._layout(name, layer, cells, column_values)

    def backbone_cells(self, name: str) -> Tensor:
        """The backbone's cell levels of a layer as programmed on this chip (once)."""
        if name not in self._backbone_cells:
            layer = self._layers[name]
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
        step = adc_step(mapping, chip, layer.adc_range, self.crossbar.adc_range)
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
