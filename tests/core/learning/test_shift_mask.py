"""Column masks that move, anneal to the served mask, and are reported per level."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch

from core.backbones.shipped import load_backbone
from core.data.datasets import ImageSplit
from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.learning import RunOptions, adapt, default_config
from core.learning.column_masks import ColumnMaskConfig, mask_training, new_column_mask
from core.learning.common import StepInfo, TrainConfig, fit
from core.learning.registry import override_config, parse_settings
from core.learning.shift_mask import CategoricalColumnMask, anneal
from core.learning.task_model import CrossbarAdapter, TaskModel
from core.task_state import shift_values
from server.shipped_tasks import SHIPPED_DIR
from task_store import TaskStore

LEVELS = shift_values(3)


def _categorical(rows: int = 4, cols: int = 50, noise: float = 1.0) -> CategoricalColumnMask:
    return CategoricalColumnMask(rows, cols, shift_levels=3, prior=ColumnMaskConfig().prior,
                                 noise=noise)


def test_categorical_mask_starts_at_one_and_samples_only_shift_levels():
    mask = _categorical()
    assert bool((mask.codes(3) == 4).all())
    samples = torch.cat([mask(torch.Generator().manual_seed(s)).detach() for s in range(20)])
    assert set(samples.unique().tolist()) <= set(LEVELS.tolist())
    # With noise 1 a column samples another level in (N+1)/(N+1+e**prior) of steps.
    expected = 4 / (4 + math.exp(ColumnMaskConfig().prior))
    assert abs(float((samples != 1).float().mean()) - expected) < 0.03


@pytest.mark.parametrize("kind", ["threshold", "categorical"])
def test_noise_free_training_mask_is_the_served_mask_and_learns(kind):
    mask = new_column_mask(4, 50, 3, ColumnMaskConfig(kind=kind, noise=1.0))
    with torch.no_grad():
        mask.logits.normal_(generator=torch.Generator().manual_seed(0))
    noisy = mask(torch.Generator().manual_seed(1)).detach()
    assert not torch.equal(noisy, mask(stochastic=False))  # noise 1 samples other levels
    mask.set_schedule(0.5, 0.0)
    trained = mask(torch.Generator().manual_seed(1))
    assert torch.equal(trained.detach(), mask(stochastic=False))
    assert torch.equal(mask(stochastic=False), LEVELS[mask.codes(3).long()])
    assert (mask(stochastic=False) < 1).any()
    trained.sum().backward()
    assert mask.logits.grad is not None and bool(mask.logits.grad.abs().sum() > 0)


def test_schedule_anneals_noise_to_zero_and_temperature_to_final():
    config = ColumnMaskConfig(temperature=2.0, final_temperature=0.5, noise=1.0, noise_until=0.5)
    assert config.schedule(0.0) == (2.0, 1.0)
    t_mid, n_mid = config.schedule(0.25)
    assert 0.5 < t_mid < 2.0 and 0.0 < n_mid < 1.0
    assert config.schedule(0.5) == pytest.approx((0.5, 0.0))
    assert config.schedule(0.9) == pytest.approx((0.5, 0.0))
    assert anneal(1.0, 0.0, 0.3, 0.0) == 0.0  # no annealing phase: final at once
    assert ColumnMaskConfig(noise=1.0, noise_until=1e9).schedule(1.0)[1] > 0.99  # never off
    with pytest.raises(ConfigError, match="kind"):
        ColumnMaskConfig(kind="softmax")
    with pytest.raises(ConfigError, match="noise_until"):
        ColumnMaskConfig(noise_until=-1)


def _synthetic_run(config: ColumnMaskConfig, steps: int, seed: int = 0
                   ) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    """Columns whose best multiplier is known: ``y = sum_c target_c * x_c`` from noisy
    batches, trained with the recipe's optimizer group, cosine decay and annealing."""
    g = torch.Generator().manual_seed(seed)
    cols = 64
    target = LEVELS[torch.randint(0, 5, (1, cols), generator=g)]
    mask = new_column_mask(1, cols, 3, config)
    groups, before_step = mask_training({"layer": mask}, config)
    for group in groups:
        group["initial_lr"] = group["lr"]
    optimizer = torch.optim.Adam(groups)
    served = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
        assert before_step is not None
        before_step(step / steps)
        x = torch.randn(32, cols, generator=g)
        y = x @ target[0] + 0.1 * torch.randn(32, generator=g)
        loss = ((x @ mask(torch.Generator().manual_seed(step))[0] - y) ** 2).mean()
        penalty = mask.penalty()
        if penalty is not None:
            loss = loss + penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        served.append(mask(stochastic=False).detach().clone())
    return mask, target, served


@pytest.mark.parametrize("changes", [{}, {"noise": 0.5}])
def test_default_recipe_moves_columns_off_one_in_a_short_run(changes):
    config = dataclasses.replace(ColumnMaskConfig(), **changes)
    mask, target, served = _synthetic_run(config, steps=150)
    assert bool((served[0] == 1).all())  # it starts at the backbone
    final = served[-1]
    should_move = target != 1
    moved = (final != 1) & should_move
    # The old recipe (one logit from 8 at lr 0.1) cannot leave 1 in 150 steps; this must.
    assert float(moved.sum()) >= 0.8 * float(should_move.sum())
    assert bool((final[target == 1] == 1).all())  # and only where the loss asks for it
    error, start_error = (final - target).abs().mean(), (1 - target).abs().mean()
    assert not final.requires_grad
    assert float(error) <= 0.3 * float(start_error)
    # The noise is 0 for the last third: training then sees exactly the served mask, and
    # the mask settles (cosine decay) rather than flipping to the end.
    temperature, noise = config.schedule(1.0)
    mask.set_schedule(temperature, noise)
    assert noise == 0 and torch.equal(mask(torch.Generator().manual_seed(9)).detach(), final)
    last = served[-20:]
    assert sum(not torch.equal(a, b) for a, b in itertools.pairwise(last)) <= 2


def test_l1_pressure_moves_columns_to_cheaper_levels():
    plain, _, _ = _synthetic_run(ColumnMaskConfig(), steps=150)
    pressed, _, _ = _synthetic_run(ColumnMaskConfig(l1=20.0), steps=150)
    assert pressed.penalty() is not None and plain.penalty() is None
    assert float(pressed(stochastic=False).detach().sum()) < float(
        plain(stochastic=False).detach().sum())


def test_xma_reports_level_shares_per_epoch_and_serves_what_it_trained(
        quantized_mobilenet, digits32, tiny_train):
    # A learning rate large enough for 12 steps, and noise annealed to 0 after half of them.
    config = default_config("xma")
    config = dataclasses.replace(config, train=dataclasses.replace(tiny_train, epochs=2),
                                 mask=dataclasses.replace(config.mask, lr=0.5, noise=1.0,
                                                          noise_until=0.5))
    reported: list[StepInfo] = []
    result = adapt("xma", quantized_mobilenet, digits32, "shares", config,
                   RunOptions(on_step=lambda i: reported.append(i) if i.epoch_metrics else None))
    assert [i.epoch for i in reported] == [0, 1]
    counts = result.details["column_code_counts"]
    shares = result.details["column_level_shares"]
    assert list(shares) == ["columns_at_0", "columns_at_1/8", "columns_at_1/4",
                            "columns_at_1/2", "columns_at_1"]
    total = sum(counts)
    assert shares == pytest.approx({k: c / total for k, c in zip(shares, counts, strict=True)})
    assert reported[-1].epoch_metrics == pytest.approx(shares)
    assert [h["columns_at_1"] for h in result.history] == [
        i.epoch_metrics["columns_at_1"] for i in reported]
    assert shares["columns_at_1"] < 1.0  # the masks moved
    # What training converged to (noise annealed to 0) is what the task serves.
    model = result.trained_model
    assert isinstance(model, TaskModel)
    task = result.task
    for name, adapter in model.current_adapters().items():
        assert isinstance(adapter, CrossbarAdapter) and adapter.column_mask is not None
        assert adapter.column_mask.noise == 0
        trained = adapter.column_mask(torch.Generator().manual_seed(0), stochastic=True)
        assert torch.equal(trained.detach(), LEVELS[task.layers[name].column_codes.long()])


def test_frozen_masks_are_the_ablation(quantized_mobilenet, digits32, tiny_train):
    config = default_config("xma2")
    config = dataclasses.replace(config, train=tiny_train,
                                 mask=dataclasses.replace(config.mask, learn=False))
    result = adapt("xma2", quantized_mobilenet, digits32, "frozen", config)
    assert result.details["column_level_shares"]["columns_at_1"] == 1.0
    assert result.task.replaced_pes > 0  # the spare PEs still train
    assert all(not isinstance(a.column_mask, torch.nn.Module)
               for a in result.trained_model.current_adapters().values())


def test_the_earlier_recipe_is_a_setting_and_never_moved(quantized_mobilenet, digits32,
                                                          tiny_train):
    earlier = parse_settings(["mask.init_logit=8", "mask.lr=0.1", "mask.lr_warmup=0",
                              "mask.noise=1", "mask.noise_until=1e9"])
    config = override_config(dataclasses.replace(default_config("xbm"), train=tiny_train),
                             earlier)
    result = adapt("xbm", quantized_mobilenet, digits32, "earlier", config)
    assert result.details["column_level_shares"]["columns_at_1"] == 1.0


def test_the_shipped_archive_loads_and_serves(tmp_path):
    backbone = load_backbone(None)
    with TaskStore.for_model(tmp_path, backbone) as store:
        record = store.import_archive(SHIPPED_DIR / "mnist.tar")
        stored = store.get(record.task, record.version)
    engine = CrossbarEngine(copy.deepcopy(backbone))
    engine.add_task(stored.task)
    x = torch.rand(2, 3, 64, 64)
    assert engine.forward(x, stored.task.task_id).shape == (2, 10)


class _Bias(torch.nn.Module):
    """Logits = a learnable per-class bias: the smallest module ``fit`` can train."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 3)


@pytest.mark.parametrize("warmup", [0.0, 0.5])
def test_a_warmed_up_group_starts_with_small_steps(warmup):
    split = ImageSplit(torch.zeros(64, 1, 4, 4, dtype=torch.uint8),
                       torch.zeros(64, dtype=torch.int64), ["a", "b", "c"])
    module = _Bias()
    trace = []
    group = {"params": [module.bias], "lr": 0.1, "schedule": "constant", "warmup": warmup}
    fit(module, [group], split, TrainConfig(epochs=1, batch_size=8, checkpoint_every=0),
        RunOptions(on_step=lambda _: trace.append(float(module.bias.detach()[0]))),
        description="warmup", checkpoint_meta={})
    first, last = trace[0], trace[-1] - trace[-2]
    # Adam's first step moves by the full rate whatever the gradient: 0.1, or 0.1 / 4 steps.
    assert first == pytest.approx(0.1 if warmup == 0 else 0.1 / 4, rel=1e-3)
    assert last == pytest.approx(0.1, rel=0.2)
