"""The compiled training pass learns what the eager one does, and never stops a run."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

from core.learning import RunOptions, TrainingCancelled, adapt
from core.learning import task_model as tm_module
from core.learning.common import StepInfo
from tests.core.learning.test_methods import _assert_same_task, _config
from tests.core.learning.test_training_step import _loss_and_grads, _xma2_model


@pytest.mark.slow  # compiling takes about a minute; train.compile is off by default
def test_compiled_step_agrees_with_the_eager_step(quantized_mobilenet, digits32):
    """Loss and every gradient of one XMA2 step (spare codes, column masks, BatchNorm terms,
    head) agree with the eager step's; fused loops may round a float differently, so a
    quantized activation now and then lands one level over: close, not equal."""
    model = _xma2_model(quantized_mobilenet, channels_last=True)
    x, y = digits32.train.batch(slice(0, 16))
    model.eval()
    with torch.no_grad():
        served = model(x)
    eager_loss, eager_grads = _loss_and_grads(model, x, y)
    model.compile_training_pass()
    loss, grads = _loss_and_grads(model, x, y)
    assert model.compiled
    assert torch.allclose(loss, eager_loss, rtol=1e-3)
    compared = 0
    for g, reference in zip(grads, eager_grads, strict=True):
        assert (g is None) == (reference is None)
        if g is None or not bool(reference.abs().sum() > 0):
            continue
        cosine = F.cosine_similarity(g.flatten(), reference.flatten(), dim=0)
        assert float(cosine) > 0.99
        compared += 1
    assert compared > 50
    # Passes without autograd stay eager: the view that is served is exact.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), served)


def test_a_failed_compile_trains_eagerly(quantized_mobilenet, digits32, monkeypatch, caplog):
    def broken(function, **_):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler\ndetails")
        return run

    model = _xma2_model(quantized_mobilenet, channels_last=False)
    x, y = digits32.train.batch(slice(0, 16))
    eager_loss, _ = _loss_and_grads(model, x, y)
    monkeypatch.setattr(tm_module.torch, "compile", broken)
    model.compile_training_pass()
    with caplog.at_level("WARNING"):
        loss, _ = _loss_and_grads(model, x, y)
    assert not model.compiled
    assert "compiling the training pass failed (RuntimeError: no C++ compiler)" in caplog.text
    assert torch.equal(loss, eager_loss)


@pytest.mark.slow
def test_a_compiled_run_is_deterministic_and_resumes_exactly(quantized_mobilenet, digits32,
                                                             tiny_train, tmp_path):
    """Two compiled runs of a seed end on the same task, and so does one cancelled after
    three steps and resumed from its checkpoint (compiled again in the resumed run)."""
    train = dataclasses.replace(tiny_train, compile=True, channels_last=True,
                                checkpoint_every=2)
    config = _config("xma2", train)
    first = adapt("xma2", quantized_mobilenet, digits32, "det", config)
    assert first.details["compiled_training_pass"] is True
    again = adapt("xma2", quantized_mobilenet, digits32, "det", config)
    _assert_same_task(first.task, again.task)
    cancel = threading.Event()

    def stop_after_three(info: StepInfo) -> None:
        if info.step == 2:
            cancel.set()

    with pytest.raises(TrainingCancelled):
        adapt("xma2", quantized_mobilenet, digits32, "det", config,
              RunOptions(cancel=cancel, checkpoint_dir=tmp_path, on_step=stop_after_three))
    resumed = adapt("xma2", quantized_mobilenet, digits32, "det", config,
                    RunOptions(checkpoint_dir=tmp_path))
    _assert_same_task(first.task, resumed.task)
    eager = adapt("xma2", quantized_mobilenet, digits32, "det",
                  _config("xma2", dataclasses.replace(train, compile=False)))
    assert eager.details["compiled_training_pass"] is False
