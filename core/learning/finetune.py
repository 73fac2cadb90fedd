"""Fine-tuning baselines: the upper bounds that rewrite the backbone.

- ``finetune_qat``: every crossbar PE becomes a spare PE (a 4-bit task state that
  rewrites all PEs); codes start from the backbone's and are trained with
  straight-through rounding at the backbone's per-channel scale, with the head
  and BatchNorm affine terms. Depthwise layers (digital) stay frozen: a task
  state has no place for them.
- ``finetune_fp32``: the fp32 ImageNet MobileNetV2 with every weight trained (no
  quantization). It cannot be a 4-bit task state; only its accuracy is reported.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.backbones import Backbone, build_backbone
from core.data.datasets import TaskDataset
from core.errors import ConfigError
from core.learning.common import (
    AdaptationResult,
    RunOptions,
    TrainConfig,
    accuracy,
    config_dict,
    deterministic,
    fit,
    to_channels_last,
    warm_start_head,
)
from core.learning.task_model import (
    CrossbarAdapter,
    LayerAdapter,
    new_task_model,
    train_task_model,
)
from core.nn.model import CrossbarModel
from core.task_state import TaskState

__all__ = ["Fp32FinetuneConfig", "QatFinetuneConfig", "adapt_finetune_fp32",
           "adapt_finetune_qat"]


@dataclass(frozen=True)
class QatFinetuneConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_codes: float = 3e-2
    """Adam learning rate of the latent codes, in units of one weight level (as XMA2's
    spare PEs)."""

    def __post_init__(self) -> None:
        if not self.lr_codes > 0:
            raise ConfigError(f"lr_codes must be > 0, got {self.lr_codes}")


@dataclass(frozen=True)
class Fp32FinetuneConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_backbone: float = 1e-4
    """Adam learning rate of every fp32 backbone weight."""

    def __post_init__(self) -> None:
        if not self.lr_backbone > 0:
            raise ConfigError(f"lr_backbone must be > 0, got {self.lr_backbone}")


def adapt_finetune_qat(model: CrossbarModel, data: TaskDataset, task_id: str,
                       config: QatFinetuneConfig, options: RunOptions, *,
                       initial: TaskState | None = None) -> AdaptationResult:
    started = time.perf_counter()
    task_model = new_task_model(model, data, config.train, task_id, initial)
    adapters = {
        m.name: CrossbarAdapter(task_model.source_layer(m.name),
                                pe_mask=torch.ones(m.row_groups, m.col_groups, dtype=torch.bool))
        for m in task_model.mapping.crossbar_layers
    }
    task_model.set_adapters(dict[str, LayerAdapter](adapters))
    groups = [{"params": [a.spare_latent for a in adapters.values()], "lr": config.lr_codes}]
    return train_task_model("finetune_qat", task_model, groups, data, task_id, config,
                            config.train, options, started, initial=initial)


class Fp32Classifier(nn.Module):
    """The fp32 backbone's features with a new head; BatchNorm keeps its statistics."""

    def __init__(self, backbone: Backbone, num_classes: int, channels_last: bool) -> None:
        super().__init__()
        self.body = copy.deepcopy(backbone).float()
        self.channels_last = channels_last
        if channels_last:
            self.body = to_channels_last(self.body)
        features = int(getattr(self.body, "feature_dim", 0)) or int(
            self.body.forward_features(torch.zeros(1, 3, 32, 32)).shape[1])
        self.head = nn.Linear(features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.body.eval()

    def train(self, mode: bool = True) -> Fp32Classifier:
        super().train(mode)
        self.body.eval()  # frozen statistics, as for every 4-bit method
        return self

    def features(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features: Tensor = self.body.forward_features(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.features(x), self.head.weight, self.head.bias)


def adapt_finetune_fp32(model: CrossbarModel, data: TaskDataset, task_id: str,
                        config: Fp32FinetuneConfig, options: RunOptions,
                        fp32_backbone: Backbone | None = None) -> AdaptationResult:
    """``model`` only names the backbone; its fp32 ImageNet weights are loaded (or passed)."""
    started = time.perf_counter()
    backbone = fp32_backbone if fp32_backbone is not None else build_backbone(
        model.backbone_name)
    classifier = Fp32Classifier(backbone, len(data.classes), config.train.channels_last)
    with torch.no_grad():
        warm_start_head(classifier.features, classifier.head, data.train, config.train)
    groups = [{"params": list(classifier.head.parameters()), "lr": config.train.lr_head},
              {"params": list(classifier.body.parameters()), "lr": config.lr_backbone}]
    cfg = config_dict(config)
    with deterministic():
        steps, history = fit(classifier, groups, data.train, config.train, options,
                             description=f"finetune_fp32 on {data.spec.name}",
                             checkpoint_meta={"method": "finetune_fp32", "config": cfg,
                                              "dataset": data.spec.name})
        val = accuracy(classifier, data.val)
    return AdaptationResult("finetune_fp32", None, val, steps, time.perf_counter() - started,
                            cfg, history, {"task_id": task_id}, trained_model=classifier)
