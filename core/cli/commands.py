"""What the ``xma2`` commands do, kept apart from argument parsing."""

from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from core.backbones import build_backbone, preprocess_image
from core.backbones.registry import HEAD_MODULES
from core.backbones.shipped import (
    default_backbone_path,
    git_revision,
    imagenet_head_only,
    imagenet_task,
    load_backbone,
)
from core.chip.config import (
    NOISE_LEVELS,
    AdcRange,
    CrossbarConfig,
    CrossbarSettings,
    DacMode,
)
from core.engine import CrossbarEngine
from core.errors import ResourceUnavailable
from core.learning.distill import DistillConfig, distill_backbone
from core.nn.calibration import AGREEMENT_PHOTOS, agreement_crops, calibration_images, load_photo
from core.nn.model import CrossbarModel
from core.task_state import TaskHead, TaskState

logger = logging.getLogger(__name__)
console = Console(width=None if sys.stdout.isatty() else 110)


def _photo_batch(names: tuple[str, ...], size: int) -> torch.Tensor:
    from PIL import Image

    images = []
    for name in names:
        array = (load_photo(name).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        images.append(preprocess_image(Image.fromarray(array), size))
    return torch.stack(images)


def inspect(backbone_file: Path | None, image: Path | None, size: int, layers: bool,
            fidelity: str = "ideal") -> None:
    model = load_backbone(backbone_file)
    mapping = model.mapping
    assert mapping is not None
    table = Table(title=f"{model.backbone_name} on {mapping.config.rows}x{mapping.config.cols} "
                        f"crossbars ({mapping.config.bits_per_cell}-bit cells; "
                        f"{mapping.config.describe()})")
    for column in ("layer", "placement", "shape", "bits", "row groups", "col groups", "PEs",
                   "utilisation"):
        table.add_column(column, justify="left" if column in ("layer", "placement") else "right",
                         no_wrap=column == "layer", min_width=20 if column == "layer" else None)
    rows = mapping.report()
    for row in rows if layers else []:
        table.add_row(str(row["layer"]), str(row["placement"]), str(row["shape"]),
                      str(row["weight_bits"]), str(row["row_groups"]), str(row["col_groups"]),
                      str(row["pes"]), f"{row['utilisation']:.1%}")
    crossbar = mapping.crossbar_layers
    table.add_row("total", f"{len(crossbar)} xbar, {len(rows) - len(crossbar)} dig.", "",
                  "", "", "", str(mapping.num_pes),
                  f"{mapping.cells_used / max(1, mapping.cells_total):.1%}")
    console.print(table)
    console.print(f"cells used {mapping.cells_used:,} of {mapping.cells_total:,}; "
                  f"backbone fingerprint {model.fingerprint()[:16]}")

    engine = CrossbarEngine(model)
    engine.add_task(imagenet_task(model))
    if image is None:
        x = _photo_batch(("chelsea",), size)
        source = "scikit-image chelsea (cat)"
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            x = preprocess_image(Image.open(image), size).unsqueeze(0)
        except (OSError, UnidentifiedImageError) as e:
            raise ResourceUnavailable(f"cannot read image {image}: {e}") from e
        source = str(image)
    probs = engine.forward(x, "imagenet", fidelity).softmax(1)[0]
    top = probs.topk(5)
    labels = engine.tasks["imagenet"].head.labels
    console.print(f"\n[bold]{source}[/bold], 4-bit backbone, {fidelity} fidelity:")
    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        console.print(f"  {p:6.1%}  {labels[i]} ({i})")
    energy = engine.energy_per_image("imagenet", (size, size))
    console.print(f"energy per image: {energy.total_j * 1e6:.2f} uJ "
                  f"(crossbar reads {energy.cell_read_j * 1e6:.2f} uJ, "
                  f"ADC {energy.adc_j * 1e6:.2f} uJ)")


def quantize(backbone: str, weights: Path | None, out: Path, steps: int, size: int,
             seed: int) -> None:
    torch.manual_seed(seed)
    fp32 = build_backbone(backbone, weights_path=weights)
    config = CrossbarConfig()
    started = time.perf_counter()
    pool = calibration_images(DistillConfig.pool_size, size, seed=seed)
    model = CrossbarModel(fp32, backbone, config)
    model.calibrate(pool[:256])
    console.print(f"post-training quantization and calibration: "
                  f"{time.perf_counter() - started:.0f} s")
    if steps:
        head = getattr(fp32, HEAD_MODULES[backbone])
        distill = DistillConfig(steps=steps, image_size=size, seed=seed)
        with console.status("distilling") as status:
            def progress(step: int, loss: float) -> None:
                status.update(f"distilling: step {step + 1}/{steps}, loss {loss:.4f}")

            losses = distill_backbone(model, fp32, head, pool, distill, progress)
        console.print(f"distillation: {steps} steps, loss {losses[0]:.4f} -> "
                      f"{sum(losses[-20:]) / 20:.4f}")
    model.build_mapping()
    model.calibrate_adc(pool[:ADC_CALIBRATION_IMAGES])
    model.save(out, extra_metadata={
        "command": f"xma2 quantize --backbone {backbone} --steps {steps} --size {size} "
                   f"--seed {seed}",
        "git_revision": git_revision(),
        "torch": torch.__version__,
    })
    console.print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), "
                  f"{time.perf_counter() - started:.0f} s in all")


ADC_CALIBRATION_IMAGES = 512
"""Photo crops the column ADC ranges are calibrated on (CrossSim calibrates on ~500)."""


def calibrate_adc(backbone_file: Path | None, out: Path, size: int, seed: int, *,
                  chip: dict[str, Any] | None = None, images: int | None = None,
                  command: str | None = None) -> None:
    """Re-tune the column ADC ranges of a saved backbone (its weights stay as they are),
    first moving it to another periphery when ``chip`` names one."""
    from safetensors import safe_open

    path = backbone_file or default_backbone_path()
    model = load_backbone(path)
    if chip:
        model = model.with_chip(**chip)
    with safe_open(str(path), framework="pt") as f:
        provenance = dict(f.metadata() or {})  # how the weights were made stays recorded
    count = images or ADC_CALIBRATION_IMAGES
    started = time.perf_counter()
    model.calibrate_adc(calibration_images(count, size, seed=seed))
    model.save(out, extra_metadata={
        **provenance,
        "adc_command": command or f"xma2 calibrate-adc --size {size} --seed {seed}",
        "adc_calibration_images": str(count),
        "adc_git_revision": git_revision(),
    })
    console.print(f"calibrated the ADC ranges of "
                  f"{len(model.mapping.crossbar_layers) if model.mapping else 0} layers for "
                  f"{model.config.describe()} on {count} images at {size}x{size} in "
                  f"{time.perf_counter() - started:.0f} s; wrote {out}")


def fidelity(backbone_file: Path | None, datasets: list[str], size: int, train_limit: int,
             test_limit: int, seed: int) -> dict[str, Any]:
    """Top-1 agreement with fp32 on the bundled photos and linear probes per dataset."""
    from core.data.datasets import DatasetSpec, load_dataset
    from core.learning.probe import extract_features, linear_probe

    model = load_backbone(backbone_file)
    fp32 = build_backbone(model.backbone_name)
    naive = CrossbarModel(fp32, model.backbone_name, model.config)
    naive.calibrate(calibration_images(256, size, seed=seed))
    task = imagenet_head_only(model, fp32)  # the backbones as they are
    engine = CrossbarEngine(model)
    engine.add_task(task)
    naive_engine = CrossbarEngine(naive)
    naive_engine.add_task(task)
    built_in = CrossbarEngine(model)
    built_in.add_task(imagenet_task(model, fp32))

    photos = _photo_batch(AGREEMENT_PHOTOS, 224)
    crops = agreement_crops(seed=seed)
    with torch.no_grad():
        reference = fp32(photos).argmax(1)
        reference_crops = fp32(crops).argmax(1)
    result: dict[str, Any] = {
        "backbone": model.backbone_name, "backbone_fingerprint": model.fingerprint(),
        "crossbar_config": model.config.to_dict(), "seed": seed, "image_size": size,
        "train_limit": train_limit, "test_limit": test_limit, "git_revision": git_revision(),
        "python": platform.python_version(), "torch": torch.__version__,
        "agreement_photos": list(AGREEMENT_PHOTOS), "agreement": {}, "linear_probe": {},
    }
    result["fp32_top1_photos"] = reference.tolist()
    for name, eng in (("ptq", naive_engine), ("distilled", engine), ("built_in", built_in)):
        top1 = eng.forward(photos, "imagenet").argmax(1)
        top1_crops = eng.forward(crops, "imagenet").argmax(1)
        result["agreement"][name] = {
            "photos": float((top1 == reference).float().mean()),
            "photo_top1": top1.tolist(),
            "crops": float((top1_crops == reference_crops).float().mean()),
        }
    extractors = {
        "fp32": fp32.forward_features,
        "ptq": lambda x: naive_engine.features(x, "imagenet"),
        "distilled": lambda x: engine.features(x, "imagenet"),
    }
    for dataset in datasets:
        data = load_dataset(DatasetSpec(dataset, image_size=size, seed=seed,
                                        train_limit=train_limit, test_limit=test_limit))
        row: dict[str, Any] = {"train": len(data.train), "test": len(data.test)}
        for name, features in extractors.items():
            started = time.perf_counter()
            train = extract_features(features, data.train)
            test = extract_features(features, data.test)
            with torch.enable_grad():
                accuracy, _, _ = linear_probe(train, test, num_classes=len(data.classes),
                                              seed=seed)
            row[name] = round(100 * accuracy, 2)
            logger.info("%s %s: %.2f%% (%.0f s)", dataset, name, 100 * accuracy,
                        time.perf_counter() - started)
        result["linear_probe"][dataset] = row
        console.print(f"{dataset}: {row}")
    return result


def fidelity_markdown(result: dict[str, Any]) -> str:
    """The fidelity results as the tables in docs/results.md."""
    lines = [
        "| backbone | top-1 agreement, bundled photos | top-1 agreement, 200 held-out crops |",
        "|---|---|---|",
    ]
    for name, label in (("ptq", "naive 4-bit PTQ"), ("distilled", "distilled 4-bit (shipped)"),
                        ("built_in", "the built-in `imagenet` task on it (fp32 BatchNorms)")):
        if name not in result["agreement"]:  # results made before the built-in row
            continue
        a = result["agreement"][name]
        photos = len(a["photo_top1"])
        lines.append(f"| {label} | {round(a['photos'] * photos)}/{photos} | "
                     f"{100 * a['crops']:.1f}% |")
    lines += ["", "| dataset (train/test) | fp32 | naive 4-bit PTQ | distilled 4-bit | "
                  "distilled − fp32 |", "|---|---|---|---|---|"]
    for dataset, row in result["linear_probe"].items():
        lines.append(f"| {dataset} ({row['train']}/{row['test']}) | {row['fp32']:.2f} | "
                     f"{row['ptq']:.2f} | {row['distilled']:.2f} | "
                     f"{row['distilled'] - row['fp32']:+.2f} |")
    return "\n".join(lines)


def crossbar_accuracy(backbone_file: Path | None, dataset: str, size: int, train_limit: int,
                      test_limit: int, seed: int,
                      adc_bits: tuple[int, ...] = (5, 6, 8, 10, 12)) -> dict[str, Any]:
    """Top-1 of one fixed labelled image set in ideal and crossbar fidelity.

    A linear head is fitted on ideal-fidelity features of the training split; the
    same head then classifies the test split under each emulation: the chip's ADC,
    other ADC resolutions (each with ranges re-calibrated for it), bit-serial inputs,
    and device non-idealities at two levels, with a lossless ADC (device effects
    alone) and with the chip's ADC.
    """
    import copy
    from dataclasses import asdict

    from core.data.datasets import DatasetSpec, load_dataset
    from core.learning.probe import extract_features, linear_probe

    model = load_backbone(backbone_file)
    data = load_dataset(DatasetSpec(dataset, image_size=size, seed=seed,
                                    train_limit=train_limit, test_limit=test_limit))
    engine = CrossbarEngine(model)
    engine.add_task(imagenet_head_only(model))  # the probe's task reads the same norms
    train = extract_features(lambda x: engine.features(x, "imagenet"), data.train)
    test_ideal = extract_features(lambda x: engine.features(x, "imagenet"), data.test)
    with torch.enable_grad():
        ideal_accuracy, weight, bias = linear_probe(train, test_ideal,
                                                    num_classes=len(data.classes), seed=seed)
    head = TaskHead(weight, bias, tuple(data.classes))
    calibration = calibration_images(ADC_CALIBRATION_IMAGES, size, seed=seed)
    result: dict[str, Any] = {
        "backbone": model.backbone_name, "backbone_fingerprint": model.fingerprint(),
        "crossbar_config": model.config.to_dict(), "dataset": dataset, "image_size": size,
        "train": len(data.train), "test": len(data.test), "seed": seed,
        "git_revision": git_revision(), "torch": torch.__version__,
        "noise_levels": {k: asdict(v) for k, v in NOISE_LEVELS.items()},
        "ideal": round(100 * ideal_accuracy, 2), "rows": [],
    }
    calibrated: dict[int, CrossbarModel] = {model.config.adc_bits: model}

    def run(label: str, settings: CrossbarSettings, bits: int | None = None) -> None:
        source = model
        if bits is not None and settings.adc_range is AdcRange.CALIBRATED:
            if bits not in calibrated:
                calibrated[bits] = copy.deepcopy(model)
                calibrated[bits].calibrate_adc(calibration, adc_bits=bits)
            source = calibrated[bits]
        emulated = CrossbarEngine(source, crossbar=settings)
        emulated.add_task(TaskState("probe", model.config.shift_levels, head))
        started = time.perf_counter()
        correct = 0
        for start in range(0, len(data.test), 64):
            x, y = data.test.batch(slice(start, start + 64))
            correct += int((emulated.forward(x, "probe", "crossbar").argmax(1) == y).sum())
        accuracy = 100 * correct / len(data.test)
        row = {"emulation": label, "top1": round(accuracy, 2),
               "minus_ideal": round(accuracy - 100 * ideal_accuracy, 2),
               "seconds": round(time.perf_counter() - started, 1)}
        result["rows"].append(row)
        console.print(row)

    lossless = CrossbarSettings(adc_bits=16, adc_range=AdcRange.FULL_SCALE)
    run("lossless ADC (16-bit, full scale)", lossless)
    for bits in adc_bits:
        run(f"{bits}-bit ADC, calibrated, multi-bit DAC", CrossbarSettings(adc_bits=bits), bits)
    for bits in (5, 8):
        run(f"{bits}-bit ADC, calibrated, bit-serial DAC",
            CrossbarSettings(adc_bits=bits, dac_mode=DacMode.BIT_SERIAL), bits)
    chip_bits = model.config.adc_bits
    for level, noise in NOISE_LEVELS.items():
        run(f"{level} non-idealities, lossless ADC",
            replace(lossless, non_idealities=noise))
        run(f"{level} non-idealities, {chip_bits}-bit ADC",
            CrossbarSettings(non_idealities=noise), chip_bits)
    return result


def crossbar_accuracy_markdown(result: dict[str, Any]) -> str:
    lines = [f"Ideal fidelity: **{result['ideal']:.2f}%** top-1 "
             f"({result['dataset']}, {result['test']} test images at {result['image_size']}"
             f"x{result['image_size']}).", "",
             "| crossbar emulation | top-1 (%) | minus ideal | seconds |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['emulation']} | {row['top1']:.2f} | {row['minus_ideal']:+.2f} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines)
