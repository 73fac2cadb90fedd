"""The shipped chip classifies at its own specification: crossbar fidelity is ideal's."""

from __future__ import annotations

import pytest
import torch

from core.backbones.shipped import load_backbone
from core.chip.config import CrossbarConfig
from core.engine import CrossbarEngine
from server.frontier import ChipPoint, provably_lossless, shipped_tasks

SHIPPED_TARGETS = {"fashion-mnist": 88.0, "mnist": 97.0, "animal-mnist": 95.0}
"""Test top-1 (%) each shipped task must reach on 1,000 test images."""


def test_the_shipped_backbone_is_programmed_for_the_default_chip():
    model = load_backbone(None)
    default = CrossbarConfig()
    for field in ("weight_encoding", "rows_per_read", "dac_mode", "adc_bits"):
        assert getattr(model.config, field) == getattr(default, field)
    assert model.adc_calibrated and model.adc_calibrated_bits == default.adc_bits
    point = ChipPoint(default.weight_encoding.value, default.rows_per_read, default.adc_bits,
                      default.dac_mode.value)
    assert provably_lossless(model, point)
    paper = ChipPoint("offset", 72, 5, "multi_bit")
    assert not provably_lossless(model, paper)


def test_shipped_tasks_answer_in_crossbar_fidelity_exactly_as_in_ideal():
    model = load_backbone(None)
    engine = CrossbarEngine(model)
    for task in shipped_tasks(test_limit=32):
        engine.add_task(task.task)
        crossbar = engine.forward(task.images, task.name, "crossbar")
        programs = engine.prepare(task.name).programs or {}
        assert programs and all(p.lossless for p in programs.values())
        assert torch.equal(crossbar, engine.forward(task.images, task.name, "ideal"))
        mixed = engine.forward_mixed(task.images, [task.name] * len(task.images), "crossbar")
        assert torch.equal(torch.stack(mixed), crossbar)


@pytest.mark.slow
def test_shipped_tasks_on_the_chip_meet_their_targets_within_a_point_of_ideal():
    model = load_backbone(None)
    engine = CrossbarEngine(model)
    for task in shipped_tasks(test_limit=1000):
        assert len(task.images) == 1000
        engine.add_task(task.task)
        hits = {"ideal": 0, "crossbar": 0}
        agree = 0
        for start in range(0, 1000, 100):
            x, y = task.images[start : start + 100], task.labels[start : start + 100]
            ideal = engine.forward(x, task.name, "ideal").argmax(1)
            crossbar = engine.forward(x, task.name, "crossbar").argmax(1)
            hits["ideal"] += int((ideal == y).sum())
            hits["crossbar"] += int((crossbar == y).sum())
            agree += int((ideal == crossbar).sum())
        assert hits["crossbar"] >= hits["ideal"] - 10, (task.name, hits)
        assert agree >= 980, (task.name, agree)
        # The accuracy the shipped tasks promise, on the chip as served.
        assert hits["crossbar"] >= 10 * SHIPPED_TARGETS[task.name], (task.name, hits)
