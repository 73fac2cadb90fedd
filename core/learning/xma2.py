"""XMA2: tier-1 spare PEs (SNIP-ranked, 4-bit QAT) + tier-2 shift mask on the other PEs.

1. Warm-start the head on frozen features (so the ranking sees a real loss).
2. Rank every crossbar PE by ``|dL/dm_PE|`` on one mini-batch; the top ``P``
   become spare PEs whose codes start from the backbone's and are trained with
   straight-through rounding at the backbone's per-channel scale.
A warm start from a served task (``initial``) skips 1 and 2: its head, PEs, codes and
masks are where training starts.

3. Train spare codes, the column shift mask of the frozen PEs (one logit per column,
   trained on the mask that is served), the head and the BatchNorm affine terms
   together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from core.data.datasets import TaskDataset
from core.errors import ConfigError
from core.learning.column_masks import ColumnMaskConfig, column_masks_for, mask_training
from core.learning.common import AdaptationResult, RunOptions, TrainConfig, seeded_generator
from core.learning.ranking import pe_sensitivity, select_top_pes
from core.learning.task_model import (
    CrossbarAdapter,
    LayerAdapter,
    initial_pe_masks,
    new_task_model,
    train_task_model,
)
from core.nn.model import CrossbarModel
from core.task_state import TaskState

__all__ = ["Xma2Config", "adapt_xma2"]


@dataclass(frozen=True)
class Xma2Config:
    """XMA2 settings; ``pe_fraction`` is the paper's P."""

    train: TrainConfig = field(default_factory=TrainConfig)
    mask: ColumnMaskConfig = field(default_factory=ColumnMaskConfig)
    pe_fraction: float = 0.1
    """Share of all crossbar PEs replaced by spare PEs (P = 10%)."""
    lr_spare: float = 3e-2
    """Adam learning rate of the spare-PE latent codes, in units of one weight level. At
    1e-2 no code crossed a rounding boundary in 186 steps (docs/adaptation.md)."""
    ranking_batch_size: int = 64
    """Images of the one mini-batch that ranks the PEs."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.pe_fraction <= 1.0:
            raise ConfigError(f"pe_fraction must be in [0, 1], got {self.pe_fraction}")
        if not self.lr_spare > 0 or self.ranking_batch_size < 1:
            raise ConfigError("lr_spare must be > 0 and ranking_batch_size >= 1")


def adapt_xma2(model: CrossbarModel, data: TaskDataset, task_id: str, config: Xma2Config,
               options: RunOptions, *, initial: TaskState | None = None) -> AdaptationResult:
    """With ``initial``, its replaced PEs are kept (no ranking; ``pe_fraction`` unused)."""
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train, task_id, initial)
    if initial is None:
        order = torch.randperm(len(data.train),
                               generator=seeded_generator(config.train.seed, 3, 0))
        x, y = data.train.batch(order[: config.ranking_batch_size])
        pe_masks = select_top_pes(pe_sensitivity(task_model, x, y), config.pe_fraction)
    else:
        pe_masks = initial_pe_masks(task_model, initial)
    masks = column_masks_for(task_model, config.mask)
    adapters = {n: CrossbarAdapter(task_model.source_layer(n), pe_mask=pe_masks[n],
                                   column_mask=masks.get(n))
                for n in task_model.crossbar_layer_names()}
    task_model.set_adapters(dict[str, LayerAdapter](adapters))
    mask_groups, before_step = mask_training(masks, config.mask)
    groups = [{"params": [a.spare_latent for a in adapters.values()], "lr": config.lr_spare},
              *mask_groups]
    replaced = sum(int(m.sum()) for m in pe_masks.values())
    details = {"replaced_pes": replaced,
               "total_pes": sum(m.numel() for m in pe_masks.values()),
               "warm_start_and_ranking_seconds": round(time.perf_counter() - started, 2),
               "replaced_per_layer": {n: int(m.sum()) for n, m in pe_masks.items() if m.any()}}
    return train_task_model("xma2", task_model, groups, data, task_id, config, config.train,
                            options, started, details, before_step=before_step,
                            initial=initial)
