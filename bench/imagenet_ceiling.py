"""How far the built-in ImageNet task can get on the 4-bit chip: top-1 agreement with fp32.

A task owns the BatchNorm affine terms, the head, spare PEs (any 4-bit codes in place of
the backbone's) and column masks; the activation quantizers' steps and bits are the
backbone's. This puts parts of the network back to fp32, one at a time, on the fp32
model itself with hooks that fake-quantize each crossbar or digital layer's input the
way that layer does (its bits, sign and step) and/or swap in its weight codes times
scales, and measures top-1 agreement with fp32 on the held-out crops that ``xma2
fidelity`` and ``xma2 build-imagenet-task`` score (ideal fidelity, no chip periphery):

- ``fp32 weights, 4-bit activations``: every weight as fp32 while the activations keep
  the backbone's steps, more than spare PEs replacing every PE could give (their codes
  are 4-bit; the depthwise layers' 8-bit weights are digital and no task's);
- ``..., per-channel steps``: the same with each input channel's step chosen by
  quantization MSE on calibration crops (what rescaling channels through a task's
  BatchNorm and its spare PEs could buy, by that criterion);
- ``..., 8-bit activations``: the activations at 8 bits (a chip the paper does not
  describe), for scale;
- ``4-bit weights, 4-bit activations``: the emulation of the built-in task (fp32
  BatchNorms and head on the backbone's codes), next to the same task served by the
  engine, which checks that the emulation is the chip's arithmetic.

    python bench/imagenet_ceiling.py [--crops 200] [--threads 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.backbones import build_backbone
from core.backbones.shipped import IMAGENET_TASK, imagenet_task, load_backbone
from core.chip.config import Fidelity
from core.engine import CrossbarEngine
from core.learning.imagenet_task import fp32_top1, top1_agreement
from core.nn.calibration import (
    AGREEMENT_PHOTOS,
    CALIBRATION_PHOTOS,
    NATURAL_PHOTOS,
    agreement_crops,
    calibration_images,
)
from core.nn.layers import CrossbarConv2d
from core.nn.quant import signed_range
from core.task_state import TaskState


def _quantizer(step: Tensor, bits: int, signed: bool) -> Callable[[Tensor], Tensor]:
    qmin, qmax = signed_range(bits) if signed else (0, 2**bits - 1)
    return lambda x: torch.clamp(torch.round(x / step), qmin, qmax) * step


def _channel_steps(x: Tensor, bits: int, signed: bool, start: float, grid: int = 60,
                   samples: int = 20_000) -> Tensor:
    """Per input channel of ``x`` ``[N, C, H, W]``, the step (a multiple of ``start``
    between 1/8 and 8) with the least quantization MSE."""
    qmin, qmax = signed_range(bits) if signed else (0, 2**bits - 1)
    values = x.transpose(0, 1).reshape(x.shape[1], -1)
    if values.shape[1] > samples:
        keep = torch.randperm(values.shape[1], generator=torch.Generator().manual_seed(0))
        values = values[:, keep[:samples]]
    best_err = torch.full((values.shape[0],), float("inf"))
    best = torch.full((values.shape[0],), start)
    for factor in torch.logspace(-3, 3, grid, base=2).tolist():
        step = start * factor
        err = (torch.clamp(torch.round(values / step), qmin, qmax) * step - values).pow(2)
        err = err.mean(1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, step, best)
    return best.reshape(1, -1, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=200, help="held-out crops (224 px)")
    parser.add_argument("--calibration", type=int, default=64,
                        help="calibration crops the per-channel steps are chosen on")
    parser.add_argument("--crossbar-crops", type=int, default=200,
                        help="of the held-out crops, how many the served task also runs "
                             "in crossbar fidelity (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model = load_backbone(None)
    fp32 = build_backbone(model.backbone_name)
    fp32.eval()
    crops = agreement_crops(args.crops, seed=0)
    reference = fp32_top1(fp32, crops)
    layers = {name.removeprefix("body."): layer for name, layer in model.named_modules()
              if isinstance(layer, CrossbarConv2d)}
    inputs: dict[str, Tensor] = {}
    modules = dict(fp32.named_modules())
    hooks = [modules[name].register_forward_pre_hook(
        lambda _m, given, name=name: inputs.__setitem__(name, given[0].detach()))
        for name in layers]
    with torch.no_grad():
        fp32(calibration_images(args.calibration, 224, seed=1,
                                photos=CALIBRATION_PHOTOS + NATURAL_PHOTOS))
    for hook in hooks:
        hook.remove()

    def emulated(weights: str, activations: str) -> float:
        student = copy.deepcopy(fp32)
        own = dict(student.named_modules())
        for name, layer in layers.items():
            conv = own[name]
            assert isinstance(conv, nn.Conv2d)
            if weights == "4-bit":
                with torch.no_grad():
                    conv.weight.copy_(layer.weight_codes.float()
                                      * layer.weight_scale.reshape(-1, 1, 1, 1))
            quant = layer.input_quant
            step = quant.step.detach().reshape(())
            if activations == "fp32":
                continue
            if activations == "8-bit":
                bits = max(8, quant.bits)
                step = step * (2**quant.bits - 1) / (2**bits - 1)
                fake = _quantizer(step, bits, quant.signed)
            elif activations == "4-bit, per-channel steps":
                fake = _quantizer(_channel_steps(inputs[name], quant.bits, quant.signed,
                                                 float(step)), quant.bits, quant.signed)
            else:  # the layer's own quantizer, on a copy that leaves its input alone
                fake = copy.deepcopy(quant)
                fake.inplace, fake.fake_quant_enabled = False, True
            conv.register_forward_pre_hook(lambda _m, given, fake=fake: (fake(given[0]),))
        return top1_agreement(student, crops, reference)

    rows: list[dict[str, Any]] = []
    for weights, activations in (("4-bit", "fp32"), ("fp32", "4-bit"),
                                 ("fp32", "4-bit, per-channel steps"), ("fp32", "8-bit"),
                                 ("4-bit", "4-bit")):
        agreement = emulated(weights, activations)
        rows.append({"weights": weights, "activations": activations,
                     "agreement_ideal": round(agreement, 4)})
        print(f"{weights} weights, {activations} activations: {agreement:.1%}", flush=True)

    served: dict[str, dict[str, float]] = {}
    built_in = imagenet_task(model, fp32)
    head_only = TaskState(IMAGENET_TASK, built_in.shift_levels, built_in.head)
    on_chip = min(args.crossbar_crops, len(crops))
    for label, task in (("head only (the backbone's BatchNorms)", head_only),
                        ("built-in task (fp32 BatchNorms and head)", built_in)):
        engine = CrossbarEngine(model)
        engine.add_task(task)
        row = {"ideal": round(top1_agreement(lambda x, e=engine: e.forward(x, IMAGENET_TASK),
                                             crops, reference), 4)}
        if on_chip:
            row["crossbar"] = round(top1_agreement(
                lambda x, e=engine: e.forward(x, IMAGENET_TASK, Fidelity.CROSSBAR),
                crops[:on_chip], reference[:on_chip], batch_size=8), 4)
        served[label] = row
        print(f"served, {label}: {row}", flush=True)

    result = {
        "command": "python bench/imagenet_ceiling.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "backbone": model.backbone_name, "backbone_fingerprint": model.fingerprint(),
        "held_out": {"photos": list(AGREEMENT_PHOTOS), "crops": len(crops), "image_size": 224,
                     "seed": 0, "crossbar_crops": on_chip},
        "calibration_crops": args.calibration, "threads": args.threads,
        "torch": torch.__version__, "emulated": rows, "served": served,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
