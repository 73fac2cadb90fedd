"""The frozen, quantized backbone as programmed onto the emulated chip.

BatchNorm stays in the digital periphery rather than being folded into the
weights: per-channel weight quantization gives the same codes either way
(a positive per-channel factor only rescales the channel's scale), and keeping
it digital lets a task own its BatchNorm terms without touching a cell.

The column ADCs' ranges are calibrated from data after the weights are final
(:meth:`CrossbarModel.calibrate_adc`) and saved with the backbone: they are a
property of the programmed chip, like the weight codes.

Saved as one safetensors file whose ``__metadata__`` carries the format
version, backbone name, crossbar config and per-layer input signedness.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.atomic import atomic_write
from core.backbones.mobilenet_v2 import InvertedResidual
from core.backbones.registry import HEAD_MODULES, Backbone, build_backbone
from core.chip.adc import DAC_MODES, adc_code_range, best_adc_top, largest_read_sum
from core.chip.config import CrossbarConfig
from core.chip.mapping import ModelMapping, map_layer
from core.errors import ConfigError, ResourceUnavailable
from core.nn.layers import CrossbarConv2d, crossbar_layers
from core.nn.periphery import DigitalNorm
from core.nn.quant import ActivationQuantizer
from core.ops.crossbar import (
    input_cycles,
    layer_cell_levels,
    read_levels,
)
from core.task_state import TaskHead

FORMAT_VERSION = "1"


def _head_linear(head: nn.Module) -> nn.Linear:
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ConfigError("the backbone head must contain exactly one Linear layer")
    return linears[0]


def _chain_positions(root: nn.Module, name: str) -> Iterator[tuple[nn.Sequential, list[str], int]]:
    """``(sequential, child names, index)`` of module ``name`` and of each ancestor, climbing
    while the chain passes values on unchanged: through Sequentials, and through
    residual-free inverted residuals (whose input and output are their ``conv``'s)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = root.get_submodule(".".join(parts[:depth]))
        if isinstance(parent, InvertedResidual) and not parent.use_residual:
            continue
        if not isinstance(parent, nn.Sequential):
            return
        children = [n for n, _ in parent.named_children()]
        yield parent, children, children.index(parts[depth])


def _input_is_exclusive(root: nn.Module, name: str) -> bool:
    """Whether a layer's input is an intermediate that nothing else reads: the layer
    follows a sibling in a Sequential chain (which hands that sibling's fresh output to it
    alone) before the chain reaches a block whose forward may reuse its input."""
    return any(index > 0 for _, _, index in _chain_positions(root, name))


def _first_leaf(module: nn.Module) -> nn.Module | None:
    """The module that alone receives ``module``'s input (None when it is shared)."""
    while True:
        if isinstance(module, nn.Sequential) and len(module) > 0:
            module = module[0]
        elif isinstance(module, InvertedResidual) and not module.use_residual:
            module = module.conv
        elif isinstance(module, (nn.Sequential, InvertedResidual)):
            return None
        else:
            return module


def _sole_reader(root: nn.Module, name: str) -> nn.Module | None:
    """The leaf module that alone reads module ``name``'s output, when the module tree
    says so (a later sibling in a Sequential chain); None when unknown or shared."""
    for parent, children, index in _chain_positions(root, name):
        if index + 1 < len(children):
            return _first_leaf(parent.get_submodule(children[index + 1]))
    return None


def _build_periphery(body: nn.Module) -> None:
    """Every BatchNorm becomes a :class:`DigitalNorm` that absorbs the ReLU6 after it and
    is linked to the crossbar layers it can fold (see :mod:`core.nn.layers`)."""
    for name, module in list(body.named_modules()):
        if not isinstance(module, nn.BatchNorm2d) or isinstance(module, DigitalNorm):
            continue
        norm = DigitalNorm.from_batchnorm(module)
        _set_submodule(body, name, norm)
        parent_name, _, child = name.rpartition(".")
        parent = body.get_submodule(parent_name) if parent_name else body
        producer = None
        last = name
        if isinstance(parent, nn.Sequential):
            children = [n for n, _ in parent.named_children()]
            index = children.index(child)
            before = parent.get_submodule(children[index - 1]) if index > 0 else None
            if isinstance(before, CrossbarConv2d):
                producer = before
            after = (children[index + 1] if index + 1 < len(children) else None)
            if after is not None and type(parent.get_submodule(after)) is nn.ReLU6:
                norm.clamp_top = 6.0
                setattr(parent, after, nn.Identity())
                last = f"{parent_name}.{after}" if parent_name else after
        reader = _sole_reader(body, last)
        norm.link(producer, reader if isinstance(reader, CrossbarConv2d) else None)


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
        self, backbone: Backbone, backbone_name: str, config: CrossbarConfig,
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
            if not depthwise:
                layer.add_adc_range(len(DAC_MODES), math.ceil(w_bits / config.bits_per_cell))
            _set_submodule(body, name, layer)
        _build_periphery(body)
        self.body = body
        self.mapping: ModelMapping | None = None
        self.adc_calibrated_bits: int | None = None
        """ADC resolution the stored ranges were tuned for (None: not calibrated)."""
        self.channels_last = True
        """Whether inference runs channels-last (False: the NCHW pass, for comparison)."""

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
        self.calibrate_adc(images[:64], batch_size=batch_size)

    @torch.no_grad()
    def calibrate_adc(self, images: Tensor, batch_size: int = 32, max_samples: int = 100_000,
                      seed: int = 0, adc_bits: int | None = None) -> None:
        """Choose each crossbar layer's ADC range, per DAC mode and cell slice.

        The range's top minimises the ADC's squared error on the layer's real partial
        sums (the backbone's cells, lossless inputs, ideal fidelity upstream), each
        sample weighted by the square of its input cycle's significance, so that the
        error is measured in the layer's output units. Run it after the weights and
        input quantizers are final. ``adc_bits`` defaults to the chip's; ranges tuned
        for other bits serve experiments with another ADC on the same backbone.
        """
        if self.mapping is None:
            self.build_mapping()
        self.eval()
        generator = torch.Generator().manual_seed(seed)
        layers = [(n, m) for n, m in self.layers() if m.on_crossbar]
        samples: dict[tuple[str, int], list[tuple[Tensor, Tensor]]] = {}
        weights = {n: self._slice_conv_weight(m) for n, m in layers}

        def collect(name: str, layer: CrossbarConv2d) -> Callable[..., None]:
            def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
                quant = layer.input_quant
                qmin, qmax = quant.qrange
                x = inputs[0]  # never in place: the layer reads it next
                codes = x if layer.takes_codes() else (x / quant.step).round().clamp(qmin, qmax)
                for mode_index, mode in enumerate(DAC_MODES):
                    samples.setdefault((name, mode_index), []).append(_slice_partial_sums(
                        codes, layer, weights[name], replace(self.config, dac_mode=mode).dac_bits,
                        max_samples // 8, generator))
            return hook

        hooks = [m.register_forward_pre_hook(collect(n, m)) for n, m in layers]
        try:
            for start in range(0, len(images), batch_size):
                self(images[start : start + batch_size])
        finally:
            for h in hooks:
                h.remove()
        bits = self.config.adc_bits if adc_bits is None else adc_bits
        qmax = adc_code_range(bits, self.config.adc_signed)[1]
        self.adc_calibrated_bits = bits
        for name, layer in layers:
            assert layer.adc_range is not None
            for mode_index in range(len(DAC_MODES)):
                values = torch.cat([v for v, _ in samples[(name, mode_index)]], dim=1)
                weight = torch.cat([w for _, w in samples[(name, mode_index)]], dim=1)
                assert layer.mapping is not None
                dac_bits = replace(self.config, dac_mode=DAC_MODES[mode_index]).dac_bits
                bound = largest_read_sum(layer.mapping, dac_bits)
                for s in range(values.shape[0]):
                    layer.adc_range[mode_index, s] = (
                        float(qmax) if bound <= qmax  # provably lossless: unit step
                        else best_adc_top(values[s], weight[s], qmax,
                                           signed=self.config.adc_signed))

    def with_chip(self, **changes: Any) -> CrossbarModel:
        """The same programmed weights on another periphery (encoding, rows per read, ADC,
        DAC): a copy whose ADC ranges must be calibrated again for it."""
        model = copy.deepcopy(self)
        model.config = replace(self.config, **changes)  # CrossbarConfig validates them
        model.build_mapping()
        model.adc_calibrated_bits = None
        for _, layer in model.layers():
            if layer.adc_range is not None:
                layer.adc_range.zero_()
        return model

    @property
    def adc_calibrated(self) -> bool:
        ranges = [m.adc_range for _, m in self.layers() if m.on_crossbar]
        return self.adc_calibrated_bits is not None and all(
            r is not None and bool((r > 0).all()) for r in ranges)

    @staticmethod
    def _slice_conv_weight(layer: CrossbarConv2d) -> Tensor:
        """Unpacked cell levels as a grouped-conv weight: one output per column and slice."""
        mapping = layer.mapping
        assert mapping is not None
        levels = read_levels(layer_cell_levels(layer.weight_codes, mapping), mapping)
        return levels.permute(2, 1, 0, 3).reshape(  # [S, Cout, reads, rows] -> grouped conv
            -1, mapping.channels_per_read, *mapping.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features of the active task (see :class:`core.engine.CrossbarEngine`).

        Inference runs channels-last (``[B, H, W, C]`` in memory): a pointwise layer is
        then one matrix product over every pixel, whose output is channels-last again,
        so the layout holds from layer to layer without a transpose. Convolutions of
        integer codes are exact in any summation order and the periphery is elementwise,
        so the result equals the NCHW pass bit for bit (the pooling sums in NCHW order).
        Passes with autograd keep the caller's layout."""
        if self.channels_last and not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body.forward_features(x)

    # -- persistence ---------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 of the programmed state and crossbar config: task states bind to it."""
        digest = hashlib.sha256()
        identity = {**self._metadata(),
                    "crossbar_config": json.dumps(self.config.identity_dict(), sort_keys=True)}
        digest.update(json.dumps(identity, sort_keys=True).encode())
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def weights_fingerprint(self) -> str:
        """SHA-256 of what programming writes (weights, scales, input quantizers), without
        the periphery (config, ADC ranges): equal for one backbone on every chip."""
        digest = hashlib.sha256(self.backbone_name.encode())
        for key, tensor in sorted(self.state_dict().items()):
            if not key.endswith(".adc_range"):
                digest.update(key.encode())
                digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _metadata(self) -> dict[str, str]:
        signed = {n: layer.input_quant.signed for n, layer in self.layers()}
        bits = {n: layer.input_quant.bits for n, layer in self.layers()}
        return {
            "adc_calibrated_bits": json.dumps(self.adc_calibrated_bits),
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
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

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
        model.adc_calibrated_bits = json.loads(metadata.get("adc_calibrated_bits", "null"))
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(".adc_range")]  # uncalibrated file
        if missing or unexpected:
            raise ConfigError(
                f"{path} does not match backbone {name}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        for _, layer in model.layers():
            layer.reset_effective_weight()
        model.build_mapping()
        return model.eval()


def _slice_partial_sums(
    codes: Tensor, layer: CrossbarConv2d, weight: Tensor, bits_per_cycle: int, limit: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Lossless partial sums ``[slices, n]`` of every read, column and cycle (at most
    ``limit`` drawn at random, shared evenly by the cycles), with cycle weights."""
    mapping = layer.mapping
    assert mapping is not None
    chunks, cycle_weights = input_cycles(codes, mapping.input_bits, mapping.input_signed,
                                         bits_per_cycle)
    padded = mapping.row_groups * mapping.channels_per_row_group - codes.shape[1]
    values, weights = [], []
    for chunk, cycle_weight in zip(chunks, cycle_weights, strict=True):
        chunk = torch.nn.functional.pad(chunk, (0, 0, 0, 0, 0, padded))
        reads = mapping.row_groups * mapping.reads_per_group
        psum = torch.nn.functional.conv2d(chunk, weight, None, layer.stride, layer.padding,
                                          layer.dilation, reads)
        psum = psum.reshape(psum.shape[0], reads, mapping.out_channels, mapping.slices, -1)
        flat = psum.movedim(3, 0).reshape(mapping.slices, -1)
        if flat.shape[1] > limit // len(chunks):
            flat = flat[:, torch.randint(flat.shape[1], (limit // len(chunks),),
                                         generator=generator)]
        values.append(flat)
        weights.append(torch.full_like(flat, cycle_weight**2))
    return torch.cat(values, dim=1), torch.cat(weights, dim=1)


def imagenet_head(backbone: nn.Module, backbone_name: str, labels: list[str]) -> TaskHead:
    """The backbone's own ImageNet classifier as a digital task head."""
    linear = _head_linear(getattr(backbone, HEAD_MODULES[backbone_name]))
    return TaskHead(linear.weight.detach().float().clone(),
                    linear.bias.detach().float().clone(), tuple(labels))


@torch.no_grad()
def fp32_batchnorm_terms(model: CrossbarModel, fp32: nn.Module) -> dict[str, Tensor]:
    """The fp32 model's BatchNorms as a task's affine terms over the backbone's statistics.

    The backbone's norms hold the statistics of its distillation (64 px crops of the
    calibration photos), not ImageNet's. A task owns only the affine terms, but with
    ``weight * sd_b / sd_f`` and ``bias + weight * (mean_b - mean_f) / sd_f`` (``sd`` the
    square root of variance plus eps) each norm computes the fp32 norm's function of its
    input: in closed form, no image needed. Keys are those of ``TaskState.digital``.
    """
    reference = dict(fp32.named_modules())
    terms: dict[str, Tensor] = {}
    for name, norm in model.body.named_modules():
        if not (isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.affine):
            continue
        teacher = reference.get(name)
        if not isinstance(teacher, nn.modules.batchnorm._BatchNorm) or not teacher.affine:
            raise ConfigError(f"the fp32 model has no BatchNorm {name} to match")
        assert norm.running_mean is not None and norm.running_var is not None
        assert teacher.running_mean is not None and teacher.running_var is not None
        own_sd = (norm.running_var + norm.eps).sqrt()
        fp32_sd = (teacher.running_var + teacher.eps).sqrt()
        weight = teacher.weight.float()
        terms[f"{name}.weight"] = (weight * own_sd / fp32_sd).contiguous()
        terms[f"{name}.bias"] = (teacher.bias.float() + weight
                                 * (norm.running_mean - teacher.running_mean) / fp32_sd)
    return terms
