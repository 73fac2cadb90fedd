"""What the chip does for one image of a task: operations by kind, for the energy model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from core.chip.config import CrossbarConfig
from core.chip.energy import OpCounts, count_head_ops, count_layer_ops
from core.engine.prepared import PreparedTask
from core.nn.layers import CrossbarConv2d
from core.nn.model import CrossbarModel


class CostCounter:
    """Counts a task's operations per image (cached per task and input size)."""

    def __init__(self, model: CrossbarModel, chip: CrossbarConfig) -> None:
        self.model = model
        self.chip = chip
        self._layers: dict[str, CrossbarConv2d] = dict(model.layers())
        self._positions: dict[tuple[int, int], dict[str, int]] = {}

    def ops_per_image(self, prepared: PreparedTask, image_size: tuple[int, int]) -> OpCounts:
        """Operations the chip performs for one image of this task at this input size."""
        cached = prepared.ops_per_image.get(image_size)
        if cached is not None:
            return cached
        positions = self.output_positions(image_size)
        task = prepared.task
        total = OpCounts()
        for name, layer in self._layers.items():
            assert layer.mapping is not None
            state = task.layers.get(name)
            total = total + count_layer_ops(
                layer.mapping, images=1, positions_per_image=positions[name],
                config=self.chip,
                column_codes=None if state is None else state.column_codes,
                pe_mask=None if state is None else state.pe_mask,
            )
        head = task.head.weight
        total = total + count_head_ops(head.shape[1], head.shape[0], images=1)
        prepared.ops_per_image[image_size] = total
        return total

    def output_positions(self, image_size: tuple[int, int]) -> dict[str, int]:
        """Output pixels of every layer for one image (input vectors of its crossbars)."""
        if image_size not in self._positions:
            sizes: dict[str, int] = {}

            def record(name: str) -> Callable[..., None]:
                def hook(_module: nn.Module, _inputs: object, out: Tensor) -> None:
                    sizes[name] = out.shape[-2] * out.shape[-1]
                return hook

            hooks = [layer.register_forward_hook(record(name))
                     for name, layer in self._layers.items()]
            try:
                with torch.no_grad():
                    self.model(torch.zeros(1, 3, *image_size))
            finally:
                for hook in hooks:
                    hook.remove()
            self._positions[image_size] = sizes
        return self._positions[image_size]
