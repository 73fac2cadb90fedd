"""The served chip inside a task model's forward pass (chip-in-the-loop adaptation).

A lossy periphery (ADC rounding and clipping, read noise, ADC offsets, spare PEs with
their own programming faults) changes every crossbar layer's output in ways the
float training graph does not see. With :attr:`TrainConfig.chip_periphery
<core.learning.common.TrainConfig.chip_periphery>` each crossbar layer's forward value
is what the chip's operator computes on the layer's input codes, programmed with the
task's current state exactly as the engine programs it; its gradient is the float
convolution's (straight-through over the whole periphery, as PytorX trains with the
ADC in the loop). The task then learns its BatchNorm terms, head, masks and spare PEs
around the chip it will be served on. Layers whose program is provably lossless keep
the float value: it is the chip's up to float rounding, at no emulation cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.chip.config import CrossbarSettings, Fidelity, NonIdealities
from core.chip.programming import part_seed
from core.engine import CrossbarEngine
from core.nn.layers import CrossbarConv2d
from core.nn.model import CrossbarModel
from core.nn.quant import ActivationQuantizer
from core.ops.crossbar import CrossbarProgram, crossbar_conv2d
from core.task_state import LayerTaskState

__all__ = ["SERVED_CHIP_AGREEMENT", "ChipInTheLoop"]

SERVED_CHIP_AGREEMENT = 1.0
"""``train.chip_agreement`` of a task trained in the loop to be served (the shipped tasks'
chip stage, adaptation jobs): the server answers in ideal fidelity by default, so a
looped task's ideal view is taught the chip's answers (docs/results.md, "Starting from
the shipped tasks")."""


def _same_state(a: LayerTaskState | None, b: LayerTaskState | None) -> bool:
    if a is None or b is None:
        return a is b
    return (torch.equal(a.pe_mask, b.pe_mask) and torch.equal(a.spare_codes, b.spare_codes)
            and torch.equal(a.column_codes, b.column_codes))


class ChipInTheLoop:
    """Programs and reads the chip that a task is being adapted for.

    Args:
        model: the backbone as calibrated (not a programmed copy: the engine draws the
            chip's device effects itself, from ``noise``'s seed).
        noise: the chip's device non-idealities.
        task_id: the name the task will be served under (its spare PEs' faults are drawn
            from it, as the chip draws them).
        seed: seed of the read noise drawn in training passes.
    """

    def __init__(self, model: CrossbarModel, noise: NonIdealities, task_id: str,
                 seed: int = 0) -> None:
        self.engine = CrossbarEngine(model, crossbar=CrossbarSettings(non_idealities=noise),
                                     fidelity=Fidelity.CROSSBAR, max_prepared_tasks=1)
        self.task_id = task_id
        self.generator = torch.Generator().manual_seed(part_seed(seed, "train-read"))
        self.programs: dict[str, CrossbarProgram] = {}
        """Each crossbar layer's program for the current pass (set by :meth:`program`)."""
        self._states: dict[str, LayerTaskState | None] = {}

    def program(self, name: str, state: LayerTaskState | None) -> None:
        """Program layer ``name`` with the task's current ``state`` (None: the backbone);
        a layer whose served state did not change since the last pass keeps its program."""
        if name in self.programs and _same_state(self._states[name], state):
            return
        self._states[name] = state
        self.programs[name] = self.engine.programmer.layer_program(name, state,
                                                                   task_id=self.task_id)

    @property
    def lossless(self) -> bool:
        """Whether every programmed layer computes its float value (nothing to emulate)."""
        return all(p.lossless for p in self.programs.values())

    def read(self, layer: CrossbarConv2d, quant: ActivationQuantizer, name: str, x: Tensor,
             out: Tensor) -> Tensor | None:
        """The chip's output of ``layer`` for its forward input ``x`` (before or after the
        input quantization: quantizing twice gives the same codes), carrying ``out``'s
        gradient; None where the program is lossless (``out`` stands)."""
        program = self.programs.get(name)
        if program is None or program.lossless or not quant.fake_quant_enabled:
            return None
        step = quant.step.detach()
        qmin, qmax = quant.qrange
        codes = (x.detach() / step).round_().clamp_(qmin, qmax)
        with torch.no_grad():
            acc = crossbar_conv2d(codes, program, layer.geometry,
                                  implementation=self.engine.crossbar.implementation,
                                  generator=self.generator,
                                  max_chunk_elements=self.engine.crossbar.max_chunk_elements)
            chip = acc.mul_((step * layer.weight_scale.detach()).reshape(1, -1, 1, 1))
            if layer.bias is not None:
                chip.add_(layer.bias.reshape(1, -1, 1, 1))
        if not torch.is_grad_enabled() or not out.requires_grad:
            return torch.empty_like(out).copy_(chip)  # laid out as the float pass's
        # The chip's value exactly (out - out is 0), the float output's gradient.
        return (out - out.detach()).add_(chip)
