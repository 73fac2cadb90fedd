"""Quantization-aware distillation of the frozen backbone from its fp32 teacher.

Naive 4-bit post-training quantization damages MobileNetV2's features (the
pooled features' relative error is about 1.0). The backbone is programmed once
for every task, so it is worth a one-time offline repair: the 4-bit student
learns its latent weights, weight scales and activation steps (LSQ) to match
the fp32 teacher's output of every stage and its pooled features on unlabeled,
augmented crops of the bundled photos. No task data is used. Matching every
stage keeps the student close to the teacher everywhere, which is what tasks
on other image distributions need; matching ImageNet logits instead made
linear probes on the task datasets worse (docs/results.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.backbones import Backbone
from core.learning.optim import adam
from core.nn.model import CrossbarModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Settings of the one-time backbone distillation."""

    steps: int = 800
    batch_size: int = 32
    image_size: int = 64
    """Resolution of the crops (the tasks' input size)."""
    lr: float = 1e-4
    logit_weight: float = 0.0
    """Weight of a KL term on the teacher's ImageNet logits. Off by default: matching
    logits on photo crops specialises the features to photos and cost 3.5 points of
    linear-probe accuracy on Animal-MNIST (docs/results.md)."""
    train_batchnorm: bool = True
    """Also learn the digital BatchNorm affine terms (statistics stay the teacher's)."""
    block_weight: float = 1.0
    """Weight of matching every stage's output (``features.i``), normalised per stage."""
    pool_size: int = 4096
    """Distinct augmented crops generated up front."""
    seed: int = 0


def normalised_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error relative to the teacher's energy, so every stage weighs alike."""
    return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-8)


def feature_stages(model: nn.Module) -> list[nn.Module]:
    """The top-level blocks of the feature extractor, whose outputs are matched."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return list(features)
    return [getattr(model, n) for n in ("layer1", "layer2", "layer3", "layer4")
            if hasattr(model, n)]


def distill_backbone(
    student: CrossbarModel,
    teacher: Backbone,
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
    if config.train_batchnorm:
        for module in student.body.modules():
            if isinstance(module, nn.BatchNorm2d):
                params += [module.weight, module.bias]
    groups: list[dict[str, Any]] = [{"params": params}, {"params": steps, "lr": config.lr * 5}]
    optimizer = adam(groups, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, config.steps)))
    )
    losses: list[float] = []
    started = time.perf_counter()
    student_maps: list[Tensor] = []
    teacher_maps: list[Tensor] = []
    hooks = []
    if config.block_weight:
        hooks += [m.register_forward_hook(lambda _m, _i, out: student_maps.append(out))
                  for m in feature_stages(student.body)]
        hooks += [m.register_forward_hook(lambda _m, _i, out: teacher_maps.append(out))
                  for m in feature_stages(teacher)]
    try:
        for step in range(config.steps):
            idx = torch.randint(len(images), (config.batch_size,), generator=generator)
            x = images[idx]
            student_maps.clear()
            teacher_maps.clear()
            with torch.no_grad():
                target = teacher.forward_features(x)
                target_logits = teacher_head(target)
            feats = student(x)
            loss = normalised_mse(feats, target)
            if config.block_weight:
                block = sum(
                    normalised_mse(s, t)
                    for s, t in zip(student_maps, teacher_maps, strict=True)
                )
                loss = loss + config.block_weight * block / max(1, len(student_maps))
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
        for hook in hooks:
            hook.remove()
        for _, layer in student.layers():
            layer.finish_weight_training()
    return losses
