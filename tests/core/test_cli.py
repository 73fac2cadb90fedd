from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from core.backbones.shipped import default_backbone_path, imagenet_task, load_backbone
from core.cli.commands import _photo_batch
from core.cli.main import main
from core.engine import CrossbarEngine

CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def shipped_engine() -> CrossbarEngine:
    model = load_backbone(None)
    engine = CrossbarEngine(model)
    engine.add_task(imagenet_task(model))
    return engine


def test_shipped_backbone_is_4_bit_and_classifies_the_bundled_photos(shipped_engine):
    assert default_backbone_path().is_file()
    for _, layer in shipped_engine.model.layers()[1:]:
        if layer.on_crossbar:
            assert layer.weight_bits == 4
            assert -8 <= int(layer.weight_codes.min()) and int(layer.weight_codes.max()) <= 7
    logits = shipped_engine.forward(_photo_batch(("chelsea", "coffee"), 224), "imagenet")
    top = logits.topk(3, dim=1).indices.tolist()
    # The built-in task (fp32 BatchNorms) answers the fp32 model's top-1 for both photos:
    # Egyptian cat (its top-3 are cats; the task ranks lynx second) and espresso (the
    # classifier alone, on the backbone's own norms, ranks consomme first).
    assert top[0][0] == 285 and sum(i in CAT_CLASSES for i in top[0]) >= 2
    assert top[1][0] == 967


def test_inspect_prints_mapping_and_prediction(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "1021" in out.replace(",", "")  # PEs of MobileNetV2 at 72x72
    assert "energy per image" in out
    assert "Egyptian" in out or "cat" in out


def test_inspect_bad_image_is_a_clear_cli_error(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    proc = subprocess.run([sys.executable, "-m", "core.cli.main", "inspect", "--image", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "cannot read image" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_energy_per_image_is_positive_and_scales_with_resolution(shipped_engine):
    small = shipped_engine.ops_per_image("imagenet", (64, 64))
    large = shipped_engine.ops_per_image("imagenet", (224, 224))
    # every layer's output grid grows by (112/32)^2; the head's MACs do not grow
    assert large.cell_reads * 64**2 == small.cell_reads * 224**2
    assert large.head_macs == small.head_macs == 1000 * 1280
    energy = shipped_engine.energy_per_image("imagenet", (224, 224))
    assert 0 < energy.adc_j < energy.total_j
    assert energy.total_j == pytest.approx(sum(
        v for k, v in energy.to_dict().items() if k != "total_j"))


def test_shipped_backbone_carries_calibrated_adc_ranges(shipped_engine):
    model = shipped_engine.model
    assert model.adc_calibrated and model.adc_calibrated_bits == model.config.adc_bits
    crossbar = CrossbarEngine(model, fidelity="crossbar")
    crossbar.add_task(shipped_engine.tasks["imagenet"])
    x = _photo_batch(("chelsea",), 64)
    assert torch.isfinite(crossbar.forward(x, "imagenet")).all()


def test_calibrate_adc_command_rewrites_ranges_and_keeps_weights(tmp_path):
    out = tmp_path / "backbone.safetensors"
    assert main(["calibrate-adc", "--out", str(out), "--size", "32", "--seed", "3"]) == 0
    shipped, recalibrated = load_backbone(None), load_backbone(out)
    for (_, a), (_, b) in zip(shipped.layers(), recalibrated.layers(), strict=True):
        assert torch.equal(a.weight_codes, b.weight_codes)
    assert any(not torch.equal(a.adc_range, b.adc_range)
               for (_, a), (_, b) in zip(shipped.layers(), recalibrated.layers(), strict=True)
               if a.on_crossbar)
    assert main(["calibrate-adc"]) == 2  # no destination: a CLI error naming the fix


def test_calibrate_adc_moves_a_backbone_to_a_named_chip(tmp_path):
    from core.chip.config import CHIP_PRESETS, PAPER_CHIP, CrossbarConfig

    assert CrossbarConfig.from_dict({**CrossbarConfig().to_dict(), **CHIP_PRESETS["default"]}) \
        == CrossbarConfig()
    out = tmp_path / "paper.safetensors"
    assert main(["calibrate-adc", "--chip", "paper", "--adc-bits", "6", "--images", "8",
                 "--out", str(out), "--size", "32"]) == 0
    paper = load_backbone(out)
    assert paper.config.weight_encoding.value == PAPER_CHIP["weight_encoding"]
    assert paper.config.rows_per_read == PAPER_CHIP["rows_per_read"]
    assert paper.config.adc_bits == 6  # a field given beside the preset overrides it
    assert paper.adc_calibrated and paper.fingerprint() != load_backbone(None).fingerprint()
