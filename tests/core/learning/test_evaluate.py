from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict

import pytest

from core.cli.evaluate import (
    GridConfig,
    _same_run,
    cell_energy,
    render_markdown,
    reprogramming_cost,
    resume_from,
    task_storage,
)
from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.task_state import TaskState
from tests.core.helpers import backbone_copy_task as _spare_task
from tests.core.helpers import random_head


def test_rewriting_the_backbone_codes_costs_nothing_and_changes_cost_energy(
        quantized_mobilenet):
    name = quantized_mobilenet.mapping.crossbar_layers[3].name
    same = reprogramming_cost(quantized_mobilenet, _spare_task(quantized_mobilenet, {name}))
    assert same["reprogram_j"] == 0 and same["cells_written"] == 0
    assert same["reprogram_erased_j"] > 0
    layer = dict(quantized_mobilenet.layers())[name]
    assert same["spare_weights"] == layer.weight_codes.numel()
    moved = reprogramming_cost(quantized_mobilenet,
                               _spare_task(quantized_mobilenet, {name}, change=1))
    assert moved["reprogram_j"] > 0 and moved["cells_written"] > 0


def test_storage_counts_mask_bits_per_method(quantized_mobilenet):
    mapping = quantized_mobilenet.mapping
    task = TaskState("empty", 3, random_head(10))
    columns = sum(m.row_groups * m.out_channels for m in mapping.crossbar_layers)
    xma = task_storage(quantized_mobilenet, task, "xma", 3)
    xbm = task_storage(quantized_mobilenet, task, "xbm", 0)
    xma2 = task_storage(quantized_mobilenet, task, "xma2", 3)
    assert xma["mask_bytes"] == columns * 3 / 8 and xbm["mask_bytes"] == columns / 8
    assert xma2["mask_bytes"] == (columns * 3 + mapping.num_pes) / 8
    piggyback = task_storage(quantized_mobilenet, task, "piggyback", None)
    weights = sum(m.weight_rows * m.out_channels for m in mapping.crossbar_layers)
    assert piggyback["mask_bytes"] == weights / 8
    assert math.isclose(piggyback["mask_vs_backbone"],
                        weights / 8 / piggyback["backbone_weight_bytes"])


def test_grid_runs_the_main_comparison_first():
    cells = GridConfig(datasets=("a", "b"), methods=("xma2", "xma"),
                       pe_fractions=(0.1, 0.4)).cells()
    assert cells == [("a", "xma2", 0.1), ("b", "xma2", 0.1), ("a", "xma", None),
                     ("b", "xma", None), ("a", "xma2", 0.4), ("b", "xma2", 0.4)]


def test_results_page_renders_tables_ratios_and_plots(quantized_mobilenet, tmp_path):
    engine = CrossbarEngine(copy.deepcopy(quantized_mobilenet))
    name = quantized_mobilenet.mapping.crossbar_layers[3].name
    cells = {}
    for method, p, change in (("xma2", 0.1, 1), ("piggyback", None, 2), ("xma", None, 0),
                              ("finetune_qat", None, 3)):
        task = _spare_task(quantized_mobilenet, {name} if change else set(), change)
        engine.add_task(task)
        row = {"dataset": "digits", "method": method, "pe_fraction": p, "train_images": 10,
               "val_images": 2, "test_images": 5, "test_accuracy": 0.5 + 0.1 * change,
               "val_accuracy": 0.5, "seconds": 1.0}
        row.update(cell_energy(engine, quantized_mobilenet, task, 32, 5, method))
        row.update(task_storage(quantized_mobilenet, task, method, 3))
        cells[f"digits/{method}" + ("" if p is None else f"@{p:g}")] = row
        engine.remove_task("spare")
    for key, row in cells.items():  # a resumed grid: one cell from an older revision
        row["git_revision"] = "old1234" if key == "digits/xma" else "abc"
    result = {"command": "xma2 evaluate --datasets digits", "git_revision": "abc",
              "threads": 1, "torch": "x", "backbone": "mobilenet_v2",
              "backbone_fingerprint": "0" * 64, "cells": cells,
              "grid": {"datasets": ["digits"], "methods": ["xma2", "xma", "piggyback",
                                                           "finetune_qat"],
                       "pe_fractions": [0.1, 0.2], "seed": 0, "image_size": 32,
                       "train_limit": 10, "test_limit": 5, "epochs": 1}}
    text = render_markdown(result, tmp_path / "adaptation")
    assert (tmp_path / "adaptation.md").read_text() == text
    assert "xma2 evaluate --datasets digits" in text
    assert "digits/xma2@0.2" in text  # reported as missing
    assert "old1234: xma (1 cells)" in text and "abc: finetune_qat, piggyback, xma2 (3 cells)" \
        in text
    assert "| XMA2, P = 10% | 60.00 |" in text
    assert "does not hold" in text  # 60 > 50 but XMA (50) < piggyback (70)
    xma2 = cells["digits/xma2@0.1"]
    assert xma2["total_j"] == xma2["reprogram_erased_j"] + xma2["inference_j"]
    piggyback = cells["digits/piggyback"]
    assert piggyback["total_j"] == piggyback["reprogram_j"] + piggyback["inference_j"]
    assert f"{piggyback['total_j'] / xma2['total_j']:.2f}x" in text
    assert (tmp_path / "adaptation_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "adaptation_energy.png").stat().st_size > 1000


def test_grid_settings_are_checked_and_decide_what_a_resumed_grid_reuses():
    with pytest.raises(ConfigError, match="no method in the grid has the setting"):
        GridConfig(methods=("head_bn",), settings=(("mask.init_logit", "6"),))
    quiet = asdict(GridConfig(methods=("xma",), settings=(("mask.init_logit", "6"),)))
    default = asdict(GridConfig(methods=("xma",)))
    grown = asdict(GridConfig(methods=("xma", "head_bn"), datasets=("digits",)))
    stored = json.loads(json.dumps(quiet))  # as read back from the results file
    assert _same_run(stored, quiet) and _same_run(default, grown)
    assert not _same_run(stored, default)
    assert not _same_run(default, asdict(GridConfig(methods=("xma",), epochs=12)))
    old_file = {k: v for k, v in default.items() if k != "settings"}  # before settings existed
    assert _same_run(old_file, default)


def test_a_resumed_grid_keeps_every_switch_priced_before():
    grid = asdict(GridConfig(methods=("xma2",), datasets=("mnist5k", "animal_mnist")))
    priced = {"xma2@0.1": {"animal_mnist<->mnist5k": {"energy_j": 2.9e-05}}}
    previous = {"grid": grid, "backbone_fingerprint": "f", "cells": {"a": {}},
                "switching": priced}
    # resumed with one more dataset only: the old pair's task files need not be here
    result = {"grid": asdict(GridConfig(methods=("xma2",), datasets=("fashion_mnist",))),
              "backbone_fingerprint": "f", "cells": {}}
    resume_from(json.loads(json.dumps(previous)), result)
    assert result["cells"] == {"a": {}} and result["switching"] == priced
    other = {**result, "backbone_fingerprint": "g", "cells": {}, "switching": {}}
    resume_from(previous, other)  # another backbone: nothing is reused
    assert other["cells"] == {} and other["switching"] == {}
