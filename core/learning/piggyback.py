"""Piggyback (Mallya et al. 2018): an element-wise binary mask on every crossbar weight.

A real mask per weight (initialised to 1e-2) is thresholded at 5e-3 in the
forward pass, with the gradient passed straight through to the real mask;
Adam at 1e-4 and batch 32 are the public implementation's defaults. On the
chip a weight masked to 0 must be *written* as 0, so the task state is every
PE as a spare PE holding ``codes * mask``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.data.datasets import TaskDataset
from core.errors import ConfigError
from core.learning.common import AdaptationResult, RunOptions, TrainConfig
from core.learning.task_model import LayerAdapter, new_task_model, pe_blocks, train_task_model
from core.nn.layers import CrossbarConv2d
from core.nn.model import CrossbarModel
from core.ops.fold import fold_effective_weight, to_row_groups
from core.task_state import LayerTaskState, ones_code

__all__ = ["ElementMaskAdapter", "PiggybackConfig", "adapt_piggyback"]


@dataclass(frozen=True)
class PiggybackConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32))
    mask_init: float = 1e-2
    threshold: float = 5e-3
    lr_mask: float = 1e-4

    def __post_init__(self) -> None:
        if not self.lr_mask > 0:
            raise ConfigError(f"lr_mask must be > 0, got {self.lr_mask}")


class ElementMaskAdapter(LayerAdapter):
    """One real mask value per weight, binarised by a threshold (straight-through)."""

    codes: Tensor  # buffer of LayerAdapter: the backbone's weight codes

    def __init__(self, layer: CrossbarConv2d, init: float, threshold: float) -> None:
        super().__init__(layer)
        self.threshold = threshold
        self.real_mask = nn.Parameter(torch.full_like(self.codes, init))

    def binary_mask(self) -> Tensor:
        hard = (self.real_mask > self.threshold).to(self.real_mask.dtype)
        return hard + (self.real_mask - self.real_mask.detach())

    def fold(self, scale: Tensor, generator: torch.Generator | None, stochastic: bool) -> Tensor:
        return fold_effective_weight(self.codes * self.binary_mask(), scale, self.mapping)

    def export(self, chip_shift_levels: int) -> LayerTaskState:
        m = self.mapping
        with torch.no_grad():
            masked = (self.codes * (self.real_mask > self.threshold)).to(torch.int8)
        all_pes = torch.ones(m.row_groups, m.col_groups, dtype=torch.bool)
        spare = pe_blocks(to_row_groups(masked, m), m)[all_pes].contiguous()
        codes = torch.full((m.row_groups, m.out_channels), ones_code(chip_shift_levels),
                           dtype=torch.uint8)
        return LayerTaskState(all_pes, spare, codes)


def adapt_piggyback(model: CrossbarModel, data: TaskDataset, task_id: str,
                    config: PiggybackConfig, options: RunOptions) -> AdaptationResult:
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train, task_id)
    adapters = {n: ElementMaskAdapter(task_model.source_layer(n), config.mask_init,
                                      config.threshold)
                for n in task_model.crossbar_layer_names()}
    task_model.set_adapters(dict[str, LayerAdapter](adapters))
    groups = [{"params": [a.real_mask for a in adapters.values()], "lr": config.lr_mask}]
    result = train_task_model("piggyback", task_model, groups, data, task_id, config,
                              config.train, options, started)
    kept = sum(int((a.real_mask > a.threshold).sum()) for a in adapters.values())
    total = sum(a.real_mask.numel() for a in adapters.values())
    result.details.update({"mask_ones": kept, "mask_elements": total})
    return result
