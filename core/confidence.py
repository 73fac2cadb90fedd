"""Honest probabilities: temperature scaling, calibration error and an out-of-distribution flag.

A task's head is trained to be right, not to know when it is unsure, so its softmax is
over-confident and says 1.0 to images unlike anything it was trained on. Two numbers
per task, fitted on its validation split, fix what can be fixed without retraining:

- a temperature ``T`` (Guo et al., 2017): probabilities are ``softmax(logits / T)``,
  with ``T`` minimising the negative log-likelihood of the validation labels. Dividing
  by a positive number never changes the arg-max, so the predicted class stays.
- an OOD threshold on a score of the logits: an image scoring below it is flagged as
  unlike the task's own images. The threshold is the score that
  :data:`IN_DISTRIBUTION_FRACTION` of the validation images reach.

The default score is :attr:`OodScore.LOGIT_DISTANCE`, a class-conditional Mahalanobis
distance (diagonal, Lee et al., 2018) in logit space, with class means and variances from
training images. The softmax scores (:attr:`OodScore.MAX_PROBABILITY`,
:attr:`OodScore.ENERGY`) grow with the logits, and a natural photo sent to a task
trained on small grey silhouettes can get larger logits than any of the task's own
images: its softmax says 1.0. Its logits are still far from every class's typical
logits, which the distance sees (docs/results/calibration.md measures all three).

Everything here is a pure function of logits and labels (float64 inside, so a fit does
not depend on the batch order of the forward passes that produced the logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeGuard

import torch
from torch import Tensor

from core.errors import ConfigError

ECE_BINS = 15
"""Equal-width confidence bins of the expected calibration error (as in Guo et al.)."""
IN_DISTRIBUTION_FRACTION = 0.95
"""Share of a task's own validation images the OOD threshold keeps in distribution."""
TEMPERATURE_RANGE = (0.05, 20.0)
"""Temperatures a fit may choose; the NLL is convex in 1/T, so its minimum in here is found."""


class OodScore(StrEnum):
    """How an answer's OOD score is computed from its logits (higher: more in-distribution)."""

    MAX_PROBABILITY = "max_probability"
    """Largest class probability after temperature scaling."""
    ENERGY = "energy"
    """Negative free energy ``T * logsumexp(logits / T)`` (Liu et al., 2020)."""
    LOGIT_DISTANCE = "logit_distance"
    """Minus the smallest mean squared z-score of the logits to a class's training logits
    (class means, one pooled within-class variance per logit)."""


DEFAULT_OOD_SCORE = OodScore.LOGIT_DISTANCE
VARIANCE_FLOOR = 1e-6
"""Added to every within-class logit variance (a constant logit would divide by 0)."""


@dataclass(frozen=True)
class Confidence:
    """A task's calibration: its temperature and OOD threshold.

    Args:
        temperature: divides the logits before the softmax (1: the head as trained).
        ood_threshold: answers whose score is below it are flagged out of distribution;
            None (a task calibrated before thresholds existed): nothing is flagged.
        ood_score: which score the threshold applies to.
        fitted_on: how many validation images the fit saw (0: not fitted).
        class_means: ``[classes][classes]`` mean training logits of each class
            (:attr:`OodScore.LOGIT_DISTANCE` only).
        logit_variance: ``[classes]`` pooled within-class variance of each logit.
    """

    temperature: float = 1.0
    ood_threshold: float | None = None
    ood_score: OodScore = OodScore.MAX_PROBABILITY
    fitted_on: int = 0
    class_means: tuple[tuple[float, ...], ...] | None = None
    logit_variance: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.ood_threshold is not None and not math.isfinite(self.ood_threshold):
            raise ConfigError(f"ood_threshold must be finite, got {self.ood_threshold}")
        if self.fitted_on < 0:
            raise ConfigError(f"fitted_on must be >= 0, got {self.fitted_on}")
        object.__setattr__(self, "ood_score", OodScore(self.ood_score))
        if (self.class_means is None) != (self.logit_variance is None):
            raise ConfigError("class_means and logit_variance come together")
        if self.logit_variance is not None and self.class_means is not None:
            k = len(self.logit_variance)
            if k < 2 or len(self.class_means) != k or any(len(row) != k
                                                          for row in self.class_means):
                raise ConfigError(f"class_means must be [{k}][{k}] for {k} logit variances")
            values = [*self.logit_variance, *(v for row in self.class_means for v in row)]
            if not all(math.isfinite(v) for v in values) or min(self.logit_variance) <= 0:
                raise ConfigError("class_means must be finite and logit_variance > 0")
        elif self.ood_score is OodScore.LOGIT_DISTANCE:
            raise ConfigError("the logit_distance score needs class_means and logit_variance")

    @property
    def classes(self) -> int | None:
        """Classes the statistics describe (None: none stored)."""
        return None if self.logit_variance is None else len(self.logit_variance)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"temperature": self.temperature,
                                "ood_threshold": self.ood_threshold,
                                "ood_score": self.ood_score.value, "fitted_on": self.fitted_on}
        if self.class_means is not None and self.logit_variance is not None:
            data["class_means"] = [list(row) for row in self.class_means]
            data["logit_variance"] = list(self.logit_variance)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Confidence:
        """Parse stored JSON; raises ``ConfigError`` (a ``ValueError``) on bad values."""
        temperature = data.get("temperature", 1.0)
        threshold = data.get("ood_threshold")
        score = data.get("ood_score", OodScore.MAX_PROBABILITY.value)
        fitted_on = data.get("fitted_on", 0)
        means, variance = data.get("class_means"), data.get("logit_variance")
        if (not isinstance(temperature, int | float) or isinstance(temperature, bool)
                or (threshold is not None and (not isinstance(threshold, int | float)
                                               or isinstance(threshold, bool)))
                or not isinstance(fitted_on, int) or isinstance(fitted_on, bool)):
            raise ConfigError("temperature and ood_threshold must be numbers, "
                              "fitted_on an integer")
        if score not in {s.value for s in OodScore}:
            raise ConfigError(f"unknown ood_score {score!r}; known: "
                              f"{', '.join(s.value for s in OodScore)}")
        stats = None
        if means is not None or variance is not None:
            if not (_numbers(variance) and isinstance(means, list)
                    and all(_numbers(row) for row in means)):
                raise ConfigError("class_means must be a list of lists of "
                                  "numbers and logit_variance a list of numbers")
            stats = (tuple(tuple(float(v) for v in row) for row in means),
                     tuple(float(v) for v in variance))
        return cls(float(temperature), None if threshold is None else float(threshold),
                   OodScore(score), fitted_on, *(stats or (None, None)))

    def probabilities(self, logits: Tensor) -> Tensor:
        """Calibrated class probabilities of logits ``[..., classes]``."""
        return (logits.float() / self.temperature).softmax(-1)

    def scores(self, logits: Tensor) -> Tensor:
        """The OOD score of each row of logits ``[N, classes]`` or of one row (float64)."""
        if self.ood_score is OodScore.LOGIT_DISTANCE:
            assert self.class_means is not None and self.logit_variance is not None
            return logit_distance_scores(logits, torch.tensor(self.class_means),
                                         torch.tensor(self.logit_variance))
        return ood_scores(logits, self.temperature, self.ood_score)

    def flags(self, scores: Tensor) -> Tensor:
        """True where a score is below the threshold (all False without one)."""
        if self.ood_threshold is None:
            return torch.zeros(scores.shape, dtype=torch.bool)
        return scores < self.ood_threshold


UNCALIBRATED = Confidence()
"""What a task stored without calibration is served with: T = 1, nothing flagged."""


def _numbers(value: object) -> TypeGuard[list[float]]:
    return isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value)


def _checked(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ConfigError(f"logits must be [images >= 1, classes >= 2], got "
                          f"{list(logits.shape)}")
    if labels is not None and labels.shape != (logits.shape[0],):
        raise ConfigError(f"labels must be [{logits.shape[0]}], got {list(labels.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise ConfigError("logits hold NaN or infinite values")
    return logits.detach().double()


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / T)``."""
    z = _checked(logits, labels) / temperature
    return float(torch.nn.functional.cross_entropy(z, labels.long()))


def fit_temperature(logits: Tensor, labels: Tensor, *,
                    bounds: tuple[float, float] = TEMPERATURE_RANGE,
                    tolerance: float = 1e-6) -> float:
    """The temperature minimising the validation NLL (golden-section search on 1/T).

    The NLL is convex in ``b = 1/T`` (a log-sum-exp of a linear function of ``b`` minus
    a linear term), so the search finds the global minimum within ``bounds``.
    """
    z = _checked(logits, labels)
    y = labels.long()
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]

    def loss(b: float) -> float:
        return float(torch.nn.functional.cross_entropy(z * b, y))

    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = loss(c), loss(d)
    while hi - lo > tolerance * (1 + lo):
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = loss(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = loss(d)
    return 1.0 / ((lo + hi) / 2)


def expected_calibration_error(probabilities: Tensor, labels: Tensor,
                               bins: int = ECE_BINS) -> float:
    """ECE: the image-weighted mean gap between confidence and accuracy per bin.

    Confidence is the top class probability; bins are ``bins`` equal-width intervals
    of [0, 1], each ``(lo, hi]`` (the first also takes 0). Empty bins count for nothing.
    """
    p = _checked(probabilities, labels)
    confidence, predicted = p.max(1)
    correct = (predicted == labels.long()).double()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    total = 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count:
            gap = float(confidence[members].mean() - correct[members].mean())
            total += count * abs(gap)
    return total / len(p)


def ood_scores(logits: Tensor, temperature: float = 1.0,
               kind: OodScore | str = DEFAULT_OOD_SCORE) -> Tensor:
    """Per-row OOD score of logits ``[N, classes]`` (or one row ``[classes]``); higher
    means more like the task's own images."""
    if OodScore(kind) is OodScore.LOGIT_DISTANCE:
        raise ConfigError("the logit_distance score needs class statistics: use "
                          "logit_distance_scores or Confidence.scores")
    one = logits.dim() == 1
    z = _checked(logits[None] if one else logits) / temperature
    if OodScore(kind) is OodScore.ENERGY:
        out = temperature * torch.logsumexp(z, 1)
    else:
        out = z.softmax(1).max(1).values
    return out[0] if one else out


def fit_ood_threshold(scores: Tensor, in_fraction: float = IN_DISTRIBUTION_FRACTION) -> float:
    """The score that ``in_fraction`` of ``scores`` (a task's validation images) reach:
    the largest ``t`` with at least that share of scores ``>= t``."""
    if not 0 < in_fraction <= 1:
        raise ConfigError(f"in_fraction must be in (0, 1], got {in_fraction}")
    s = scores.detach().double().flatten()
    if s.numel() == 0 or not bool(torch.isfinite(s).all()):
        raise ConfigError("the OOD threshold needs at least one finite score")
    ordered = s.sort(descending=True).values
    keep = math.ceil(in_fraction * len(ordered) - 1e-9)
    return float(ordered[max(keep, 1) - 1])


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """Area under the ROC curve of separating in- from out-of-distribution by score
    (the chance that an in-distribution image outscores an OOD one; ties count half)."""
    a = in_scores.detach().double().flatten()
    b = out_scores.detach().double().flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise ConfigError("AUROC needs scores of both kinds")
    ordered = b.sort().values
    below = torch.searchsorted(ordered, a, right=False).double()
    at_most = torch.searchsorted(ordered, a, right=True).double()
    u = float((below + 0.5 * (at_most - below)).sum())
    return u / (len(a) * len(b))


def logit_statistics(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class mean logits ``[classes, classes]`` and the pooled within-class variance of
    each logit ``[classes]`` (plus :data:`VARIANCE_FLOOR`) of a task's training images.

    A class without images keeps the overall mean (it then matches nothing in particular).
    """
    z = _checked(logits, labels)
    y = labels.long()
    k = z.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ConfigError(f"labels must be in [0, {k})")
    means = z.mean(0, keepdim=True).repeat(k, 1)
    for c in range(k):
        members = y == c
        if bool(members.any()):
            means[c] = z[members].mean(0)
    residual = z - means[y]
    variance = residual.pow(2).sum(0) / max(1, len(z) - k) + VARIANCE_FLOOR
    return means, variance


def logit_distance_scores(logits: Tensor, class_means: Tensor, logit_variance: Tensor
                          ) -> Tensor:
    """Minus the smallest, over classes, mean squared z-score of each row of logits to
    that class's mean (higher: more like the training images); ``[N]`` or a scalar."""
    one = logits.dim() == 1
    z = _checked(logits[None] if one else logits)
    means, variance = class_means.double(), logit_variance.double()
    if means.shape != (z.shape[1], z.shape[1]) or variance.shape != (z.shape[1],):
        raise ConfigError(f"statistics of {means.shape[0]} classes for logits of "
                          f"{z.shape[1]}")
    distance = ((z[:, None, :] - means[None]).pow(2) / variance).mean(2).min(1).values
    return -distance[0] if one else -distance


def fit_confidence(logits: Tensor, labels: Tensor, *,
                   train_logits: Tensor | None = None, train_labels: Tensor | None = None,
                   score: OodScore | str = DEFAULT_OOD_SCORE,
                   in_fraction: float = IN_DISTRIBUTION_FRACTION) -> Confidence:
    """Temperature and OOD threshold of a task from its validation logits and labels.

    The logit-distance score also needs logits of training images (its class statistics
    come from them, so the threshold, set on validation images, is not fitted on the
    images that set the statistics).
    """
    temperature = fit_temperature(logits, labels)
    kind = OodScore(score)
    if kind is OodScore.LOGIT_DISTANCE:
        if train_logits is None or train_labels is None:
            raise ConfigError("the logit_distance score needs training logits and labels")
        means, variance = logit_statistics(train_logits, train_labels)
        scores = logit_distance_scores(logits, means, variance)
        class_means: tuple[tuple[float, ...], ...] | None = tuple(
            tuple(float(v) for v in row) for row in means.tolist())
        logit_variance: tuple[float, ...] | None = tuple(float(v) for v in variance.tolist())
    else:
        scores, class_means, logit_variance = ood_scores(logits, temperature, kind), None, None
    return Confidence(temperature, fit_ood_threshold(scores, in_fraction), kind,
                      int(logits.shape[0]), class_means, logit_variance)
