"""The shipped chip classifies at its own specification: a lossy 5-bit periphery whose
answers stay within a point of ideal, because the shipped tasks learned it."""

from __future__ import annotations

import json

import pytest
import torch

from core.backbones.shipped import load_backbone
from core.chip.config import LOSSLESS_CHIP, PAPER_CHIP, CrossbarConfig
from core.engine import CrossbarEngine
from server.frontier import ChipPoint, provably_lossless, shipped_tasks
from server.shipped_tasks import INDEX_FILE, SHIPPED_DIR

SHIPPED_TARGETS = {"fashion-mnist": 88.0, "mnist": 97.0, "animal-mnist": 95.0}
"""Test top-1 (%) each shipped task must reach on 1,000 test images."""


def _point(chip: dict[str, object]) -> ChipPoint:
    return ChipPoint(str(chip["weight_encoding"]), int(str(chip["rows_per_read"])),
                     int(str(chip["adc_bits"])), str(chip["dac_mode"]))


def test_the_shipped_backbone_is_programmed_and_calibrated_for_the_default_chip():
    model = load_backbone(None)
    default = CrossbarConfig()
    assert model.config == default
    assert model.adc_calibrated and model.adc_calibrated_bits == default.adc_bits == 5
    # the default periphery is lossy: its tasks must learn it (no exact shortcut to ideal)
    assert not provably_lossless(model, _point(default.to_dict()))
    assert provably_lossless(model, _point(LOSSLESS_CHIP))
    assert not provably_lossless(model, _point(PAPER_CHIP))


def test_shipped_tasks_were_trained_with_the_default_chip_in_the_loop():
    index = json.loads((SHIPPED_DIR / INDEX_FILE).read_text())
    assert {e["name"] for e in index["tasks"]} == set(SHIPPED_TARGETS)
    served = load_backbone(None).config.describe()
    for entry in index["tasks"]:
        stages = entry["stages"]
        looped = [st["config"]["train"].get("chip_periphery", False) for st in stages]
        assert looped[0] is False and all(looped[1:]) and len(looped) >= 2
        assert stages[-1]["chip"] == served  # the last stage learned the chip it serves
        metrics = entry["metrics"]
        assert metrics["crossbar_test_accuracy"] >= metrics["test_accuracy"] - 0.01, entry["name"]


def test_shipped_tasks_answer_on_the_chip_mostly_as_in_ideal_and_mixed_as_alone():
    model = load_backbone(None)
    engine = CrossbarEngine(model)
    for task in shipped_tasks(test_limit=64):
        engine.add_task(task.task)
        crossbar = engine.forward(task.images, task.name, "crossbar")
        programs = engine.prepare(task.name).programs or {}
        assert programs and not all(p.lossless for p in programs.values())
        ideal = engine.forward(task.images, task.name, "ideal")
        assert not torch.equal(crossbar, ideal)  # the chip rounds: this is not ideal again
        agree = (crossbar.argmax(1) == ideal.argmax(1)).float().mean().item()
        assert agree >= 0.9, (task.name, agree)
        mixed = engine.forward_mixed(task.images, [task.name] * len(task.images), "crossbar")
        torch.testing.assert_close(torch.stack(mixed), crossbar, rtol=1e-4, atol=1e-5)


def _thousand_images() -> dict[str, dict[str, int]]:
    model = load_backbone(None)
    engine = CrossbarEngine(model)
    counts: dict[str, dict[str, int]] = {}
    for task in shipped_tasks(test_limit=1000):
        assert len(task.images) == 1000
        engine.add_task(task.task)
        hits = {"ideal": 0, "crossbar": 0, "agree": 0}
        for start in range(0, 1000, 100):
            x, y = task.images[start : start + 100], task.labels[start : start + 100]
            ideal = engine.forward(x, task.name, "ideal").argmax(1)
            crossbar = engine.forward(x, task.name, "crossbar").argmax(1)
            hits["ideal"] += int((ideal == y).sum())
            hits["crossbar"] += int((crossbar == y).sum())
            hits["agree"] += int((ideal == crossbar).sum())
        counts[task.name] = hits
    return counts


@pytest.fixture(scope="module")
def thousand_images() -> dict[str, dict[str, int]]:
    return _thousand_images()


@pytest.mark.slow
def test_shipped_tasks_on_the_chip_meet_their_targets_within_a_point_of_ideal(
        thousand_images: dict[str, dict[str, int]]) -> None:
    for name, hits in thousand_images.items():
        assert hits["crossbar"] >= hits["ideal"] - 10, (name, hits)
        # the accuracy the shipped tasks promise, on the chip as served
        assert hits["crossbar"] >= 10 * SHIPPED_TARGETS[name], (name, hits)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="Fashion-MNIST's ideal view agrees with its chip on "
                   "about 95% of test images, short of 98% (docs/results.md, 'The default chip')")
def test_shipped_tasks_answer_in_ideal_as_on_the_chip(
        thousand_images: dict[str, dict[str, int]]) -> None:
    for name, hits in thousand_images.items():
        assert hits["agree"] >= 980, (name, hits)
