"""A task's state decoded once into what the chip's calls read, cached per task."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.chip.energy import OpCounts
from core.engine.programmer import ChipProgrammer
from core.nn.forward_context import ForwardContext
from core.nn.periphery import DigitalNorm
from core.ops.crossbar import CrossbarProgram
from core.task_state import TaskState


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
    norm_terms: dict[str, Tensor] = field(default_factory=dict)
    """Per module, the four terms a mixed batch gathers (``[4, C]``), built on first use."""
    changed: dict[str, tuple[Tensor, Tensor]] | None = None
    """Per layer: output channels whose codes differ from the backbone's and the task's
    codes of those channels as a ``[Cin * kh * kw, c]`` matrix; built on first mixed
    batch."""

    def chip_programs(self, programmer: ChipProgrammer) -> dict[str, CrossbarProgram]:
        """The task's crossbar-fidelity programs, built on first use."""
        if self.programs is None:
            self.programs = programmer.task_programs(self.task)
        return self.programs


def by_module(digital: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{"a.b.weight": w}`` -> ``{"a.b": {"weight": w}}``."""
    modules: dict[str, dict[str, Tensor]] = {}
    for name, value in digital.items():
        module_name, _, attr = name.rpartition(".")
        modules.setdefault(module_name, {})[attr] = value
    return modules


NORM_TERMS = ("running_mean", "running_var", "weight", "bias")


def norm_terms(prepared: PreparedTask, module_name: str, module: DigitalNorm) -> Tensor:
    """A task's terms of one BatchNorm as ``[4, C]`` (the backbone's where it has none).

    A call hands the task's to the module (a mixed batch one per block of samples,
    :class:`core.nn.forward_context.NormCall`); the tensor is kept, so the module's folded
    terms of it are too.
    """
    cached = prepared.norm_terms.get(module_name)
    if cached is None:
        own = prepared.norms.get(module_name, {})
        cached = torch.stack([own.get(attr, getattr(module, attr)).detach().float()
                              for attr in NORM_TERMS])
        prepared.norm_terms[module_name] = cached
    return cached
