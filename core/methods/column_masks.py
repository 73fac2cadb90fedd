"""XBM and XMA: a learned column mask on every frozen PE, no weight rewritten.

XMA (Zhang et al. 2022b) learns the tier-2 shift mask ``{0, 1/8, 1/4, 1/2, 1}``
on every PE; XBM (Zhang et al. 2022a) is the same with N = 0 shift levels, a
binary column mask. Both learn the mask logits with the Gumbel-sigmoid of
:mod:`core.methods.gumbel`, plus the task head and BatchNorm affine terms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from core.datasets import TaskDataset
from core.errors import ConfigError
from core.methods.common import AdaptationResult, RunOptions, TrainConfig
from core.methods.gumbel import ColumnMask
from core.methods.task_model import CrossbarAdapter, TaskModel, new_task_model, train_task_model
from core.model import CrossbarModel

__all__ = ["ColumnMaskConfig", "HeadOnlyConfig", "XmaConfig", "adapt_column_mask",
           "adapt_head_only", "column_masks_for"]


@dataclass(frozen=True)
class ColumnMaskConfig:
    """The learnable tier-2 mask."""

    shift_levels: int | None = None
    """N of the learned mask (None: the chip's, 3 by default; 0: binary)."""
    temperature: float = 1.0
    """Gumbel-sigmoid temperature T: the soft sample's slope, i.e. the gradient scale."""
    init_logit: float = 8.0
    """Starting logit: the served mask starts at all 1 and a column samples 1/2 (0 for XBM)
    in 0.03% of training steps. Lower starts trained under more sampling noise than the
    noise-free served mask has, which cost validation accuracy: 12% of columns per step at
    2.0, 1.8% at 4.0 (docs/adaptation.md)."""
    lr: float = 1e-1
    """Adam learning rate of the logits: a logit must be able to cross 0 (and reach the
    shift levels below it) within a few hundred steps."""

    def __post_init__(self) -> None:
        if self.shift_levels is not None and not 0 <= self.shift_levels <= 7:
            raise ConfigError(f"shift_levels must be in 0..7, got {self.shift_levels}")
        if not self.temperature > 0 or not self.lr > 0:
            raise ConfigError("the mask temperature and learning rate must be > 0")


@dataclass(frozen=True)
class XmaConfig:
    """XMA (shift mask) or, with ``mask.shift_levels = 0``, XBM (binary column mask)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    mask: ColumnMaskConfig = field(default_factory=ColumnMaskConfig)


@dataclass(frozen=True)
class HeadOnlyConfig:
    """Only digital state: the head and the BatchNorm affine terms (a reference point)."""

    train: TrainConfig = field(default_factory=TrainConfig)


def column_masks_for(task_model: TaskModel, mask: ColumnMaskConfig) -> dict[str, ColumnMask]:
    levels = task_model.shift_levels if mask.shift_levels is None else mask.shift_levels
    if levels > task_model.shift_levels:
        raise ConfigError(f"a {levels}-level mask does not fit the chip's "
                          f"{task_model.shift_levels} shift levels")
    return {
        m.name: ColumnMask(m.row_groups, m.out_channels, shift_levels=levels,
                           temperature=mask.temperature, init_logit=mask.init_logit)
        for m in task_model.mapping.crossbar_layers
    }


def adapt_column_mask(model: CrossbarModel, data: TaskDataset, task_id: str,
                      config: XmaConfig, options: RunOptions, method: str = "xma"
                      ) -> AdaptationResult:
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train)
    masks = column_masks_for(task_model, config.mask)
    task_model.set_adapters({n: CrossbarAdapter(task_model.source_layer(n), column_mask=m)
                             for n, m in masks.items()})
    groups = [{"params": [m.logits for m in masks.values()], "lr": config.mask.lr}]
    return train_task_model(method, task_model, groups, data, task_id, config, config.train,
                            options, started)


def adapt_head_only(model: CrossbarModel, data: TaskDataset, task_id: str,
                    config: HeadOnlyConfig, options: RunOptions) -> AdaptationResult:
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train)
    return train_task_model("head_bn", task_model, [], data, task_id, config, config.train,
                            options, started)
