"""Cell levels, write energy and wear, checked by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.chip.programming import (
    CellWriteCounter,
    ProgrammingConfig,
    ProgrammingReport,
    cell_levels_to_weight_codes,
    programming_cost,
    weight_codes_to_cell_levels,
)
from core.errors import ConfigError


def test_codes_to_levels_by_hand() -> None:
    codes = torch.tensor([-8, 7, 0, -3])
    # u = code + 8: 0 -> [0,0]; 15 -> [3,3]; 8 = 0b10_00 -> [2,0]; 5 = 0b01_01 -> [1,1]
    levels = weight_codes_to_cell_levels(codes, weight_bits=4, bits_per_cell=2)
    assert levels.tolist() == [[0, 0], [3, 3], [2, 0], [1, 1]]
    assert levels.dtype == torch.uint8
    # 5-bit in 2-bit cells: 3 slices, the MSB slice holds 1 bit; 15 + 16 = 31 = 1_11_11
    five = weight_codes_to_cell_levels(torch.tensor([15, -16]), weight_bits=5, bits_per_cell=2)
    assert five.tolist() == [[1, 3, 3], [0, 0, 0]]
    with pytest.raises(ConfigError):
        weight_codes_to_cell_levels(torch.tensor([8]), weight_bits=4, bits_per_cell=2)
    with pytest.raises(ConfigError):
        weight_codes_to_cell_levels(torch.tensor([0.5]), weight_bits=4, bits_per_cell=2)
    with pytest.raises(ConfigError):
        cell_levels_to_weight_codes(torch.tensor([[2, 3, 3]]), weight_bits=5, bits_per_cell=2)


@settings(max_examples=200, deadline=None)
@given(
    weight_bits=st.integers(2, 8),
    bits_per_cell=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
)
def test_codes_levels_round_trip(weight_bits: int, bits_per_cell: int, seed: int,
                                 shape: list[int]) -> None:
    half = 2 ** (weight_bits - 1)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-half, half, tuple(shape), generator=gen, dtype=torch.int64)
    levels = weight_codes_to_cell_levels(codes, weight_bits=weight_bits,
                                         bits_per_cell=bits_per_cell)
    slices = -(-weight_bits // bits_per_cell)
    assert levels.shape == (*shape, slices)
    assert levels.numel() == 0 or int(levels.max()) < 2**bits_per_cell
    back = cell_levels_to_weight_codes(levels, weight_bits=weight_bits,
                                       bits_per_cell=bits_per_cell)
    assert torch.equal(back, codes)


def test_programming_energy_by_hand() -> None:
    cfg = ProgrammingConfig()
    # G levels: 1 uS, 4 uS, 7 uS, 10 uS (linear, 1 MOhm .. 100 kOhm); 31 / 3 -> 10 pulses/step
    assert cfg.pulses_per_level == 10
    assert cfg.conductance_s(torch.arange(4)).tolist() == pytest.approx([1e-6, 4e-6, 7e-6, 1e-5])
    old = torch.tensor([0, 2, 1, 0], dtype=torch.uint8)
    new = torch.tensor([3, 1, 1, 1], dtype=torch.uint8)
    r = programming_cost(old, new, cfg)
    # 0->3: 16 V^2 * 5.5 uS * 50 ns * 30 = 132 pJ
    # 2->1: 16 * 5.5 uS * 50 ns * 10 = 44 pJ;  1->1: not written
    # 0->1: 16 * 2.5 uS * 50 ns * 10 = 20 pJ;  total 196 pJ
    assert r.energy_j == pytest.approx(196e-12)
    assert (r.cells_written, r.pulses, r.level_changes) == (3, 50, 5)
    assert cfg.write_energy_j(0, 3) == pytest.approx(132e-12)
    assert cfg.write_energy_j(2, 2) == 0.0
    assert (r + r).to_dict() == {"energy_j": pytest.approx(392e-12), "cells_written": 6,
                                 "pulses": 100, "level_changes": 10}
    assert programming_cost(old, old, cfg) == ProgrammingReport()


def test_programming_config_validation() -> None:
    with pytest.raises(ConfigError):
        ProgrammingConfig(r_on_ohm=1e6, r_off_ohm=1e5)
    with pytest.raises(ConfigError):
        ProgrammingConfig(write_voltage_v=0)
    with pytest.raises(ConfigError):
        programming_cost(torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(ConfigError):
        programming_cost(torch.tensor([0, 1]), torch.tensor([1]))
    assert ProgrammingConfig(bits_per_cell=1).pulses_per_level == 31


def test_write_counter_counts_only_changed_cells() -> None:
    counter = CellWriteCounter(3, 2, 2, endurance=10)
    old = torch.zeros(2, 2, 2, dtype=torch.uint8)
    new = old.clone()
    new[0, 0, 0] = 1  # PE 2: one cell changes
    new[1] = 3  # PE 0: all four cells change
    assert counter.record([2, 0], old, new) == 5
    assert counter.total_writes == 5 and counter.max_writes == 1
    # the same PE twice in one call is two writes of that cell
    one = torch.zeros(2, 2, 2, dtype=torch.uint8)
    two = one.clone()
    two[:, 1, 1] = 2
    counter.record(torch.tensor([0, 0]), one, two)
    assert counter.counts[0].tolist() == [[1, 1], [1, 3]]
    assert counter.counts[1].sum() == 0
    assert counter.max_writes == 3 and counter.total_writes == 7
    assert counter.endurance_used == pytest.approx(0.3)
    restored = CellWriteCounter.from_counts(counter.counts, endurance=10)
    assert torch.equal(restored.counts, counter.counts)
    with pytest.raises(ConfigError):
        counter.record([3], old[:1], new[:1])
    with pytest.raises(ConfigError):
        counter.record([0], old, new)
