"""Runs the shared, frozen backbone for any registered task.

Each task's masks and spare PEs are folded once into effective weights
(:func:`core.ops.fold.fold_effective_weight`) and kept in a bounded LRU, so
switching between cached tasks is a pointer swap per layer and a forward pass
for a task costs what the plain quantized backbone costs. The engine is owned
by one worker; it is not thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.energy import (
    EnergyConfig,
    EnergyReport,
    OpCounts,
    count_head_ops,
    count_layer_ops,
    energy_of,
)
from core.errors import ConfigError, TaskNotFound, TaskStateError
from core.lru import LRUCache
from core.model import CrossbarModel
from core.ops.fold import fold_effective_weight
from core.task_state import TaskState, shift_values


@dataclass
class PreparedTask:
    """A task's state decoded into the tensors the forward pass uses."""

    task: TaskState
    weights: dict[str, Tensor]
    digital: dict[str, nn.Parameter | Tensor]
    prepare_seconds: float
    ops_per_image: dict[tuple[int, int], OpCounts] = field(default_factory=dict)


@dataclass
class EngineStats:
    switches: int = 0
    prepares: int = 0
    prepare_seconds: float = 0.0


class CrossbarEngine:
    """The emulated chip's compute path for many tasks on one backbone.

    Args:
        model: the calibrated, quantized backbone.
        max_prepared_tasks: how many tasks keep folded weights in memory.
        energy: per-operation energy constants (defaults derive from the crossbar config).
    """

    def __init__(
        self, model: CrossbarModel, *, max_prepared_tasks: int = 8,
        energy: EnergyConfig | None = None,
    ) -> None:
        if model.mapping is None:
            raise ConfigError("the backbone has no crossbar mapping: calibrate or load it first")
        self.model = model.eval()
        self.mapping = model.mapping
        self.energy_config = energy or EnergyConfig.for_crossbar(model.config)
        self.tasks: dict[str, TaskState] = {}
        self.prepared: LRUCache[str, PreparedTask] = LRUCache(max_prepared_tasks)
        self.active: str | None = None
        self.stats = EngineStats()
        self._layers = dict(model.layers())
        self._digital_names = self._overridable_names()
        self._digital_defaults: dict[str, nn.Parameter | Tensor] = {}
        self._positions: dict[tuple[int, int], dict[str, int]] = {}

    # -- registration ----------------------------------------------------------------

    def add_task(self, task: TaskState) -> None:
        """Validate and register a task (replacing one with the same id)."""
        task.validate(self.mapping)
        unknown = sorted(set(task.digital) - self._digital_names)
        if unknown:
            raise TaskStateError(
                f"task {task.task_id}: {unknown[:3]} are not digital backbone tensors "
                "(only BatchNorm parameters and statistics can be task-specific)"
            )
        for name, value in task.digital.items():
            expected = self._get_tensor(name).shape
            if value.shape != expected:
                raise TaskStateError(
                    f"task {task.task_id}: {name} must have shape {list(expected)}, "
                    f"got {list(value.shape)}"
                )
        if self.prepared.pop(task.task_id) is not None and self.active == task.task_id:
            self.active = None
        self.tasks[task.task_id] = task

    def remove_task(self, task_id: str) -> None:
        self._task(task_id)
        self.prepared.pop(task_id)
        del self.tasks[task_id]
        if self.active == task_id:
            self.active = None

    def _task(self, task_id: str) -> TaskState:
        try:
            return self.tasks[task_id]
        except KeyError as e:
            known = sorted(self.tasks)
            raise TaskNotFound(f"unknown task {task_id!r}; registered: {known}") from e

    # -- preparing and switching -----------------------------------------------------

    def prepare(self, task_id: str) -> PreparedTask:
        """Folded weights of a task, from the cache or computed now."""
        cached = self.prepared.get(task_id)
        if cached is not None:
            return cached
        task = self._task(task_id)
        started = time.perf_counter()
        values = shift_values(task.shift_levels)
        weights: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, state in task.layers.items():
                layer = self._layers[name]
                assert layer.mapping is not None
                weights[name] = fold_effective_weight(
                    layer.weight_codes, layer.weight_scale, layer.mapping,
                    column_values=values[state.column_codes.long()],
                    pe_mask=state.pe_mask, spare_codes=state.spare_codes,
                )
        digital = {
            name: nn.Parameter(t.detach().float().clone(), requires_grad=False)
            if self._is_parameter(name) else t.detach().float().clone()
            for name, t in task.digital.items()
        }
        seconds = time.perf_counter() - started
        prepared = PreparedTask(task, weights, digital, seconds)
        self.stats.prepares += 1
        self.stats.prepare_seconds += seconds
        self.prepared.put(task_id, prepared)
        return prepared

    def activate(self, task_id: str) -> PreparedTask:
        """Point every layer at the task's effective weights (a swap, no copy)."""
        prepared = self.prepare(task_id)
        if self.active == task_id:
            return prepared
        previous = self.prepared.peek(self.active) if self.active else None
        for name, layer in self._layers.items():
            if name in prepared.weights:
                layer.effective_weight = prepared.weights[name]
            elif previous is None or name in previous.weights:
                layer.reset_effective_weight()
        for name in set(self._digital_defaults) - set(prepared.digital):
            self._set_tensor(name, self._digital_defaults[name])
        for name, value in prepared.digital.items():
            if name not in self._digital_defaults:
                self._digital_defaults[name] = self._get_tensor(name)
            self._set_tensor(name, value)
        self.active = task_id
        self.stats.switches += 1
        return prepared

    # -- inference -------------------------------------------------------------------

    @torch.no_grad()
    def features(self, x: Tensor, task_id: str) -> Tensor:
        self.activate(task_id)
        return self.model(x)

    @torch.no_grad()
    def forward(self, x: Tensor, task_id: str) -> Tensor:
        """Logits of the task's head for a batch ``[B, 3, H, W]``."""
        head = self._task(task_id).head
        return torch.nn.functional.linear(self.features(x, task_id), head.weight, head.bias)

    # -- energy ----------------------------------------------------------------------

    def ops_per_image(self, task_id: str, image_size: tuple[int, int]) -> OpCounts:
        """Operations the chip performs for one image of this task at this input size."""
        prepared = self.prepare(task_id)
        cached = prepared.ops_per_image.get(image_size)
        if cached is not None:
            return cached
        positions = self._output_positions(image_size)
        task = prepared.task
        total = OpCounts()
        for name, layer in self._layers.items():
            assert layer.mapping is not None
            state = task.layers.get(name)
            total = total + count_layer_ops(
                layer.mapping, images=1, positions_per_image=positions[name],
                config=self.model.config,
                column_codes=None if state is None else state.column_codes,
                pe_mask=None if state is None else state.pe_mask,
            )
        head = task.head.weight
        total = total + count_head_ops(head.shape[1], head.shape[0], images=1)
        prepared.ops_per_image[image_size] = total
        return total

    def energy_per_image(self, task_id: str, image_size: tuple[int, int]) -> EnergyReport:
        return energy_of(self.ops_per_image(task_id, image_size), self.energy_config)

    def _output_positions(self, image_size: tuple[int, int]) -> dict[str, int]:
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

    # -- digital tensors -------------------------------------------------------------

    def _overridable_names(self) -> set[str]:
        names = set()
        for module_name, module in self.model.body.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    names.add(f"{module_name}.{attr}")
        return names

    def _is_parameter(self, name: str) -> bool:
        module_name, _, attr = name.rpartition(".")
        return attr in self.model.body.get_submodule(module_name)._parameters

    def _get_tensor(self, name: str) -> nn.Parameter | Tensor:
        module_name, _, attr = name.rpartition(".")
        return getattr(self.model.body.get_submodule(module_name), attr)

    def _set_tensor(self, name: str, value: nn.Parameter | Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.body.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = value  # type: ignore[assignment]
        else:
            module._buffers[attr] = value
