"""XBM and XMA: a learned column mask on every frozen PE, no weight rewritten.

XMA (Zhang et al. 2022b) learns the tier-2 shift mask ``{0, 1/8, 1/4, 1/2, 1}``
on every PE; XBM (Zhang et al. 2022a) is the same with N = 0 shift levels, a
binary column mask. Both learn the mask (by default one logit per column that walks
down the levels, :mod:`core.learning.gumbel`; optionally a categorical choice of level,
:mod:`core.learning.shift_mask`), the task head and the BatchNorm affine terms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.data.datasets import TaskDataset
from core.errors import ConfigError
from core.learning.common import AdaptationResult, RunOptions, TrainConfig
from core.learning.gumbel import ColumnMask
from core.learning.shift_mask import CategoricalColumnMask, anneal
from core.learning.task_model import CrossbarAdapter, TaskModel, new_task_model, train_task_model
from core.nn.model import CrossbarModel
from core.task_state import TaskState

__all__ = ["ColumnMaskConfig", "HeadOnlyConfig", "XmaConfig", "adapt_column_mask",
           "adapt_head_only", "column_masks_for", "mask_training", "new_column_mask"]


MASK_KINDS = ("threshold", "categorical")
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class ColumnMaskConfig:
    """The learnable tier-2 mask.

    ``kind="threshold"`` (paper 3.3.1) learns one logit ``m`` per column: 1 where
    ``m > 0``, else ``sigmoid(m)`` rounded to the nearest lower shift level, sampled in
    training by a Gumbel-sigmoid whose noise is annealed to 0. ``kind="categorical"``
    learns one logit per level (:mod:`.shift_mask`).
    """

    kind: str = "threshold"
    """``threshold`` (one logit per column) or ``categorical`` (one logit per level)."""
    learn: bool = True
    """False freezes every column at 1 (no mask parameters, no sampling): the ablation."""
    shift_levels: int | None = None
    """N of the learned mask (None: the chip's, 3 by default; 0: binary)."""
    init_logit: float = 1.0
    """Threshold: starting logit, near the decision boundary so that a column whose
    gradient keeps its sign leaves 1 within about ``init_logit / lr`` steps. The earlier
    start of 8 at lr 0.1 left every column at 1 after 138 steps."""
    prior: float = 3.0
    """Categorical: starting logit of the level 1 above the other levels' 0."""
    temperature: float = 1.0
    """Starting temperature T: the sigmoid's (softmax's) slope, i.e. the gradient scale."""
    final_temperature: float = 1.0
    """T at the end of the annealing (geometric decay from ``temperature``)."""
    noise: float = 0.0
    """Scale of the Gumbel noise at the start of training (1: the plain Gumbel-sigmoid).
    The noise is sampled in training and absent from the served mask; at 0 every step
    trains on exactly the mask that will be served."""
    noise_until: float = 2 / 3
    """Share of training after which the noise is 0 and T final (> 1: the noise never
    reaches 0)."""
    l1: float = 0.0
    """Weight of the penalty on the mean mask probability added to the loss (pressure
    toward cheaper levels; a column at 0 needs no ADC conversion). 0: none."""
    lr: float = 0.2
    """Adam learning rate of the logits (moves a logit about this much per step). At 5e-2
    only 0.08% of columns left 1 in 93 steps; at 0.2 without warm-up 17% left 1 in the
    first epoch and accuracy collapsed (docs/adaptation.md)."""
    lr_schedule: str = "cosine"
    """``cosine`` (decay to 0 over the run, so the mask settles) or ``constant``."""
    lr_warmup: float = 0.33
    """Share of training over which the mask learning rate rises linearly from 0 (the
    first epoch of 3). Adam's first steps move every logit by about the full rate
    whatever the gradient's size, so without it a start near 0 at a high rate flips
    columns together before the head and BatchNorm terms have adapted."""

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ConfigError(f"mask kind must be one of {', '.join(MASK_KINDS)}, "
                              f"got {self.kind!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"mask lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if self.shift_levels is not None and not 0 <= self.shift_levels <= 7:
            raise ConfigError(f"shift_levels must be in 0..7, got {self.shift_levels}")
        if not (self.temperature > 0 and self.final_temperature > 0 and self.lr > 0):
            raise ConfigError("the mask temperatures and learning rate must be > 0")
        if not 0 <= self.lr_warmup < 1:
            raise ConfigError(f"mask lr_warmup must be in [0, 1), got {self.lr_warmup}")
        if self.noise < 0 or self.l1 < 0 or self.noise_until < 0:
            raise ConfigError("mask noise, l1 and noise_until must be >= 0")

    def schedule(self, progress: float) -> tuple[float, float]:
        """(temperature, noise scale) at ``progress`` in [0, 1] of training."""
        return (anneal(self.temperature, self.final_temperature, progress, self.noise_until),
                anneal(self.noise, 0.0, progress, self.noise_until))


@dataclass(frozen=True)
class XmaConfig:
    """XMA (shift mask) or, with ``mask.shift_levels = 0``, XBM (binary column mask)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    mask: ColumnMaskConfig = field(default_factory=ColumnMaskConfig)


@dataclass(frozen=True)
class HeadOnlyConfig:
    """Only digital state: the head and the BatchNorm affine terms (a reference point)."""

    train: TrainConfig = field(default_factory=TrainConfig)


ColumnMaskModule = ColumnMask | CategoricalColumnMask


def column_masks_for(task_model: TaskModel, mask: ColumnMaskConfig
                     ) -> dict[str, ColumnMaskModule]:
    """One learnable mask per crossbar layer (none when ``mask.learn`` is False)."""
    levels = task_model.shift_levels if mask.shift_levels is None else mask.shift_levels
    if levels > task_model.shift_levels:
        raise ConfigError(f"a {levels}-level mask does not fit the chip's "
                          f"{task_model.shift_levels} shift levels")
    if not mask.learn:
        return {}
    return {m.name: new_column_mask(m.row_groups, m.out_channels, levels, mask)
            for m in task_model.mapping.crossbar_layers}


def new_column_mask(row_groups: int, out_channels: int, shift_levels: int,
                    mask: ColumnMaskConfig) -> ColumnMaskModule:
    """One layer's learnable mask of the configured kind."""
    if mask.kind == "threshold":
        return ColumnMask(row_groups, out_channels, shift_levels=shift_levels,
                          temperature=mask.temperature, init_logit=mask.init_logit,
                          noise=mask.noise, l1=mask.l1)
    return CategoricalColumnMask(row_groups, out_channels, shift_levels=shift_levels,
                                 prior=mask.prior, temperature=mask.temperature,
                                 noise=mask.noise, l1=mask.l1)


def mask_training(masks: dict[str, ColumnMaskModule], mask: ColumnMaskConfig
                  ) -> tuple[list[dict[str, Any]], Callable[[float], None] | None]:
    """The optimizer group of the mask logits and the per-step annealing hook."""
    if not masks:
        return [], None
    group = {"params": [m.logits for m in masks.values()], "lr": mask.lr,
             "schedule": mask.lr_schedule, "warmup": mask.lr_warmup}

    def before_step(progress: float) -> None:
        temperature, noise = mask.schedule(progress)
        for m in masks.values():
            m.set_schedule(temperature, noise)

    return [group], before_step


def adapt_column_mask(model: CrossbarModel, data: TaskDataset, task_id: str,
                      config: XmaConfig, options: RunOptions, method: str = "xma", *,
                      initial: TaskState | None = None) -> AdaptationResult:
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train, task_id, initial)
    masks = column_masks_for(task_model, config.mask)
    task_model.set_adapters({n: CrossbarAdapter(task_model.source_layer(n),
                                                column_mask=masks.get(n))
                             for n in task_model.crossbar_layer_names()})
    groups, before_step = mask_training(masks, config.mask)
    return train_task_model(method, task_model, groups, data, task_id, config, config.train,
                            options, started, before_step=before_step, initial=initial)


def adapt_head_only(model: CrossbarModel, data: TaskDataset, task_id: str,
                    config: HeadOnlyConfig, options: RunOptions, *,
                    initial: TaskState | None = None) -> AdaptationResult:
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train, task_id, initial)
    return train_task_model("head_bn", task_model, [], data, task_id, config, config.train,
                            options, started, initial=initial)
