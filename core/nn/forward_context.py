"""What one forward pass of the shared backbone computes, handed to its layers per call.

The engine serves many tasks on one model. A task's folded weights, its programmed
cells, its BatchNorm terms and the plan of a batch that mixes tasks belong to the call,
not to the modules: written into the layers, they would make the shared model's state
(its fingerprint, a concurrent caller's view) depend on which task ran last. The engine
builds a :class:`ForwardContext` and runs the model inside :func:`forward_context`; each
layer reads its own entry with :func:`current_forward_context`. Outside a context the
layers compute what their own parameters say (training, calibration, a task model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Generator, Tensor, nn

from core.chip.config import OperatorImplementation

if TYPE_CHECKING:
    from core.nn.layers import SampleChannels
    from core.ops.crossbar import CrossbarProgram


@dataclass(frozen=True, slots=True)
class LayerCall:
    """One crossbar layer's part of a call (None fields: the layer's own)."""

    codes: Tensor | None = None
    """The code-unit weight this call convolves (a task's folded weight)."""
    program: CrossbarProgram | None = None
    """Crossbar fidelity: the cells as programmed for this call's task."""
    block_programs: list[tuple[int, int, CrossbarProgram]] | None = None
    """Crossbar fidelity, batch mixing tasks: ``(start, stop, program)`` per block of
    rows, each read with its own task's programmed cells (the backbone's where the task
    keeps the layer), the whole batch in order."""
    sample_channels: SampleChannels | None = None
    """Batch mixing tasks: each task's codes of the layer, by task (the rows of each
    are the call's ``task_rows``)."""


@dataclass(frozen=True, slots=True)
class NormCall:
    """One BatchNorm's terms for a call: ``[4, C]`` (mean, var, weight, bias), one for
    the whole batch, or per task of a batch mixing tasks (on the call's ``task_rows``)."""

    terms: list[Tensor]


@dataclass(frozen=True)
class ForwardContext:
    """Everything one call of the shared model computes beyond the modules' own state."""

    layers: dict[nn.Module, LayerCall] = field(default_factory=dict)
    norms: dict[nn.Module, NormCall] = field(default_factory=dict)
    implementation: OperatorImplementation = OperatorImplementation.AUTO
    read_generator: Generator | None = None
    max_chunk_elements: int = 1 << 23
    task_rows: list[tuple[int, int]] | None = None
    """A batch mixing tasks, sorted by task: each task's rows ``(start, stop)``, in the
    order of the per-task lists of the layers' and norms' calls. Only these change from
    batch to batch of the same tasks, so the calls themselves are kept and reused."""


NO_LAYER_CALL = LayerCall()

_current: ContextVar[ForwardContext | None] = ContextVar("forward_context", default=None)


@contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """Run the model's layers with ``context`` for the duration of the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def current_forward_context() -> ForwardContext | None:
    """The engine's call, or None; always None in a pass that ``torch.compile`` traces (a
    training pass, which the engine never wraps, and which a context lookup would split)."""
    if torch.compiler.is_compiling():
        return None
    return _current.get()
