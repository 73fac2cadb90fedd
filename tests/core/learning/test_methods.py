"""Every method on a tiny real task: served state == trained model, backbone untouched."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.learning import RunOptions, TrainingCancelled, adapt, default_config
from core.learning.column_masks import ColumnMaskConfig
from core.learning.common import StepInfo
from core.learning.registry import METHODS, override_config, parse_settings
from core.task_state import TaskState
from tests.core.learning.conftest import state_bytes


def _config(method: str, train, **changes):
    config = dataclasses.replace(default_config(method), train=train)
    return dataclasses.replace(config, **changes) if changes else config


def _assert_same_task(a: TaskState, b: TaskState) -> None:
    assert a.layers.keys() == b.layers.keys() and a.digital.keys() == b.digital.keys()
    for name in a.layers:
        for part in ("pe_mask", "spare_codes", "column_codes"):
            assert torch.equal(getattr(a.layers[name], part), getattr(b.layers[name], part))
    for name in a.digital:
        assert torch.equal(a.digital[name], b.digital[name])
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert a.confidence == b.confidence


@pytest.fixture()
def engine(quantized_mobilenet):
    return CrossbarEngine(quantized_mobilenet)


@pytest.mark.parametrize("method", ["xma2", "xma", "xbm", "piggyback", "finetune_qat",
                                    "head_bn"])
def test_served_task_equals_the_trained_model_and_backbone_is_untouched(
        method, quantized_mobilenet, digits32, tiny_train, engine):
    before = state_bytes(quantized_mobilenet)
    result = adapt(method, quantized_mobilenet, digits32, f"t-{method}",
                   _config(method, tiny_train))
    assert state_bytes(quantized_mobilenet) == before  # no forgetting by construction
    task = result.task
    assert task is not None and result.trained_model is not None
    engine.add_task(task)  # validates shapes, code ranges, BatchNorm names
    x, _ = digits32.test.batch(slice(0, 32))
    with torch.no_grad():
        trained = result.trained_model(x.clone())
    assert torch.equal(engine.forward(x, task.task_id), trained)
    assert result.steps == len(digits32.train) // tiny_train.batch_size
    assert 0.0 <= result.val_accuracy <= 1.0
    # calibrated on the served logits of the validation split, without touching the backbone
    assert task.confidence.fitted_on == len(digits32.val)
    assert task.confidence.ood_threshold is not None
    assert result.details["confidence"]["temperature"] == task.confidence.temperature
    val_x, _ = digits32.val.batch(slice(0, len(digits32.val)))
    scores = task.confidence.scores(engine.forward(val_x, task.task_id))
    flagged = float(task.confidence.flags(scores).double().mean())
    assert flagged <= 0.05 + 1 / len(digits32.val)  # the threshold keeps 95% in
    mapping = quantized_mobilenet.mapping
    if method in ("piggyback", "finetune_qat"):
        assert task.replaced_pes == mapping.num_pes
    elif method == "xma2":
        assert task.replaced_pes == round(0.1 * mapping.num_pes)
    else:
        assert task.replaced_pes == 0
    if method == "xbm":
        codes = torch.cat([s.column_codes.reshape(-1) for s in task.layers.values()])
        assert set(codes.unique().tolist()) <= {0, 4}
    if method == "head_bn":
        assert task.layers == {} and task.digital


def test_spare_pes_learn_codes_in_the_signed_range_and_masks_cover_frozen_columns(
        quantized_mobilenet, digits32, tiny_train):
    train = dataclasses.replace(tiny_train, epochs=2)
    result = adapt("xma2", quantized_mobilenet, digits32, "learns",
                   _config("xma2", train, lr_spare=0.5, pe_fraction=0.2))
    task = result.task
    layers = dict(quantized_mobilenet.layers())
    changed = 0
    for name, state in task.layers.items():
        bits = layers[name].weight_bits
        if state.replaced_pes:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            assert int(state.spare_codes.min()) >= lo and int(state.spare_codes.max()) <= hi
            from core.learning.task_model import pe_blocks
            from core.ops.fold import to_row_groups

            mapping = layers[name].mapping
            old = pe_blocks(to_row_groups(layers[name].weight_codes, mapping), mapping)
            changed += int((old[state.pe_mask] != state.spare_codes).sum())
    assert changed > 0  # a large learning rate must move some codes across a level
    from core.ops.fold import replaced_columns

    frozen = sum(int((~replaced_columns(s.pe_mask, layers[n].mapping)).sum())
                 for n, s in task.layers.items())
    counts = result.details["column_code_counts"]
    assert len(counts) == 5 and sum(counts) == frozen


def test_training_is_deterministic_and_resumes_exactly(quantized_mobilenet, digits32,
                                                       tiny_train, tmp_path):
    train = dataclasses.replace(tiny_train, checkpoint_every=2)
    config = _config("xma2", train)
    first = adapt("xma2", quantized_mobilenet, digits32, "det", config).task
    again = adapt("xma2", quantized_mobilenet, digits32, "det", config).task
    _assert_same_task(first, again)

    cancel = threading.Event()

    def stop_after_three(info: StepInfo) -> None:
        if info.step == 2:
            cancel.set()

    with pytest.raises(TrainingCancelled) as stopped:
        adapt("xma2", quantized_mobilenet, digits32, "det", config,
              RunOptions(cancel=cancel, checkpoint_dir=tmp_path, on_step=stop_after_three))
    assert stopped.value.step == 3
    assert (tmp_path / "checkpoint.json").is_file()
    resumed = adapt("xma2", quantized_mobilenet, digits32, "det", config,
                    RunOptions(checkpoint_dir=tmp_path)).task
    _assert_same_task(first, resumed)

    other = _config("xma2", train, pe_fraction=0.2)
    with pytest.raises(ConfigError, match="another run"):
        adapt("xma2", quantized_mobilenet, digits32, "det", other,
              RunOptions(checkpoint_dir=tmp_path))


def test_fp32_finetuning_is_an_upper_bound_only(quantized_mobilenet, fp32_mobilenet,
                                                digits32, tiny_train):
    from core.learning.finetune import adapt_finetune_fp32

    before = {k: v.clone() for k, v in fp32_mobilenet.state_dict().items()}
    result = adapt_finetune_fp32(quantized_mobilenet, digits32, "fp32",
                                 _config("finetune_fp32", tiny_train), RunOptions(),
                                 fp32_backbone=fp32_mobilenet)
    assert result.task is None and result.trained_model is not None
    assert not METHODS["finetune_fp32"].servable
    assert any(not torch.equal(p, before[k])
               for k, p in result.trained_model.body.state_dict().items())
    assert all(torch.equal(v, fp32_mobilenet.state_dict()[k]) for k, v in before.items())
    x, _ = digits32.test.batch(slice(0, 4))
    assert result.trained_model(x).shape == (4, 10)


def test_configs_reject_bad_settings():
    with pytest.raises(ConfigError, match="unknown method"):
        default_config("lora")
    with pytest.raises(ConfigError, match="only applies to xma2"):
        default_config("xma", pe_fraction=0.1)
    with pytest.raises(ConfigError):
        default_config("xma2", pe_fraction=1.5)
    with pytest.raises(ConfigError, match="takes a"):
        adapt("xma", None, None, "x", default_config("xma2"))  # type: ignore[arg-type]


def test_settings_override_nested_defaults_by_their_types():
    config = override_config(default_config("xma2"), parse_settings(
        ["mask.init_logit=6", "train.batch_size=32", "mask.shift_levels=none",
         "train.cosine_schedule=false", "pe_fraction=0.2"]))
    assert config.mask.init_logit == 6.0 and config.train.batch_size == 32
    assert config.mask.shift_levels is None and config.train.cosine_schedule is False
    assert config.pe_fraction == 0.2
    assert default_config("xma2").mask.init_logit == ColumnMaskConfig().init_logit  # untouched
    with pytest.raises(ConfigError, match=r"no setting 'mask\.init'"):
        override_config(default_config("xma2"), {"mask.init": "1"})
    with pytest.raises(ConfigError, match="not a valid int"):
        override_config(default_config("xma"), {"train.batch_size": "big"})
    with pytest.raises(ConfigError, match="must be >= 1"):  # the dataclass re-validates
        override_config(default_config("xma"), {"train.epochs": "0"})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_settings(["mask.init_logit"])
