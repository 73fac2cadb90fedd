"""The training loop every method shares: data order, progress, cancel, checkpoints.

A run is deterministic for a seed: the data order of epoch ``e`` comes from a
generator seeded with ``(seed, e)`` and the Gumbel noise of step ``s`` from one
seeded with ``(seed, s)``, so a run resumed from a checkpoint takes exactly the
steps an uninterrupted one would. Checkpoints are a safetensors file (trainable
tensors and optimizer moments) plus a JSON file (step, config, history), both
written atomically; the JSON is written last and names the step, so a crash
between the two leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import torch
import torch.nn.functional as F
import torch.utils.deterministic
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.atomic import atomic_write
from core.chip.config import noise_level
from core.data.datasets import ImageSplit
from core.errors import ConfigError, TrainingCancelled
from core.learning.optim import adam
from core.learning.probe import linear_probe
from core.task_state import TaskState

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "1"
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"

__all__ = [
    "AdaptationResult",
    "RunOptions",
    "StepInfo",
    "TrainConfig",
    "TrainingCancelled",
    "accuracy",
    "deterministic",
    "fit",
    "seeded_generator",
    "to_channels_last",
    "warm_start_head",
]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the loop shared by every method."""

    epochs: int = 3
    """Passes over the training split (3 x 10,000 images fit the 5-minute target on 2 cores)."""
    batch_size: int = 64
    lr_head: float = 1e-3
    """Adam learning rate of the task head (warm-started by a linear probe)."""
    lr_batchnorm: float = 1e-3
    """Adam learning rate of the per-task BatchNorm affine terms."""
    train_batchnorm: bool = True
    """Learn per-task BatchNorm affine terms (digital state, no cell written)."""
    warm_start_images: int = 2048
    """Training images whose frozen features fit the initial head (linear probe)."""
    cosine_schedule: bool = True
    """Cosine decay of every learning rate to 0 over the run."""
    channels_last: bool = True
    seed: int = 0
    checkpoint_every: int = 100
    """Steps between checkpoints when a checkpoint folder is given (0: only at the end)."""
    chip_noise: str = "none"
    """Adapt for a chip with these device non-idealities (``none`` or a name of
    :data:`core.chip.config.NOISE_LEVELS`): its programming variation and stuck cells, drawn as
    that chip draws them, are in every forward pass, so the task learns around them."""
    chip_periphery: bool = False
    """Read the chip in every forward pass (:mod:`core.learning.chip_loop`): each crossbar
    layer's value is what the served chip's periphery (its ADCs, and the read noise and
    ADC offsets of ``chip_noise``) makes of it, its gradient the float layer's
    (straight-through). Costs the emulation of every lossy layer in each step."""
    compile: bool = False
    """Compile the training pass with ``torch.compile`` (not with the chip in the loop,
    whose reads it cannot trace): each layer's quantization and BatchNorm, forward and
    backward, become one generated loop. Off by default: at 64 px a compiled step took
    0.22-0.31 s against 0.25-0.39 s eager, after 15-60 s of compiling, so the default
    468-step run gains little or nothing. Fused loops round some floats differently
    from torch's kernels, so a compiled run is not bit-equal to an eager one; it is
    deterministic and resumes exactly."""
    chip_agreement: float = 0.0
    """With ``chip_periphery``: weight of a term that teaches the task's ideal (float) view
    to answer as the chip does (the KL divergence from the chip's class probabilities to
    the ideal view's, one more float pass per step), so that ideal fidelity stays a
    faithful, cheaper stand-in for the chip. 0: the chip's loss alone."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                              f"{self.batch_size}")
        for name in ("lr_head", "lr_batchnorm"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.chip_agreement >= 0:
            raise ConfigError(f"chip_agreement must be >= 0, got {self.chip_agreement}")
        if self.warm_start_images < 0 or self.checkpoint_every < 0:
            raise ConfigError("warm_start_images and checkpoint_every must be >= 0")
        try:
            noise_level(self.chip_noise)
        except ConfigError as e:
            raise ConfigError(f"chip_noise: {e}") from None


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback learns after each step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    accuracy: float
    """Running training accuracy of the current epoch."""
    seconds: float
    epoch_metrics: dict[str, float] | None = None
    """Set on the last step of an epoch: what the model reports about itself then (the
    share of columns at each mask level), also recorded in the run's history."""


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to learn): none of it changes the result.

    Args:
        cancel: set it to stop between steps (a checkpoint is written first if possible).
        checkpoint_dir: folder for resumable checkpoints; an existing one is resumed.
        progress: show a progress bar (on a terminal) or log every ``log_every`` steps.
        on_step: called after every step (jobs report events with it).
    """

    cancel: threading.Event | None = None
    checkpoint_dir: Path | None = None
    progress: bool = False
    log_every: int = 50
    on_step: Callable[[StepInfo], None] | None = None


@dataclass(frozen=True)
class AdaptationResult:
    """A finished adaptation: the servable task (None for fp32 fine-tuning) and its record."""

    method: str
    task: TaskState | None
    val_accuracy: float
    steps: int
    seconds: float
    """Wall time of the whole adaptation (warm start, ranking, training, validation)."""
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    trained_model: nn.Module | None = None
    """The model as trained (logits out): the task model of a 4-bit method, the fp32
    classifier of ``finetune_fp32`` (whose result cannot be a 4-bit task state)."""


@contextmanager
def deterministic() -> Iterator[None]:
    """torch's deterministic algorithms for the duration (restoring the caller's settings).

    Without filling new tensors' memory: with deterministic algorithms on, torch by
    default writes NaN into every ``torch.empty`` first, so that a read of memory nothing
    wrote shows. Every kernel here writes what it allocates (the determinism and resume
    tests would likely show one that did not), and the fills cost 10-20% of an eager training
    step (one per allocation, the convolutions' outputs and gradients among them)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


def seeded_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A generator for one purpose (``stream``) and one step or epoch of a seeded run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_033 + index)


EVAL_REFERENCE_SIZE = 64


def eval_batch_size(batch_size: int, split: ImageSplit) -> int:
    """Fewer images per evaluation pass above 64 px, so its activations stay about the size
    of a 64-px pass (256 images at 224 px would need gigabytes)."""
    side = getattr(split, "image_size", EVAL_REFERENCE_SIZE)
    if side <= EVAL_REFERENCE_SIZE:
        return batch_size
    return max(8, batch_size * EVAL_REFERENCE_SIZE**2 // side**2)


@torch.no_grad()
def accuracy(predict: Callable[[Tensor], Tensor], split: ImageSplit, batch_size: int = 256,
             channels_last: bool = False) -> float:
    """Top-1 accuracy of ``predict`` (logits) on a split."""
    if len(split) == 0:
        return float("nan")
    batch_size = eval_batch_size(batch_size, split)
    correct = 0
    for start in range(0, len(split), batch_size):
        x, y = split.batch(slice(start, start + batch_size))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += int((predict(x).argmax(1) == y).sum())
    return correct / len(split)


@torch.no_grad()
def warm_start_head(features: Callable[[Tensor], Tensor], head: nn.Linear, split: ImageSplit,
                    config: TrainConfig) -> None:
    """Fit the new head on frozen features of a seeded subset (a linear probe), so the
    first steps (and the PE ranking) see a meaningful loss instead of a random head."""
    n = min(config.warm_start_images, len(split))
    if n == 0:
        return
    order = torch.randperm(len(split), generator=seeded_generator(config.seed, 2, 0))[:n]
    feats, labels = [], []
    chunk = eval_batch_size(256, split)
    for start in range(0, n, chunk):
        x, y = split.batch(order[start : start + chunk])
        feats.append(features(x))
        labels.append(y)
    train = (torch.cat(feats), torch.cat(labels))
    with torch.enable_grad():
        _, weight, bias = linear_probe(train, train, num_classes=head.out_features,
                                       seed=config.seed)
    head.weight.copy_(weight)
    head.bias.copy_(bias)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def to_channels_last(module: ModuleT) -> ModuleT:
    """``module.to(memory_format=torch.channels_last)`` (in place; returns ``module``).

    ``Module.to`` takes the keyword at run time, but torch's stubs declare only its
    device, dtype and tensor forms: the call goes through a ``Callable[..., ModuleT]``."""
    to: Callable[..., ModuleT] = module.to
    return to(memory_format=torch.channels_last)


# -- checkpoints ---------------------------------------------------------------------------


def _save_checkpoint(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                     meta: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().clone()
               for k, v in module.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).contiguous().clone()
    atomic_write(folder / CHECKPOINT_TENSORS,
                  lambda tmp: save_file(tensors, tmp, metadata={"format_version":
                                                                 CHECKPOINT_FORMAT}))
    atomic_write(folder / CHECKPOINT_JSON,
                  lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, sort_keys=True)))


def _load_checkpoint(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                     meta: dict[str, Any]) -> dict[str, Any] | None:
    json_path = folder / CHECKPOINT_JSON
    if not json_path.is_file():
        return None
    saved: dict[str, Any] = json.loads(json_path.read_text())
    if saved.get("format_version") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{folder}: checkpoint format {saved.get('format_version')!r}, "
                          f"this xma2 reads {CHECKPOINT_FORMAT!r}")
    for key in ("method", "config", "dataset"):
        if saved.get(key) != meta.get(key):
            raise ConfigError(f"{folder} holds a checkpoint of another run ({key} differs); "
                              "use a new --checkpoint-dir or delete the old one")
    tensors = load_file(str(folder / CHECKPOINT_TENSORS))
    module.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                            if k.startswith("model.")})
    state = optimizer.state_dict()
    restored: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            restored.setdefault(int(index), {})[name] = value
    state["state"] = restored
    optimizer.load_state_dict(state)
    return saved


# -- the loop ------------------------------------------------------------------------------


# What fit reads of a module that has it (checked with hasattr first).
class _Reseeded(Protocol):
    generator: torch.Generator | None


class _Regularized(Protocol):
    def regularization(self) -> Tensor | None: ...


class _EpochMetrics(Protocol):
    def epoch_metrics(self) -> dict[str, float]: ...


class _Progress:
    """A rich progress bar on a terminal, periodic log lines elsewhere."""

    def __init__(self, options: RunOptions, total: int, description: str) -> None:
        self.options = options
        self.bar = None
        if options.progress and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"),
                                TextColumn("loss {task.fields[loss]:.3f} "
                                           "acc {task.fields[acc]:.1%}"),
                                TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task(description, total=total, loss=float("nan"), acc=0.0)
            self.bar.start()
        self.description = description

    def update(self, info: StepInfo) -> None:
        if info.epoch_metrics and self.options.progress:
            logger.info("%s: epoch %d %s", self.description, info.epoch,
                        " ".join(f"{k} {v:.4g}" for k, v in info.epoch_metrics.items()))
        if self.bar is not None:
            self.bar.update(self.task, completed=info.step + 1, loss=info.loss,
                            acc=info.accuracy)
        elif self.options.progress and (info.step + 1) % self.options.log_every == 0:
            logger.info("%s: step %d/%d epoch %d loss %.3f acc %.1f%% (%.0f s)",
                        self.description, info.step + 1, info.total_steps, info.epoch,
                        info.loss, 100 * info.accuracy, info.seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def fit(
    module: nn.Module,
    param_groups: list[dict[str, Any]],
    train_split: ImageSplit,
    config: TrainConfig,
    options: RunOptions,
    *,
    description: str,
    checkpoint_meta: dict[str, Any],
    after_step: Callable[[], None] | None = None,
    before_step: Callable[[float], None] | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """Train ``module`` (logits out) with Adam on cross-entropy; returns (steps, history).

    ``module.generator`` (if present) is reseeded every step for the Gumbel noise;
    ``before_step`` gets the share of training done (annealing); a group with
    ``"schedule": "constant"`` keeps its learning rate (the others decay by cosine), one
    with ``"warmup": w`` rises linearly over the first ``w`` of training;
    ``module.regularization()`` (if present and not None) is added to the loss and
    ``module.epoch_metrics()`` (if present) is recorded at the end of every epoch.
    """
    n = len(train_split)
    steps_per_epoch = max(1, n // config.batch_size)
    total = config.epochs * steps_per_epoch
    groups = [g for g in param_groups if g["params"] and g["lr"] > 0]
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = adam(groups)
    meta = {"format_version": CHECKPOINT_FORMAT, **checkpoint_meta}
    history: list[dict[str, float]] = []
    start = 0
    folder = options.checkpoint_dir
    if folder is not None:
        saved = _load_checkpoint(folder, module, optimizer, meta)
        if saved is not None:
            start, history = int(saved["step"]), list(saved["history"])
            logger.info("%s: resuming at step %d from %s", description, start, folder)

    def save(step: int) -> None:
        if folder is not None:
            _save_checkpoint(folder, module, optimizer,
                             {**meta, "step": step, "total_steps": total, "history": history})

    progress = _Progress(options, total, description)
    started = time.perf_counter()
    order: Tensor | None = None
    epoch_loss = epoch_correct = epoch_seen = 0.0
    module.train()
    try:
        for step in range(start, total):
            if options.cancel is not None and options.cancel.is_set():
                save(step)
                raise TrainingCancelled(step, folder)
            epoch, index = divmod(step, steps_per_epoch)
            if order is None or index == 0:  # a new epoch, or the first step of a resume
                order = torch.randperm(n, generator=seeded_generator(config.seed, 0, epoch))
                epoch_loss = epoch_correct = epoch_seen = 0.0
            idx = order[index * config.batch_size : (index + 1) * config.batch_size]
            x, y = train_split.batch(idx)
            if hasattr(module, "generator"):
                cast(_Reseeded, module).generator = seeded_generator(config.seed, 1, step)
            factor = (0.5 * (1 + math.cos(math.pi * step / total))
                      if config.cosine_schedule else 1.0)
            for g in optimizer.param_groups:
                constant = g.get("schedule") == "constant"
                warmup = g.get("warmup", 0.0) * total
                rise = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
                g["lr"] = g["initial_lr"] * (1.0 if constant else factor) * rise
            if before_step is not None:
                before_step(step / total)
            logits = module(x)
            loss = F.cross_entropy(logits, y)
            penalty = (cast(_Regularized, module).regularization()
                       if hasattr(module, "regularization") else None)
            if penalty is not None:
                loss = loss + penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            value = float(loss.detach())
            epoch_loss += value * len(y)
            epoch_correct += float((logits.detach().argmax(1) == y).sum())
            epoch_seen += len(y)
            metrics = None
            if index == steps_per_epoch - 1:
                metrics = (cast(_EpochMetrics, module).epoch_metrics()
                           if hasattr(module, "epoch_metrics") else {})
                history.append({"epoch": epoch, "loss": epoch_loss / epoch_seen,
                                "train_accuracy": epoch_correct / epoch_seen, **metrics})
            info = StepInfo(step, total, epoch, value, epoch_correct / epoch_seen,
                            time.perf_counter() - started, metrics or None)
            progress.update(info)
            if options.on_step is not None:
                options.on_step(info)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                save(step + 1)
        save(total)
    finally:
        progress.close()
        module.eval()
    return total, history


def config_dict(config: Any) -> dict[str, Any]:
    """A method config as plain JSON data."""
    data: dict[str, Any] = json.loads(json.dumps(asdict(config)))
    return data
