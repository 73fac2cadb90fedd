"""The frozen, quantized backbone as programmed onto the emulated chip.

BatchNorm stays in the digital periphery rather than being folded into the
weights: per-channel weight quantization gives the same codes either way
(a positive per-channel factor only rescales the channel's scale), and keeping
it digital lets a task own its BatchNorm terms without touching a cell.

Saved as one safetensors file whose ``__metadata__`` carries the format
version, backbone name, crossbar config and per-layer input signedness.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.backbones.registry import build_backbone
from core.config import CrossbarConfig
from core.errors import ConfigError, ResourceUnavailable
from core.layers import CrossbarConv2d, crossbar_layers
from core.mapping import ModelMapping, map_layer
from core.quant import ActivationQuantizer
from core.task_state import TaskHead

FORMAT_VERSION = "1"
HEAD_MODULES = {"mobilenet_v2": "classifier", "resnet18": "fc", "resnet50": "fc"}


def _head_linear(head: nn.Module) -> nn.Linear:
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ConfigError("the backbone head must contain exactly one Linear layer")
    return linears[0]


def _input_is_exclusive(root: nn.Module, name: str) -> bool:
    """Whether a layer's input is an intermediate that nothing else reads.

    True when, climbing the module tree, the layer follows a sibling inside an
    ``nn.Sequential`` (which hands that sibling's fresh output to it alone) before
    it reaches a block whose forward may reuse its input (a residual add).
    """
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = root.get_submodule(".".join(parts[:depth]))
        if not isinstance(parent, nn.Sequential):
            return False
        if [n for n, _ in parent.named_children()].index(parts[depth]) > 0:
            return True
    return False


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class CrossbarModel(nn.Module):
    """Quantized feature extractor of a backbone; every task's head runs on its output.

    Args:
        backbone: an fp32 backbone from :func:`core.backbones.build_backbone`.
        backbone_name: its registry name.
        config: the chip's crossbar configuration.
        quantize: quantize the weights now (False when loading saved codes).
    """

    def __init__(
        self, backbone: nn.Module, backbone_name: str, config: CrossbarConfig,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        if backbone_name not in HEAD_MODULES:
            raise ConfigError(f"unknown backbone {backbone_name!r}; known: {list(HEAD_MODULES)}")
        self.backbone_name = backbone_name
        self.config = config
        body = copy.deepcopy(backbone).float().eval()
        setattr(body, HEAD_MODULES[backbone_name], nn.Identity())
        convs = [(n, m) for n, m in body.named_modules() if isinstance(m, nn.Conv2d)]
        for i, (name, conv) in enumerate(convs):
            depthwise = conv.groups > 1 and conv.groups == conv.in_channels
            if i == 0:
                w_bits, a_bits = config.edge_bits, config.edge_bits
            elif depthwise:
                w_bits, a_bits = config.depthwise_bits, config.activation_bits
            else:
                w_bits, a_bits = config.weight_bits, config.activation_bits
            layer = CrossbarConv2d(conv, w_bits, ActivationQuantizer(a_bits), quantize=quantize)
            layer.input_quant.inplace = _input_is_exclusive(body, name)
            _set_submodule(body, name, layer)
        self.body = body
        self.mapping: ModelMapping | None = None

    def layers(self) -> list[tuple[str, CrossbarConv2d]]:
        return crossbar_layers(self.body)

    def build_mapping(self) -> ModelMapping:
        """Tile every layer onto PEs; run after calibration fixed the input signedness."""
        mappings = []
        for index, (name, layer) in enumerate(self.layers()):
            proxy = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                              groups=layer.groups, bias=False, device="meta")
            layer.mapping = map_layer(
                name, index, proxy, self.config, weight_bits=layer.weight_bits,
                input_bits=layer.input_quant.bits, input_signed=layer.input_quant.signed,
            )
            mappings.append(layer.mapping)
        self.mapping = ModelMapping(self.config, tuple(mappings))
        return self.mapping

    @torch.no_grad()
    def calibrate(self, images: Tensor, batch_size: int = 32) -> None:
        """Choose every input quantizer's sign, precision and range (MSE) from unlabeled
        images in one pass; signed inputs get ``config.signed_input_bits``."""
        self.eval()
        layers = self.layers()
        for _, layer in layers:
            layer.input_quant.enable_observer()
        for start in range(0, len(images), batch_size):
            self(images[start : start + batch_size])
        for index, (_, layer) in enumerate(layers):
            quant = layer.input_quant
            if index > 0 and quant.observer is not None and quant.observer.signed:
                quant.bits = max(quant.bits, self.config.signed_input_bits)
            quant.apply_observer()
        self.build_mapping()

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features of the active task (see :class:`core.engine.CrossbarEngine`)."""
        return self.body.forward_features(x)

    # -- persistence ---------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of the programmed state and crossbar config: task states bind to it."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self._metadata(), sort_keys=True).encode())
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _metadata(self) -> dict[str, str]:
        signed = {n: layer.input_quant.signed for n, layer in self.layers()}
        bits = {n: layer.input_quant.bits for n, layer in self.layers()}
        return {
            "input_bits": json.dumps(bits, sort_keys=True),
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone_name,
            "crossbar_config": json.dumps(self.config.to_dict(), sort_keys=True),
            "input_signed": json.dumps(signed, sort_keys=True),
        }

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> None:
        """Atomic write: a crash leaves the previous file intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        metadata = {**(extra_metadata or {}), **self._metadata()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> CrossbarModel:
        path = Path(path)
        if not path.is_file():
            raise ResourceUnavailable(
                f"no quantized backbone at {path}; create one with `xma2 quantize`"
            )
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{path}: backbone format version {metadata.get('format_version')!r}, "
                f"this xma2 reads {FORMAT_VERSION!r}"
            )
        config = CrossbarConfig.from_dict(json.loads(metadata["crossbar_config"]))
        name = metadata["backbone"]
        model = cls(build_backbone(name, pretrained=False), name, config, quantize=False)
        signed = json.loads(metadata["input_signed"])
        bits = json.loads(metadata["input_bits"])
        for layer_name, layer in model.layers():
            layer.input_quant.signed = bool(signed[layer_name])
            layer.input_quant.bits = int(bits[layer_name])
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{path} does not match backbone {name}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        for _, layer in model.layers():
            layer.reset_effective_weight()
        model.build_mapping()
        return model.eval()


def imagenet_head(backbone: nn.Module, backbone_name: str, labels: list[str]) -> TaskHead:
    """The backbone's own ImageNet classifier as a digital task head."""
    linear = _head_linear(getattr(backbone, HEAD_MODULES[backbone_name]))
    return TaskHead(linear.weight.detach().float().clone(),
                    linear.bias.detach().float().clone(), tuple(labels))
