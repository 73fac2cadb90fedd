"""Quantization-aware distillation of the frozen backbone from its fp32 teacher.

Naive 4-bit post-training quantization destroys MobileNetV2's features (the
pooled features' relative error is about 1.0). The backbone is programmed once
for every task, so it is worth a one-time offline repair: the 4-bit student
learns its latent weights, weight scales and activation steps (LSQ) to match
the fp32 teacher's pooled features and ImageNet logits on unlabeled, augmented
crops of the bundled photos. No task data is used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.model import CrossbarModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the one-time backbone distillation."""

    steps: int = 600
    batch_size: int = 32
    image_size: int = 64
    """Resolution of the crops (the tasks' input size)."""
    lr: float = 2e-4
    logit_weight: float = 1.0
    """Weight of the KL term on the teacher's ImageNet logits (features always count 1)."""
    pool_size: int = 4096
    """Distinct augmented crops generated up front."""
    seed: int = 0


def distill_backbone(
    student: CrossbarModel,
    teacher: nn.Module,
    teacher_head: nn.Module,
    images: Tensor,
    config: DistillConfig,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the student in place; returns the loss per step."""
    generator = torch.Generator().manual_seed(config.seed)
    student.eval()  # BatchNorm keeps the teacher's statistics; quantizers use the STE path
    teacher.eval()
    params: list[nn.Parameter] = []
    steps: list[nn.Parameter] = []
    for _, layer in student.layers():
        params += layer.start_weight_training()
        steps.append(layer.input_quant.step)
    optimizer = torch.optim.Adam(
        [{"params": params}, {"params": steps, "lr": config.lr * 5}], lr=config.lr
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, config.steps)))
    )
    losses: list[float] = []
    started = time.perf_counter()
    try:
        for step in range(config.steps):
            idx = torch.randint(len(images), (config.batch_size,), generator=generator)
            x = images[idx]
            with torch.no_grad():
                target = teacher.forward_features(x)
                target_logits = teacher_head(target)
            feats = student(x)
            loss = F.mse_loss(feats, target) / target.pow(2).mean().clamp_min(1e-8)
            if config.logit_weight:
                kl = F.kl_div(
                    F.log_softmax(teacher_head(feats), 1), F.log_softmax(target_logits, 1),
                    log_target=True, reduction="batchmean",
                )
                loss = loss + config.logit_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for p in steps:
                    p.clamp_(min=1e-6)
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
            elif step % 50 == 0:
                logger.info("distill step %d loss %.4f (%.0f s)", step, losses[-1],
                            time.perf_counter() - started)
    finally:
        for _, layer in student.layers():
            layer.finish_weight_training()
    return losses
