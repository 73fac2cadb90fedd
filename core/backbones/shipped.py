"""What ships inside the package: the distilled 4-bit backbone and its ImageNet task.

A plain module (no console, no plotting) so that the server, the benchmarks and the
tests can load the shipped backbone without importing the command line.
"""

from __future__ import annotations

import importlib.resources
import subprocess
from dataclasses import replace
from pathlib import Path

from torch import nn

from core.backbones.registry import build_backbone, imagenet_labels
from core.nn.model import CrossbarModel, fp32_batchnorm_terms, imagenet_head
from core.task_state import TaskState

__all__ = ["IMAGENET_TASK", "SHIPPED_BACKBONE", "default_backbone_path", "git_revision",
           "imagenet_head_only", "imagenet_task", "load_backbone"]

SHIPPED_BACKBONE = "mobilenet_v2_w4a4.safetensors"
IMAGENET_TASK = "imagenet"
"""The name of the backbone's own ImageNet task (built into the server)."""


def default_backbone_path() -> Path:
    """The distilled 4-bit MobileNetV2 that ships inside the package."""
    return Path(str(importlib.resources.files("core") / "artifacts" / SHIPPED_BACKBONE))


def load_backbone(path: Path | None) -> CrossbarModel:
    """The backbone saved at ``path``, or the shipped one when ``path`` is None."""
    return CrossbarModel.load(path or default_backbone_path())


def git_revision() -> str:
    """The source revision recorded in results and artifacts ("unknown" outside git)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def imagenet_task(model: CrossbarModel, fp32: nn.Module | None = None) -> TaskState:
    """The backbone's own ImageNet classifier (from the fp32 checkpoint) as a built-in task:
    the fp32 head and the fp32 BatchNorms (:func:`fp32_batchnorm_terms`) on the 4-bit
    crossbars, no cell written (the bare task; a distilled one is made by
    :func:`core.learning.imagenet_task.distill_imagenet_task`)."""
    fp32 = fp32 if fp32 is not None else build_backbone(model.backbone_name)
    head_only = imagenet_head_only(model, fp32)
    return replace(head_only, digital=fp32_batchnorm_terms(model, fp32))


def imagenet_head_only(model: CrossbarModel, fp32: nn.Module | None = None) -> TaskState:
    """The fp32 head on the backbone as it stands (its own BatchNorms): what measures the
    backbone itself (its agreement with fp32, the features a linear probe reads)."""
    fp32 = fp32 if fp32 is not None else build_backbone(model.backbone_name)
    return TaskState(IMAGENET_TASK, model.config.shift_levels,
                     imagenet_head(fp32, model.backbone_name, imagenet_labels()))
