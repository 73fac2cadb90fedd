"""XBM and XMA: a learned column mask on every frozen PE, no weight rewritten.

XMA (Zhang et al. 2022b) learns the tier-2 shift mask ``{0, 1/8, 1/4, 1/2, 1}``
on every PE; XBM (Zhang et al. 2022a) is the same with N = 0 shift levels, a
binary column mask. Both learn the mask (by default a categorical choice of shift
level per column, :mod:`core.methods.shift_mask`), the task head and the BatchNorm
affine terms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.datasets import TaskDataset
from core.errors import ConfigError
from core.methods.common import AdaptationResult, RunOptions, TrainConfig
from core.methods.gumbel import ColumnMask
from core.methods.shift_mask import CategoricalColumnMask, anneal
from core.methods.task_model import CrossbarAdapter, TaskModel, new_task_model, train_task_model
from core.model import CrossbarModel

__all__ = ["ColumnMaskConfig", "HeadOnlyConfig", "XmaConfig", "adapt_column_mask",
           "adapt_head_only", "column_masks_for", "mask_training"]


MASK_KINDS = ("categorical", "sigmoid")
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class ColumnMaskConfig:
    """The learnable tier-2 mask.

    ``kind="categorical"`` (the default) learns one logit per shift level with a
    straight-through Gumbel-softmax whose noise is annealed to 0 (:mod:`.shift_mask`);
    ``kind="sigmoid"`` is the earlier binary Gumbel-sigmoid with a rounded real part
    (:mod:`.gumbel`), which left every column at 1 in runs of a few hundred steps.
    """

    kind: str = "categorical"
    """``categorical`` (logit per level) or ``sigmoid`` (binary logit + rounded real part)."""
    learn: bool = True
    """False freezes every column at 1 (no mask parameters, no sampling): the ablation."""
    shift_levels: int | None = None
    """N of the learned mask (None: the chip's, 3 by default; 0: binary)."""
    prior: float = 3.0
    """Categorical: starting logit of the level 1 above the other levels' 0. At the start a
    column samples another level in ``(N + 1) / (N + 1 + e**prior)`` of steps (17% for
    N = 3), falling to 0 as the noise anneals; and a column leaves 1 in the served mask
    once another logit overtakes it (about ``prior / (2 lr)`` steps of consistent push)."""
    temperature: float = 1.0
    """Starting temperature T: the softmax's (sigmoid's) slope, i.e. the gradient scale."""
    final_temperature: float = 0.5
    """Categorical: T at the end of the noise annealing (geometric decay), so the
    straight-through gradient comes from sharper probabilities as the mask settles."""
    noise: float = 1.0
    """Categorical: scale of the Gumbel noise at the start of training."""
    noise_until: float = 2 / 3
    """Categorical: share of training after which the noise is 0 and T is final: the rest
    of the run trains on exactly the mask that will be served (the last epoch of 3)."""
    l1: float = 0.0
    """Categorical: weight of the mean expected mask value added to the loss (pressure
    toward cheaper levels; a column at 0 needs no ADC conversion). 0: none."""
    init_logit: float = 8.0
    """Sigmoid: starting logit. At 8 the served mask starts at all 1 and a column samples
    1/2 (0 for XBM) in 0.03% of steps, and no column left 1 in 138 steps."""
    lr: float = 5e-2
    """Adam learning rate of the logits (moves a logit about this much per step)."""
    lr_schedule: str = "cosine"
    """``cosine`` (decay to 0 over the run, so the mask settles) or ``constant``."""

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
        if self.noise < 0 or self.l1 < 0 or not 0 <= self.noise_until <= 1:
            raise ConfigError("mask noise and l1 must be >= 0 and noise_until in [0, 1]")

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
    layers = task_model.mapping.crossbar_layers
    if mask.kind == "sigmoid":
        return {m.name: ColumnMask(m.row_groups, m.out_channels, shift_levels=levels,
                                   temperature=mask.temperature, init_logit=mask.init_logit)
                for m in layers}
    return {m.name: CategoricalColumnMask(m.row_groups, m.out_channels, shift_levels=levels,
                                          prior=mask.prior, temperature=mask.temperature,
                                          noise=mask.noise, l1=mask.l1)
            for m in layers}


def mask_training(masks: dict[str, ColumnMaskModule], mask: ColumnMaskConfig
                  ) -> tuple[list[dict[str, Any]], Callable[[float], None] | None]:
    """The optimizer group of the mask logits and the per-step annealing hook."""
    if not masks:
        return [], None
    group = {"params": [m.logits for m in masks.values()], "lr": mask.lr,
             "schedule": mask.lr_schedule}
    annealed = [m for m in masks.values() if isinstance(m, CategoricalColumnMask)]

    def before_step(progress: float) -> None:
        temperature, noise = mask.schedule(progress)
        for m in annealed:
            m.set_schedule(temperature, noise)

    return [group], before_step if annealed else None


def adapt_column_mask(model: CrossbarModel, data: TaskDataset, task_id: str,
                      config: XmaConfig, options: RunOptions, method: str = "xma"
                      ) -> AdaptationResult:
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train)
    masks = column_masks_for(task_model, config.mask)
    task_model.set_adapters({n: CrossbarAdapter(task_model.source_layer(n),
                                                column_mask=masks.get(n))
                             for n in task_model.crossbar_layer_names()})
    groups, before_step = mask_training(masks, config.mask)
    return train_task_model(method, task_model, groups, data, task_id, config, config.train,
                            options, started, before_step=before_step)


def adapt_head_only(model: CrossbarModel, data: TaskDataset, task_id: str,
                    config: HeadOnlyConfig, options: RunOptions) -> AdaptationResult:
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train)
    return train_task_model("head_bn", task_model, [], data, task_id, config, config.train,
                            options, started)
