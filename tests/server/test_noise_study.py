"""The noise study's choices: which effects a row keeps, and bad input refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.chip.config import NOISE_LEVELS
from core.errors import ConfigError
from server.cli import main
from server.noise_study import ALL_FOUR, NOISE_EFFECTS, noise_study, only


def test_each_row_keeps_exactly_its_effect() -> None:
    high = NOISE_LEVELS["high"]
    stuck = only(high, "stuck cells")
    assert (stuck.stuck_on_rate, stuck.stuck_off_rate) == (high.stuck_on_rate,
                                                          high.stuck_off_rate)
    assert stuck.programming_sigma == stuck.read_sigma == stuck.adc_offset_sigma == 0
    assert stuck.seed == high.seed  # the same chip instance as the all-four row
    assert only(high, ALL_FOUR) == high
    assert all(only(high, effect).any for effect in NOISE_EFFECTS)


def test_unknown_levels_and_tasks_are_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "noise.json"
    assert main(["chip-frontier", "--noise", "--noise-levels", "low,medium",
                 "--out", str(out)]) != 0
    refused = capsys.readouterr().err
    assert "unknown noise level(s) ['medium']; choose from none, low, high" in refused
    with pytest.raises(ConfigError, match="unknown shipped task"):
        noise_study(out, test_limit=1, command="test", names=["cifar"])
    assert not out.exists()


def test_the_clean_chip_row_scores_each_task_and_its_agreement_with_ideal(
        tmp_path: Path) -> None:
    out = tmp_path / "clean.json"
    result = noise_study(out, test_limit=8, command="test", levels=("none",),
                         names=["mnist"])
    assert [(r["level"], r["effect"]) for r in result["rows"]] == [("none", ALL_FOUR)]
    scores = result["rows"][0]["tasks"]["mnist"]
    assert 0 <= scores["agreement"] <= 100 and scores["agreement"] % 12.5 == 0
    assert scores["minus_ideal"] == pytest.approx(scores["top1"] - result["ideal"]["mnist"],
                                                  abs=0.02)
    assert "lowest agreement with ideal" in out.with_suffix(".md").read_text()


def test_a_noise_aware_chip_stage_starts_from_the_shipped_task(tmp_path: Path) -> None:
    """--adapt-for-noise takes the --adapt-* budget: a warm start with the chip in the loop."""
    import json

    out = tmp_path / "aware.json"
    assert main(["chip-frontier", "--noise", "--noise-levels", "low", "--no-effects",
                 "--tasks", "mnist", "--test-limit", "8", "--adapt-for-noise",
                 "--adapt-from-shipped", "--adapt-train-limit", "64", "--adapt-epochs", "1",
                 "--adapt-set", "train.chip_periphery=true", "--threads", "1",
                 "--out", str(out)]) == 0
    rows = {r["effect"]: r for r in json.loads(out.read_text())["rows"]}
    adapted = rows["all four, tasks adapted for this chip"]
    assert adapted["adaptation"]["from_shipped"] is True
    assert ["train.chip_periphery", "true"] in adapted["adaptation"]["settings"]
    assert adapted["adaptation"]["train_limit"] == 64
    assert 0 <= adapted["tasks"]["mnist"]["agreement"] <= 100
