from __future__ import annotations

import json
import math

import pytest

from core.cli.grid_summary import render_summary, summarize
from core.cli.main import main
from core.errors import ConfigError


def _run(seed: int, accuracies: dict[str, float], epochs: int = 3) -> dict:
    cells = {}
    for key, acc in accuracies.items():
        dataset, _, rest = key.partition("/")
        method, _, p = rest.partition("@")
        cells[key] = {"dataset": dataset, "method": method,
                      "pe_fraction": float(p) if p else None, "test_accuracy": acc,
                      "val_accuracy": acc, "seconds": 10.0}
    return {"grid": {"seed": seed, "image_size": 64, "train_limit": 100, "test_limit": 50,
                     "epochs": epochs, "settings": []},
            "git_revision": "abc", "command": f"xma2 evaluate --seed {seed}", "cells": cells,
            "switching": {"xma2@0.1": {"d<->e": {"energy_j": 1e-6 * (1 + seed)}},
                          "piggyback": {"d<->e": {"energy_j": 4e-6 * (1 + seed)}}}}


def test_summary_reports_mean_spread_and_the_ordering_verdict(tmp_path):
    runs = [_run(s, {"d/xma2@0.1": 0.90 + 0.01 * s, "d/xma": 0.80, "d/piggyback": 0.70})
            for s in range(3)]
    summary = summarize(runs)
    cell = summary["cells"]["d/xma2@0.1"]["test_accuracy"]
    assert math.isclose(cell["mean"], 0.91) and math.isclose(cell["std"], 0.01)
    assert summary["seeds"] == [0, 1, 2]
    page = render_summary(summary, tmp_path / "s", {"xma2": "XMA2"}, {"d": "D"})
    assert "91.00 ± 1.00" in page and "holds beyond the spread" in page
    assert "4.00x" in page  # piggyback's switching energy against XMA2's
    assert json.loads((tmp_path / "s.json").read_text())["seeds"] == [0, 1, 2]


def test_ordering_within_the_spread_is_not_called_a_finding(tmp_path):
    runs = [_run(s, {"d/xma2@0.1": 0.80 + 0.05 * s, "d/xma": 0.84, "d/piggyback": 0.83})
            for s in range(3)]
    page = render_summary(summarize(runs), tmp_path / "s", {}, {})
    assert "within the spread" in page or "does not hold" in page
    assert "beyond the spread" not in page


def test_a_single_seed_is_not_judged_against_a_spread_it_does_not_have(tmp_path):
    runs = [_run(0, {"d/xma2@0.1": 0.90, "d/xma": 0.80, "d/piggyback": 0.70}),
            _run(1, {"d/xma": 0.80})]
    page = render_summary(summarize(runs), tmp_path / "s", {}, {})
    assert "holds in the means of one seed" in page and "no spread yet" in page
    assert "beyond the spread" not in page and "largest std" not in page


def test_runs_that_differ_in_more_than_the_seed_are_refused():
    with pytest.raises(ConfigError, match="epochs"):
        summarize([_run(0, {"d/xma": 0.8}), _run(1, {"d/xma": 0.8}, epochs=5)])
    with pytest.raises(ConfigError, match="same seed"):
        summarize([_run(0, {"d/xma": 0.8}), _run(0, {"d/xma": 0.8})])


def test_grid_summary_command(tmp_path, capsys):
    files = []
    for s in range(2):
        path = tmp_path / f"seed{s}.json"
        path.write_text(json.dumps(_run(s, {"d/xma": 0.8 + 0.1 * s})))
        files.append(str(path))
    assert main(["grid-summary", *files, "--out", str(tmp_path / "sum")]) == 0
    assert "85.00 ± 7.07" in capsys.readouterr().out
    assert main(["grid-summary", str(tmp_path / "absent.json"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "xma2 evaluate --seed" in capsys.readouterr().err
