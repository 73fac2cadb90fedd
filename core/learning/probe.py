"""Linear probes: how much task-relevant information a frozen backbone's features keep.

A probe trains only a linear head on cached features, so comparing the fp32 and
the 4-bit backbone under the same probe isolates the quantization loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from core.data.datasets import ImageSplit
from core.learning.optim import adam


@torch.no_grad()
def extract_features(
    features: Callable[[Tensor], Tensor], split: ImageSplit, batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """Features and labels of every item of ``split``."""
    feats, labels = [], []
    for start in range(0, len(split), batch_size):
        x, y = split.batch(slice(start, start + batch_size))
        feats.append(features(x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(
    train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], *, num_classes: int,
    epochs: int = 30, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0,
) -> tuple[float, Tensor, Tensor]:
    """Train a standardised-input linear classifier; returns (test accuracy, weight, bias).

    The returned head works on raw (unstandardised) features.
    """
    generator = torch.Generator().manual_seed(seed)
    x, y = train
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = adam([weight, bias], lr=lr, weight_decay=weight_decay)
    batch = 256
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), batch):
            idx = order[start : start + batch]
            loss = F.cross_entropy(xs[idx] @ weight.t() + bias, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        raw_weight = weight / std
        raw_bias = bias - (mean / std) @ weight.t()
        test_x, test_y = test
        accuracy = float(((test_x @ raw_weight.t() + raw_bias).argmax(1) == test_y).float().mean())
    return accuracy, raw_weight.detach(), raw_bias.detach()
