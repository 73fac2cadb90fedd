"""Adapting a task with the chip in the loop: forward values are the served chip's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.chip.config import PAPER_CHIP, NonIdealities
from core.engine import CrossbarEngine
from core.learning import adapt, default_config
from core.learning.chip_loop import ChipInTheLoop
from core.learning.task_model import CrossbarAdapter, TaskModel
from core.nn.model import CrossbarModel
from tests.core.learning.conftest import state_bytes


@pytest.fixture(scope="module")
def paper_chip(quantized_mobilenet: CrossbarModel, images32: torch.Tensor) -> CrossbarModel:
    """The paper's periphery (72 rows at once, 4-bit DAC) with an 8-bit calibrated ADC:
    lossy (its sums need 12 bits), but the features still tell images apart (at 5 bits
    this backbone's are nearly constant)."""
    model = quantized_mobilenet.with_chip(**{**PAPER_CHIP, "adc_bits": 8})
    model.calibrate_adc(images32)
    return model


def _task_model(model: CrossbarModel, chip: ChipInTheLoop | None) -> TaskModel:
    task_model = TaskModel(model, 10, channels_last=False)
    names = task_model.crossbar_layer_names()
    adapters = {}
    for i, name in enumerate(names):
        mapping = task_model.mapping.layer(name)
        pe_mask = torch.zeros(mapping.row_groups, mapping.col_groups, dtype=torch.bool)
        if i % 3 == 0:
            pe_mask[0, 0] = True  # a spare PE in every third layer
        adapters[name] = CrossbarAdapter(task_model.source_layer(name), pe_mask=pe_mask)
    task_model.set_adapters(dict(adapters))
    with torch.no_grad():
        task_model.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        for adapter in adapters.values():  # spare PEs that differ from the backbone's
            adapter.spare_latent.add_(torch.randint(-2, 3, adapter.spare_latent.shape,
                                                    generator=torch.Generator().manual_seed(1)))
    if chip is not None:
        task_model.attach_chip(chip)
    return task_model.eval()


def test_the_forward_value_is_the_served_chip(paper_chip, images32) -> None:
    chip = ChipInTheLoop(paper_chip, NonIdealities(), "t")
    task_model = _task_model(paper_chip, chip)
    assert not chip.lossless or not chip.programs  # programs appear with the first pass
    with torch.no_grad():
        looped = task_model(images32)
    assert not chip.lossless  # the 8-bit ADC clips and rounds
    task = task_model.export("t", tuple(str(i) for i in range(10)))
    engine = CrossbarEngine(paper_chip)
    engine.add_task(task)
    served = engine.forward(images32, "t", "crossbar")
    ideal = engine.forward(images32, "t", "ideal")
    # The engine passes codes between layers in the code domain, the task model in
    # float: an activation on a rounding boundary may land on the other code, nothing more.
    assert (looped - served).norm() < 0.05 * (ideal - served).norm()
    # With gradients the value is the same (nothing changed: every program is reused),
    # and the gradient reaches the spare PEs.
    programs = dict(chip.programs)
    task_model.train()
    logits = task_model(images32)
    assert all(chip.programs[n] is p for n, p in programs.items())
    torch.testing.assert_close(logits, looped, rtol=0, atol=0)
    logits.square().sum().backward()
    spare_grads = [a.spare_latent.grad for a in task_model.adapters.values()
                   if isinstance(a, CrossbarAdapter) and a.spare_latent.numel()]
    assert spare_grads and all(g is not None and bool(g.abs().sum() > 0) for g in spare_grads)
    # A changed spare PE is programmed again; the other layers keep theirs.
    changed = next(n for n, a in task_model.current_adapters().items()
                   if isinstance(a, CrossbarAdapter) and a.spare_latent.numel())
    with torch.no_grad():
        task_model.current_adapters()[changed].spare_latent.add_(1.0)
        task_model(images32)
    assert chip.programs[changed] is not programs[changed]
    assert all(chip.programs[n] is p for n, p in programs.items() if n != changed)


def test_a_lossless_chip_adds_nothing(quantized_mobilenet, images32) -> None:
    # The default chip reads 9 rows bit-serially into a 5-bit ADC: every program is
    # lossless, so the loop leaves the float pass as it is (and emulates nothing).
    model = quantized_mobilenet
    chip = ChipInTheLoop(model, NonIdealities(), "t")
    looped, plain = _task_model(model, chip), _task_model(model, None)
    with torch.enable_grad():
        a, b = looped(images32), plain(images32)
    assert chip.programs and chip.lossless
    assert torch.equal(a, b)


def test_an_adapted_task_serves_as_trained_on_a_lossy_chip(paper_chip, digits32,
                                                           tiny_train) -> None:
    before = state_bytes(paper_chip)
    noise_free = dataclasses.replace(tiny_train, chip_periphery=True)
    config = dataclasses.replace(default_config("xma2"), train=noise_free)
    result = adapt("xma2", paper_chip, digits32, "looped", config)
    assert state_bytes(paper_chip) == before
    assert result.task is not None and result.trained_model is not None
    assert result.config["train"]["chip_periphery"] is True
    x, _ = digits32.test.batch(slice(0, 16))
    engine = CrossbarEngine(paper_chip)
    engine.add_task(result.task)
    with torch.no_grad():
        trained = result.trained_model(x.clone())
    served = engine.forward(x, "looped", "crossbar")
    ideal = engine.forward(x, "looped", "ideal")
    assert (trained - served).norm() < 0.05 * (ideal - served).norm()
    assert (trained.argmax(1) == served.argmax(1)).float().mean() >= 0.9


def test_the_agreement_term_teaches_the_ideal_view_the_chips_answers(paper_chip, digits32
                                                                     ) -> None:
    task_model = _task_model(paper_chip, ChipInTheLoop(paper_chip, NonIdealities(), "t"))
    with torch.no_grad():
        task_model.head.weight.mul_(0.01)  # soft answers, so the two views can differ
    x, _ = digits32.train.batch(slice(0, 16))
    task_model.train()
    task_model(x)
    assert task_model.regularization() is None  # weight 0: the chip's loss alone
    task_model.chip_agreement = 2.0
    chip_logits = task_model(x)
    term = task_model.regularization()
    assert term is not None
    assert task_model.regularization() is None  # taken once, by the step that made it
    chip, task_model.chip = task_model.chip, None
    ideal_logits = task_model(x)  # the same weights read without the chip
    task_model.chip = chip
    assert not torch.allclose(ideal_logits, chip_logits)
    expected = 2.0 * torch.nn.functional.kl_div(ideal_logits.log_softmax(1),
                                                chip_logits.softmax(1), reduction="batchmean")
    assert torch.allclose(term, expected, rtol=1e-4) and float(term) > 0
    term.backward()  # through the ideal view only: the chip's answers are the target
    assert float(task_model.head.weight.grad.abs().sum()) > 0
