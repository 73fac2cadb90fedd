"""Tier-1 PE ranking: which PEs a new task most needs to rewrite (SNIP on PE masks).

Every crossbar PE gets a multiplicative mask ``m_PE = 1`` on its weights; one
mini-batch of the new task gives ``dL/dm_PE``, the first-order change of the
loss if the PE were removed (Lee et al. 2018, paper 3.2.1). The normalised
magnitudes ``|g| / sum |g|`` are ranked over the whole network and the top
``round(P * PEs)`` become the task's spare PEs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError
from core.learning.task_model import LayerAdapter, TaskModel
from core.nn.layers import CrossbarConv2d
from core.ops.fold import fold_effective_weight
from core.task_state import LayerTaskState

__all__ = ["pe_sensitivity", "select_top_pes"]


class _PEMaskProbe(LayerAdapter):
    """Multiplies each PE's weights by a mask of ones whose gradient is the PE's score."""

    codes: Tensor  # buffer of LayerAdapter: the backbone's weight codes

    def __init__(self, layer: CrossbarConv2d) -> None:
        super().__init__(layer)
        m = self.mapping
        self.pe_mask = nn.Parameter(torch.ones(m.row_groups, m.col_groups))

    def fold(self, scale: Tensor, generator: torch.Generator | None, stochastic: bool) -> Tensor:
        m = self.mapping
        columns = self.pe_mask.repeat_interleave(m.outputs_per_pe, dim=1)[:, : m.out_channels]
        return fold_effective_weight(self.codes, scale, m, column_values=columns)

    def export(self, chip_shift_levels: int) -> LayerTaskState:
        raise NotImplementedError("a PE-mask probe is not a task")

    def chip_state(self, chip_shift_levels: int) -> LayerTaskState | None:
        return None  # its mask is all ones: the backbone's cells


def pe_sensitivity(task_model: TaskModel, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Normalised ``|dL/dm_PE|`` of every crossbar PE, ``[row_groups, col_groups]`` per layer,
    for one mini-batch; the task model's adapters are restored afterwards."""
    previous = task_model.current_adapters()
    probes = {name: _PEMaskProbe(task_model.source_layer(name))
              for name in task_model.crossbar_layer_names()}
    was_training = task_model.training
    task_model.set_adapters(dict[str, LayerAdapter](probes))
    task_model.eval()  # deterministic: no mask noise; BatchNorm uses its running statistics
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(task_model(x), y)
            names = list(probes)
            grads = torch.autograd.grad(loss, [probes[n].pe_mask for n in names])
    finally:
        task_model.set_adapters(previous)
        task_model.train(was_training)
    magnitudes = {n: g.abs() for n, g in zip(names, grads, strict=True)}
    total = sum(float(g.sum()) for g in magnitudes.values())
    if total <= 0:
        raise ConfigError("every PE gradient is zero: the head must be initialised before ranking")
    return {n: g / total for n, g in magnitudes.items()}


def select_top_pes(scores: dict[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """bool PE masks holding exactly the ``round(fraction * PEs)`` highest scores over all
    layers; ties go to the PE that comes first (layer order, row group, column group)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"the PE fraction must be in [0, 1], got {fraction}")
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).double() for n in names])
    k = round(fraction * flat.numel())
    order = torch.argsort(-flat, stable=True)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    masks, start = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = chosen[start : start + size].reshape(scores[n].shape)
        start += size
    return masks
