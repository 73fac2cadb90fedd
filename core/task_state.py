"""Per-task state: what one task adds to the shared, frozen backbone.

A task is the tier-1 PE mask with the spare-PE weights of exactly the replaced
PEs, the tier-2 column shift mask of the frozen PEs, a digital head, and
optional digital overrides (BatchNorm affine terms and statistics).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.chip.mapping import LayerMapping, ModelMapping, Placement
from core.confidence import UNCALIBRATED, Confidence
from core.errors import ConfigError, TaskStateError

TASK_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def shift_values(shift_levels: int) -> Tensor:
    """Mask value of every code: ``[0, 2**-N, ..., 1/4, 1/2, 1]`` (N+2 entries)."""
    powers = [2.0 ** -(shift_levels + 1 - c) for c in range(1, shift_levels + 1)]
    return torch.tensor([0.0, *powers, 1.0])


def column_code_bits(shift_levels: int) -> int:
    """Bits of one column code, on the chip's mask buffer and on disk: ``ceil(log2(N + 2))``
    for the N + 2 mask values (1 bit for a binary mask)."""
    return max(1, math.ceil(math.log2(shift_levels + 2)))


def ones_code(shift_levels: int) -> int:
    """Code of the mask value 1 (the frozen backbone unchanged)."""
    return shift_levels + 1


def validate_task_name(name: str) -> str:
    if not TASK_NAME_PATTERN.fullmatch(name):
        raise TaskStateError(
            f"invalid task name {name!r}: use 1-64 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class LayerTaskState:
    """One crossbar layer's share of a task.

    Args:
        pe_mask: bool ``[row_groups, col_groups]``; True = PE replaced by a spare PE.
        spare_codes: int8 ``[n_replaced, outputs_per_pe, rows_per_group]``, weight codes
            of the replaced PEs in ``pe_mask.nonzero()`` order (row-major); edge PEs
            are zero-padded.
        column_codes: uint8 ``[row_groups, out_channels]``, shift-mask code of every
            logical column (ignored on replaced PEs).
    """

    pe_mask: Tensor
    spare_codes: Tensor
    column_codes: Tensor

    def validate(self, layer: LayerMapping, shift_levels: int, weight_bits: int) -> None:
        where = f"layer {layer.name}"
        if layer.placement is not Placement.CROSSBAR:
            raise TaskStateError(f"{where} runs in the digital periphery and takes no masks")
        if self.pe_mask.dtype != torch.bool or tuple(self.pe_mask.shape) != (
            layer.row_groups, layer.col_groups,
        ):
            raise TaskStateError(
                f"{where}: pe_mask must be bool {[layer.row_groups, layer.col_groups]}, "
                f"got {self.pe_mask.dtype} {list(self.pe_mask.shape)}"
            )
        n = int(self.pe_mask.sum())
        want = (n, layer.outputs_per_pe, layer.rows_per_group)
        if self.spare_codes.dtype != torch.int8 or tuple(self.spare_codes.shape) != want:
            raise TaskStateError(
                f"{where}: spare_codes must be int8 {list(want)}, "
                f"got {self.spare_codes.dtype} {list(self.spare_codes.shape)}"
            )
        lo, hi = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
        if n and (int(self.spare_codes.min()) < lo or int(self.spare_codes.max()) > hi):
            raise TaskStateError(f"{where}: spare weight codes outside [{lo}, {hi}]")
        want_cols = (layer.row_groups, layer.out_channels)
        if self.column_codes.dtype != torch.uint8 or tuple(self.column_codes.shape) != want_cols:
            raise TaskStateError(
                f"{where}: column_codes must be uint8 {list(want_cols)}, "
                f"got {self.column_codes.dtype} {list(self.column_codes.shape)}"
            )
        if int(self.column_codes.max()) > ones_code(shift_levels):
            raise TaskStateError(
                f"{where}: column codes above {ones_code(shift_levels)} "
                f"(the mask has {shift_levels} shift levels)"
            )

    @classmethod
    def identity(cls, layer: LayerMapping, shift_levels: int) -> LayerTaskState:
        """No replaced PE and every column at 1: the backbone layer unchanged."""
        return cls(
            pe_mask=torch.zeros(layer.row_groups, layer.col_groups, dtype=torch.bool),
            spare_codes=torch.zeros(0, layer.outputs_per_pe, layer.rows_per_group,
                                    dtype=torch.int8),
            column_codes=torch.full((layer.row_groups, layer.out_channels),
                                    ones_code(shift_levels), dtype=torch.uint8),
        )

    @property
    def replaced_pes(self) -> int:
        return int(self.pe_mask.sum())


@dataclass(frozen=True)
class TaskHead:
    """Digital classifier of a task, on the backbone's pooled features."""

    weight: Tensor
    bias: Tensor
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or self.bias.shape != (self.weight.shape[0],):
            raise TaskStateError(
                f"head weight must be [classes, features] with bias [classes], got "
                f"{list(self.weight.shape)} and {list(self.bias.shape)}"
            )
        if len(self.labels) != self.weight.shape[0]:
            raise TaskStateError(
                f"head has {self.weight.shape[0]} outputs but {len(self.labels)} labels"
            )


@dataclass(frozen=True, eq=False)
class TaskState:
    """Everything one task adds to the backbone; identity is ``task_id``.

    Args:
        task_id: validated task name (``TASK_NAME_PATTERN``).
        shift_levels: N of the column shift mask.
        head: the task's classifier.
        layers: crossbar layers the task changes; a missing layer is the identity.
        digital: backbone parameter or buffer name -> task-specific value (e.g. BN terms).
        confidence: temperature and OOD threshold its answers are served with
            (:mod:`core.confidence`); uncalibrated: T = 1 and nothing flagged.
    """

    task_id: str
    shift_levels: int
    head: TaskHead
    layers: dict[str, LayerTaskState] = field(default_factory=dict)
    digital: dict[str, Tensor] = field(default_factory=dict)
    confidence: Confidence = UNCALIBRATED

    def __post_init__(self) -> None:
        validate_task_name(self.task_id)
        classes = self.confidence.classes
        if classes is not None and classes != len(self.head.labels):
            raise TaskStateError(f"task {self.task_id}: confidence statistics of {classes} "
                                 f"classes for a head of {len(self.head.labels)}")

    def __hash__(self) -> int:
        return hash(self.task_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskState) and other.task_id == self.task_id

    def validate(self, mapping: ModelMapping) -> None:
        if self.shift_levels != mapping.config.shift_levels:
            raise TaskStateError(
                f"task {self.task_id} uses {self.shift_levels} shift levels, the chip "
                f"{mapping.config.shift_levels}"
            )
        for name, layer_state in self.layers.items():
            try:
                layer = mapping.layer(name)
            except ConfigError as e:
                raise TaskStateError(f"task {self.task_id}: {e}") from e
            layer_state.validate(layer, self.shift_levels, layer.weight_bits)

    def layer_state(self, layer: LayerMapping) -> LayerTaskState:
        return self.layers.get(layer.name) or LayerTaskState.identity(layer, self.shift_levels)

    @property
    def replaced_pes(self) -> int:
        return sum(s.replaced_pes for s in self.layers.values())


def random_head(classes: int, features: int, seed: int = 0) -> TaskHead:
    g = torch.Generator().manual_seed(seed)
    return TaskHead(torch.randn(classes, features, generator=g) * 0.05,
                    torch.randn(classes, generator=g) * 0.1,
                    tuple(f"class{i}" for i in range(classes)))


def random_task_state(
    task_id: str, mapping: ModelMapping, head: TaskHead, *, pe_fraction: float = 0.1,
    seed: int = 0,
) -> TaskState:
    """A valid task with random PE replacements and codes over every shift level.

    Benchmarks and property tests use it: it exercises every path of the fold.
    """
    g = torch.Generator().manual_seed(seed)
    levels = mapping.config.shift_levels
    layers = {}
    for layer in mapping.crossbar_layers:
        pe_mask = torch.rand(layer.row_groups, layer.col_groups, generator=g) < pe_fraction
        n = int(pe_mask.sum())
        hi = 2 ** (layer.weight_bits - 1)
        spare = torch.randint(-hi, hi, (n, layer.outputs_per_pe, layer.rows_per_group),
                              generator=g, dtype=torch.int8)
        codes = torch.randint(0, ones_code(levels) + 1, (layer.row_groups, layer.out_channels),
                              generator=g).to(torch.uint8)
        layers[layer.name] = LayerTaskState(pe_mask, spare, codes)
    return TaskState(task_id, levels, head, layers)
