from __future__ import annotations

import pytest
import torch
from torch import nn

from core.chip.config import CrossbarConfig
from core.chip.mapping import Placement, map_layer
from core.errors import ConfigError
from core.nn.model import CrossbarModel


def test_mapping_covers_every_weight_exactly_once(quantized_mobilenet: CrossbarModel):
    mapping = quantized_mobilenet.mapping
    slots_seen = 0
    for layer in mapping.crossbar_layers:
        rows = torch.arange(layer.weight_rows)
        outs = torch.arange(layer.out_channels)
        row_group = rows // layer.rows_per_group
        col_group = outs // layer.outputs_per_pe
        pe_index = row_group[:, None] * layer.col_groups + col_group[None, :]
        row_in_pe = (rows % layer.rows_per_group)[:, None].expand(-1, layer.out_channels)
        first_column = torch.tensor([layer.column_of(int(o), 0) for o in outs])
        # every (row, output, slice) lands on a distinct (PE, row, column) cell
        for cell_slice in range(layer.slices):
            column = (first_column + cell_slice)[None, :].expand(layer.weight_rows, -1)
            assert int(column.max()) < layer.crossbar_cols
            cell = (pe_index * layer.crossbar_rows + row_in_pe) * layer.crossbar_cols + column
            assert cell.unique().numel() == cell.numel()
            slots_seen += cell.numel()
        # the PE grid holds exactly these weights
        sizes = sum(layer.rows_in_group(r) * layer.outputs_in_col_group(c)
                    for r in range(layer.row_groups) for c in range(layer.col_groups))
        assert sizes == layer.weight_rows * layer.out_channels
        spot = layer.pe_of(layer.weight_rows - 1, layer.out_channels - 1)
        assert (spot.row_group, spot.col_group) == (layer.row_groups - 1, layer.col_groups - 1)
    assert slots_seen == mapping.cells_used
    ids = list(mapping.pe_ids())
    assert len(ids) == len(set(ids)) == mapping.num_pes
    assert [mapping.pe_index(pe) for pe in ids] == list(range(mapping.num_pes))


def test_mobilenet_mapping_report(quantized_mobilenet: CrossbarModel):
    mapping = quantized_mobilenet.mapping
    depthwise = [m for m in mapping.layers if m.groups > 1]
    assert len(depthwise) == 17
    assert all(m.placement is Placement.DIGITAL and m.num_pes == 0 for m in depthwise)
    first = mapping.layers[0]
    assert (first.weight_bits, first.slices, first.outputs_per_pe) == (8, 4, 18)
    assert (first.row_groups, first.col_groups, first.rows_per_group) == (1, 2, 72)
    project = mapping.layer("features.18.0")  # 1x1, 320 -> 1280
    assert (project.row_groups, project.col_groups) == (5, 36)
    assert project.utilisation == pytest.approx(320 * 1280 * 2 / (5 * 36 * 72 * 72))
    rows = mapping.report()
    assert len(rows) == len(mapping.layers)
    assert sum(r["pes"] for r in rows) == mapping.num_pes


def test_map_layer_rejects_what_does_not_fit():
    config = CrossbarConfig(rows=8)
    with pytest.raises(ConfigError, match="needs 9 rows"):
        map_layer("big", 0, nn.Conv2d(4, 4, 3), config, weight_bits=4, input_bits=4,
                  input_signed=False)
    with pytest.raises(ConfigError, match="depthwise"):
        map_layer("g", 0, nn.Conv2d(4, 8, 1, groups=2), CrossbarConfig(), weight_bits=4,
                  input_bits=4, input_signed=False)


def test_config_validation_lists_allowed_values():
    with pytest.raises(ConfigError, match="multi_bit, bit_serial"):
        CrossbarConfig(dac_mode="analog")
    with pytest.raises(ConfigError, match="multiple"):
        CrossbarConfig(cols=71)
    assert CrossbarConfig.from_dict(CrossbarConfig(adc_bits=6).to_dict()) == CrossbarConfig(
        adc_bits=6)
