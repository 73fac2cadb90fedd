"""Tasks adapted on a lossy chip: the study's rows, its resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import ConfigError
from server.chip_adaptation import CONTROL, LOOPED, SHIPPED, Readaptation, adapt_on_chip
from server.frontier import ChipPoint

# The 4-bit-DAC periphery with differential pairs: lossy at 5 bits (72 rows at once).
LOSSY = ChipPoint("differential", 72, 5, "multi_bit")


def test_each_variant_is_served_on_the_chip_and_a_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "adapted.json"
    budget = Readaptation(train_limit=32, epochs=1, warm_start_images=16)
    kwargs = dict(test_limit=4, calibration_images=4, seed=0, command="test", budget=budget,
                  names=["mnist"])
    result = adapt_on_chip(out, [LOSSY], **kwargs)  # type: ignore[arg-type]
    (row,) = result["rows"]
    assert (row["label"], row["task"]) == (LOSSY.label, "mnist")
    assert set(row["variants"]) == {SHIPPED, LOOPED, CONTROL}
    for variant in row["variants"].values():
        assert variant["test_images"] == 4
        assert 0 <= variant["crossbar_top1"] <= 100
    assert row["variants"][LOOPED]["adapt_seconds"] > 0
    table = out.with_suffix(".md").read_text()
    assert LOSSY.label in table and "mnist" in table
    written = out.read_text()
    again = adapt_on_chip(out, [LOSSY], **kwargs)  # type: ignore[arg-type]
    assert again["rows"] == json.loads(written)["rows"]  # nothing adapted again


def test_another_training_seed_from_the_shipped_task_without_the_control(tmp_path: Path
                                                                         ) -> None:
    out = tmp_path / "seed1.json"
    budget = Readaptation(train_limit=32, epochs=1, warm_start_images=16, seed=1, control=False,
                          from_shipped=True, settings=(("train.chip_agreement", "1"),))
    result = adapt_on_chip(out, [LOSSY], test_limit=4, calibration_images=4, seed=0,
                           command="test", budget=budget, names=["mnist"])
    (row,) = result["rows"]
    assert set(row["variants"]) == {SHIPPED, LOOPED}
    assert result["settings"]["budget"]["seed"] == 1
    assert result["settings"]["budget"]["from_shipped"] is True
    assert 0 <= row["variants"][LOOPED]["agreement"] <= 100
    assert "| " + LOSSY.label in out.with_suffix(".md").read_text()


def test_unknown_tasks_are_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "adapted.json"
    with pytest.raises(ConfigError, match="unknown shipped task"):
        adapt_on_chip(out, [LOSSY], test_limit=1, calibration_images=1, seed=0,
                      command="test", budget=Readaptation(), names=["cifar"])
    assert not out.exists()
