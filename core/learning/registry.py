"""Method name -> default config and trainer, so the CLI, the grid and jobs share one table."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from core.data.datasets import TaskDataset
from core.errors import ConfigError
from core.learning.column_masks import (
    ColumnMaskConfig,
    HeadOnlyConfig,
    XmaConfig,
    adapt_column_mask,
    adapt_head_only,
)
from core.learning.common import AdaptationResult, RunOptions, TrainConfig
from core.learning.finetune import (
    Fp32FinetuneConfig,
    QatFinetuneConfig,
    adapt_finetune_fp32,
    adapt_finetune_qat,
)
from core.learning.piggyback import PiggybackConfig, adapt_piggyback
from core.learning.task_confidence import calibrate_task
from core.learning.xma2 import Xma2Config, adapt_xma2
from core.nn.model import CrossbarModel
from core.task_state import TaskState

__all__ = ["METHODS", "MethodSpec", "adapt", "default_config", "method_names",
           "override_config", "parse_settings", "setting_names"]

Trainer = Callable[[CrossbarModel, TaskDataset, str, Any, RunOptions], AdaptationResult]


class WarmTrainer(Protocol):
    """A trainer that can also start from a served task (``initial``)."""

    def __call__(self, model: CrossbarModel, data: TaskDataset, task_id: str, config: Any,
                 options: RunOptions, *, initial: TaskState | None = None
                 ) -> AdaptationResult: ...


@dataclass(frozen=True)
class MethodSpec:
    """One learning method: its defaults, its trainer and what it trains."""

    name: str
    config: Callable[[], Any]
    trainer: Trainer
    trains: str
    servable: bool = True
    """Whether the result is a 4-bit task state (False: an fp32 upper bound only)."""
    in_place: bool = False
    """Whether the task rewrites the backbone's own PEs (reprogrammed from the backbone's
    levels) rather than spare PEs (programmed from erased cells)."""
    warm_trainer: WarmTrainer | None = None
    """The trainer that starts from a served task of this method (None: always fresh)."""

    @property
    def takes_pe_fraction(self) -> bool:
        """Whether the method replaces a fraction P of the PEs (a tier-1 PE mask)."""
        return any(f.name == "pe_fraction" for f in dataclasses.fields(self.config()))


def _xbm_config() -> XmaConfig:
    return XmaConfig(mask=ColumnMaskConfig(shift_levels=0))


def _xbm(model: CrossbarModel, data: TaskDataset, task_id: str, config: XmaConfig,
         options: RunOptions, *, initial: TaskState | None = None) -> AdaptationResult:
    return adapt_column_mask(model, data, task_id, config, options, method="xbm",
                             initial=initial)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (
        MethodSpec("finetune_fp32", Fp32FinetuneConfig, adapt_finetune_fp32,
                   "every fp32 weight (incl. depthwise), BatchNorm affine, head",
                   servable=False),
        MethodSpec("finetune_qat", QatFinetuneConfig, adapt_finetune_qat,
                   "4-bit codes of every crossbar PE (all PEs are spare PEs), BatchNorm "
                   "affine, head", in_place=True, warm_trainer=adapt_finetune_qat),
        MethodSpec("piggyback", PiggybackConfig, adapt_piggyback,
                   "element-wise binary mask of every crossbar weight, BatchNorm affine, head",
                   in_place=True),
        MethodSpec("xbm", _xbm_config, _xbm,
                   "binary column mask of every PE, BatchNorm affine, head",
                   warm_trainer=_xbm),
        MethodSpec("xma", XmaConfig, adapt_column_mask,
                   "column shift mask (N=3) of every PE, BatchNorm affine, head",
                   warm_trainer=adapt_column_mask),
        MethodSpec("xma2", Xma2Config, adapt_xma2,
                   "4-bit codes of the top-P% PEs (spare PEs), column shift mask of the "
                   "others, BatchNorm affine, head", warm_trainer=adapt_xma2),
        MethodSpec("head_bn", HeadOnlyConfig, adapt_head_only,
                   "BatchNorm affine and head only (no crossbar state)",
                   warm_trainer=adapt_head_only),
    )
}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def _spec(method: str) -> MethodSpec:
    try:
        return METHODS[method]
    except KeyError as e:
        raise ConfigError(f"unknown method {method!r}; choose one of "
                          f"{', '.join(METHODS)}") from e


def default_config(method: str, *, pe_fraction: float | None = None,
                   **train_overrides: Any) -> Any:
    """The method's defaults with overrides of its :class:`TrainConfig` fields (and P)."""
    config = _spec(method).config()
    unknown = sorted(set(train_overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"unknown training settings {unknown}")
    train = dataclasses.replace(config.train, **{k: v for k, v in train_overrides.items()
                                                 if v is not None})
    config = dataclasses.replace(config, train=train)
    if pe_fraction is not None:
        if not _spec(method).takes_pe_fraction:
            raise ConfigError(f"pe_fraction (P) only applies to xma2, not {method}")
        config = dataclasses.replace(config, pe_fraction=pe_fraction)
    return config


def parse_settings(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["mask.init_logit=6", ...]`` -> ``{"mask.init_logit": "6"}``."""
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"a setting is KEY=VALUE, e.g. mask.init_logit=6; got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings


def setting_names(config: Any, prefix: str = "") -> list[str]:
    """Every dotted setting a config accepts (what ``--set`` can name)."""
    names: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            names += setting_names(value, f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


def _parse_value(annotation: Any, text: str, key: str) -> Any:
    """Parse ``text`` as the field's annotated type (``int | None`` takes ``none``)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else (annotation,)
    if type(None) in options and text.lower() == "none":
        return None
    for kind in (bool, int, float, str):
        if kind not in options:
            continue
        if kind is bool:
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
            continue
        try:
            return kind(text)
        except ValueError:
            continue
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"setting {key}: {text!r} is not a valid {names}")


def _with_setting(config: Any, path: list[str], text: str, key: str) -> Any:
    head, rest = path[0], path[1:]
    if rest:
        inner = _with_setting(getattr(config, head), rest, text, key)
        return dataclasses.replace(config, **{head: inner})
    annotation = typing.get_type_hints(type(config))[head]
    return dataclasses.replace(config, **{head: _parse_value(annotation, text, key)})


def override_config(config: Any, settings: dict[str, str]) -> Any:
    """A copy of ``config`` with dotted settings replaced (``train.batch_size``,
    ``mask.init_logit``); values are parsed as the field's annotated type and every
    dataclass re-validates its own."""
    accepted = setting_names(config)
    for key, text in settings.items():
        if key not in accepted:
            raise ConfigError(f"{type(config).__name__} has no setting {key!r}; it has "
                              f"{', '.join(accepted)}")
        config = _with_setting(config, key.split("."), text, key)
    return config


def adapt(method: str, model: CrossbarModel, data: TaskDataset, task_id: str,
          config: Any = None, options: RunOptions | None = None, *,
          initial: TaskState | None = None) -> AdaptationResult:
    """Adapt the frozen backbone to a new task with one method (the backbone is not modified).

    A servable task comes back calibrated: its temperature and OOD threshold are fitted
    on the validation split (:func:`core.learning.task_confidence.calibrate_task`); with no
    validation images it stays uncalibrated (T = 1, nothing flagged).

    Args:
        method: a name from :data:`METHODS`.
        model: the frozen backbone (never modified).
        data: the task's splits (train for learning, val for the reported val accuracy).
        task_id: name of the resulting task state.
        config: the method's config dataclass (default: :func:`default_config`).
        options: cancel event, checkpoint folder, progress.
        initial: a served task of the same method and dataset to train further (a warm
            start: for a new chip, or more epochs) instead of starting from the backbone.
    """
    spec = _spec(method)
    if config is None:
        config = default_config(method)
    expected = type(spec.config())
    if not isinstance(config, expected):
        raise ConfigError(f"{method} takes a {expected.__name__}, got {type(config).__name__}")
    if initial is None:
        result = spec.trainer(model, data, task_id, config, options or RunOptions())
    elif spec.warm_trainer is None:
        raise ConfigError(f"{method} cannot start from a task state; methods that can: "
                          + ", ".join(n for n, s in METHODS.items() if s.warm_trainer))
    else:
        result = spec.warm_trainer(model, data, task_id, config, options or RunOptions(),
                                   initial=initial)
    if result.task is None or len(data.val) == 0 or len(data.train) == 0:
        return result
    task = calibrate_task(model, result.task, data.train, data.val, seed=config.train.seed)
    fitted = {k: v for k, v in task.confidence.to_dict().items()
              if k not in ("class_means", "logit_variance")}  # the manifest keeps those
    return dataclasses.replace(result, task=task, details={**result.details,
                                                           "confidence": fitted})
