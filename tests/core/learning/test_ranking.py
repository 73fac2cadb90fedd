from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.learning.common import TrainConfig, warm_start_head
from core.learning.ranking import pe_sensitivity, select_top_pes
from core.learning.task_model import LayerAdapter, TaskModel


def test_select_top_pes_takes_exactly_the_top_fraction():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(3, 4, generator=g), "b": torch.rand(5, 2, generator=g),
              "c": torch.rand(1, 7, generator=g)}
    total = sum(s.numel() for s in scores.values())
    for fraction in (0.0, 0.05, 0.1, 0.4, 1.0):
        masks = select_top_pes(scores, fraction)
        chosen = torch.cat([scores[n][masks[n]] for n in scores])
        rest = torch.cat([scores[n][~masks[n]] for n in scores])
        assert chosen.numel() == round(fraction * total)
        if chosen.numel() and rest.numel():
            assert float(chosen.min()) > float(rest.max())
        assert all(masks[n].shape == scores[n].shape and masks[n].dtype == torch.bool
                   for n in scores)


def test_select_top_pes_breaks_ties_in_pe_order_and_checks_the_fraction():
    scores = {"a": torch.ones(2, 2), "b": torch.ones(1, 2)}
    masks = select_top_pes(scores, 0.5)
    assert masks["a"].reshape(-1).tolist() == [True, True, True, False]
    assert not masks["b"].any()
    with pytest.raises(ConfigError):
        select_top_pes(scores, 1.5)


class _OnePEScalar(LayerAdapter):
    """Independent reference: a scalar multiplying one PE's weights, built on the 4-D weight."""

    def __init__(self, layer, row_group: int, col_group: int) -> None:
        super().__init__(layer)
        m = self.mapping
        self.s = torch.nn.Parameter(torch.ones(()))
        region = torch.zeros_like(self.codes)
        ch = m.channels_per_row_group
        region[col_group * m.outputs_per_pe:(col_group + 1) * m.outputs_per_pe,
               row_group * ch:(row_group + 1) * ch] = 1
        self.register_buffer("region", region)

    def fold(self, scale, generator, stochastic):
        weight = self.codes * scale.reshape(-1, 1, 1, 1)
        return weight * (1 + (self.s - 1) * self.region)

    def export(self, chip_shift_levels):
        raise NotImplementedError


def test_pe_sensitivity_is_the_normalised_pe_mask_gradient(quantized_mobilenet, digits32):
    task_model = TaskModel(quantized_mobilenet, 10, channels_last=False)
    task_model.eval()
    warm_start_head(task_model.features, task_model.head, digits32.train,
                    TrainConfig(warm_start_images=64))
    x, y = digits32.train.batch(slice(0, 32))
    scores = pe_sensitivity(task_model, x, y)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    assert bool((flat >= 0).all()) and abs(float(flat.sum()) - 1) < 1e-5
    assert len(scores) == len(quantized_mobilenet.mapping.crossbar_layers)

    layer = max(quantized_mobilenet.mapping.crossbar_layers, key=lambda m: m.num_pes)
    name, last_r, last_c = layer.name, layer.row_groups - 1, layer.col_groups - 1
    assert last_r >= 1 and last_c >= 2
    picks = [(0, 0), (last_r, last_c), (last_r // 2, last_c // 2)]
    grads = []
    for r, c in picks:
        probe = _OnePEScalar(task_model.source_layer(name), r, c)
        task_model.set_adapters({name: probe})
        loss = F.cross_entropy(task_model(x), y)
        (g,) = torch.autograd.grad(loss, [probe.s])
        grads.append(abs(float(g)))
    task_model.set_adapters({})
    for (r, c), g in zip(picks, grads, strict=True):
        expected = g / grads[0] * float(scores[name][picks[0]])
        assert float(scores[name][r, c]) == pytest.approx(expected, rel=2e-3, abs=1e-9)
