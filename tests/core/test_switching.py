from __future__ import annotations

import json
import math

import pytest
import torch

from core.cli.evaluate import reprogramming_cost
from core.cli.switching import (
    load_task_tensors,
    price_grid_switches,
    round_trip_cost,
    save_task_tensors,
    switching_cost,
    switching_markdown,
    task_file,
)
from core.task_state import TaskState
from tests.core.helpers import backbone_copy_task, random_head, random_task


@pytest.fixture(scope="module")
def two_layers(quantized_mobilenet) -> tuple[str, str]:
    layers = quantized_mobilenet.mapping.crossbar_layers
    return layers[3].name, layers[5].name


def test_switching_to_the_same_state_writes_nothing(quantized_mobilenet, two_layers):
    task = backbone_copy_task(quantized_mobilenet, set(two_layers), change=1)
    for in_place in (True, False):
        cost = switching_cost(quantized_mobilenet, task, task, in_place=in_place)
        assert cost["energy_j"] == 0 and cost["cells_written"] == 0
        assert cost["column_codes_changed"] == 0


def test_in_place_switch_undoes_one_task_and_writes_the_other(quantized_mobilenet,
                                                               two_layers):
    first, second = two_layers
    a = backbone_copy_task(quantized_mobilenet, {first}, change=1, task_id="a")
    b = backbone_copy_task(quantized_mobilenet, {second}, change=-1, task_id="b")
    cost = switching_cost(quantized_mobilenet, a, b, in_place=True)
    undo, write = (reprogramming_cost(quantized_mobilenet, t) for t in (a, b))
    # Moving a cell between two levels costs the same both ways.
    assert math.isclose(cost["energy_j"], undo["reprogram_j"] + write["reprogram_j"],
                        rel_tol=1e-9)
    assert cost["cells_written"] == undo["cells_written"] + write["cells_written"]
    back = round_trip_cost(quantized_mobilenet, a, b, in_place=True)
    assert math.isclose(back["energy_j"], 2 * cost["energy_j"], rel_tol=1e-9)


def test_spare_pes_are_written_over_the_previous_tasks_or_erased_cells(quantized_mobilenet,
                                                                       two_layers):
    first, _ = two_layers
    empty = TaskState("empty", 3, random_head(10))
    b = backbone_copy_task(quantized_mobilenet, {first}, change=1, task_id="b")
    from_erased = switching_cost(quantized_mobilenet, empty, b, in_place=False)
    assert math.isclose(from_erased["energy_j"],
                        reprogramming_cost(quantized_mobilenet, b)["reprogram_erased_j"],
                        rel_tol=1e-9)
    # Same PEs, codes one step apart: cheaper than writing from erased, never free.
    a = backbone_copy_task(quantized_mobilenet, {first}, change=0, task_id="a")
    over = switching_cost(quantized_mobilenet, a, b, in_place=False)
    assert 0 < over["energy_j"] < from_erased["energy_j"]
    assert over["pes_written"] == b.replaced_pes
    # Leaving for a task with no spare PEs writes nothing: old spare PEs are just unused.
    assert switching_cost(quantized_mobilenet, b, empty, in_place=False)["energy_j"] == 0


def test_task_tensors_round_trip(quantized_mobilenet, tmp_path):
    task = random_task("round-trip", quantized_mobilenet.mapping, pe_fraction=0.1, seed=3)
    task.digital["features.1.bn.weight"] = torch.randn(16)
    path = tmp_path / "t.safetensors"
    save_task_tensors(path, task)
    loaded = load_task_tensors(path)
    assert loaded.task_id == task.task_id and loaded.shift_levels == task.shift_levels
    assert loaded.head.labels == task.head.labels
    assert torch.equal(loaded.head.weight, task.head.weight)
    assert loaded.layers.keys() == task.layers.keys()
    for name, state in task.layers.items():
        got = loaded.layers[name]
        assert torch.equal(got.pe_mask, state.pe_mask)
        assert torch.equal(got.spare_codes, state.spare_codes)
        assert torch.equal(got.column_codes, state.column_codes)
    assert torch.equal(loaded.digital["features.1.bn.weight"],
                       task.digital["features.1.bn.weight"])
    loaded.validate(quantized_mobilenet.mapping)


def test_grid_prices_every_pair_of_saved_tasks(quantized_mobilenet, tmp_path):
    mapping = quantized_mobilenet.mapping
    result: dict = {"cells": {}}
    for i, dataset in enumerate(("d1", "d2", "d3")):
        for method, p in (("xma2", 0.1), ("finetune_qat", None)):
            key = f"{dataset}/{method}" + ("" if p is None else f"@{p:g}")
            result["cells"][key] = {"dataset": dataset, "method": method}
            fraction = 0.1 if p else 1.0
            save_task_tensors(task_file(tmp_path, key),
                              random_task(f"t{i}", mapping, pe_fraction=fraction, seed=i))
    price_grid_switches(result, tmp_path, quantized_mobilenet, frozenset({"finetune_qat"}))
    switching = result["switching"]
    assert set(switching) == {"xma2@0.1", "finetune_qat"}
    assert set(switching["xma2@0.1"]) == {"d1<->d2", "d1<->d3", "d2<->d3"}
    xma2 = switching["xma2@0.1"]["d1<->d2"]["energy_j"]
    full = switching["finetune_qat"]["d1<->d2"]["energy_j"]
    assert full > 5 * xma2 > 0  # every PE against a tenth of them
    json.dumps(result)
    page = "\n".join(switching_markdown(result, {"xma2": "XMA2"}))
    assert "A -> B -> A" in page and "1.00x" in page


def test_a_pe_both_tasks_replaced_keeps_its_spare_pe(quantized_mobilenet, two_layers):
    first, _ = two_layers
    a = backbone_copy_task(quantized_mobilenet, {first}, change=0, task_id="a")
    b = backbone_copy_task(quantized_mobilenet, {first}, change=0, task_id="b")
    # B replaces the same PEs but drops the first one: the rest stay where they are.
    state = b.layers[first]
    mask = state.pe_mask.clone()
    mask.view(-1)[0] = False
    b.layers[first] = type(state)(mask, state.spare_codes[1:].clone(), state.column_codes)
    assert switching_cost(quantized_mobilenet, a, b, in_place=False)["energy_j"] == 0
