"""The optimizer every learning method uses."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.graph import increment_version


def adam(params: Any, **options: Any) -> torch.optim.Adam:
    """Adam on torch's fused kernel: one call per step for all the parameters instead of
    about ten per tensor (an XMA2 task model's 176 tensors: 0.9 against 6.6 ms per step).

    The fused kernel writes the parameters without counting the write in their version
    counters, which the models' caches of derived terms (BatchNorm terms folded into the
    periphery, say) read to see a change: each step counts it itself."""
    optimizer = torch.optim.Adam(params, fused=True, **options)

    def count_the_writes(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        increment_version([p for group in optimizer.param_groups for p in group["params"]])

    optimizer.register_step_post_hook(count_the_writes)
    return optimizer
