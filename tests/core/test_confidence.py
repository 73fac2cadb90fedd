"""Temperature scaling, ECE, OOD thresholds and the logit-distance score (core.confidence)."""

from __future__ import annotations

import math

import pytest
import torch

from core.confidence import (
    UNCALIBRATED,
    Confidence,
    OodScore,
    auroc,
    expected_calibration_error,
    fit_confidence,
    fit_ood_threshold,
    fit_temperature,
    logit_distance_scores,
    logit_statistics,
    nll,
    ood_scores,
)
from core.errors import ConfigError


def calibrated_logits(n: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Logits whose softmax is the true label distribution (labels drawn from it)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2.0
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


def test_over_confident_logits_get_a_temperature_above_one_that_lowers_ece() -> None:
    logits, labels = calibrated_logits(20000)
    confident = 3.0 * logits  # the same ranking, 3x too sure
    t = fit_temperature(confident, labels)
    assert 2.7 < t < 3.3
    before = expected_calibration_error(confident.softmax(1), labels)
    after = expected_calibration_error((confident / t).softmax(1), labels)
    assert before > 0.1 and after < 0.02 and after < before / 5
    assert nll(confident, labels, t) < nll(confident, labels)


def test_calibrated_logits_keep_a_temperature_of_one() -> None:
    logits, labels = calibrated_logits(20000, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)


def test_under_confident_logits_get_a_temperature_below_one() -> None:
    logits, labels = calibrated_logits(20000, seed=2)
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, abs=0.05)


def test_temperature_never_changes_the_predicted_class() -> None:
    logits, labels = calibrated_logits(500, seed=3)
    confidence = fit_confidence(logits * 4, labels, score=OodScore.MAX_PROBABILITY)
    assert confidence.temperature > 1
    probs = confidence.probabilities(logits * 4)
    assert torch.equal(probs.argmax(1), logits.argmax(1))
    assert torch.allclose(probs.sum(1), torch.ones(500))


def test_ece_uses_fifteen_equal_width_bins() -> None:
    # confidences 0.9 (bin (13/15, 14/15]) all right, 0.5 (bin (7/15, 8/15]) half right
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.5, 0.5]] * 4)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1])
    # bin of 0.9: accuracy 1, gap 0.1; bin of 0.5: argmax is class 0, accuracy 0.5, gap 0
    assert expected_calibration_error(probs, labels) == pytest.approx(0.05)
    # 0.92 lies in (13/15, 14/15], 0.99 in (14/15, 1]: separate bins, unless one bin
    two = torch.tensor([[0.92, 0.08], [0.99, 0.01]])
    assert expected_calibration_error(two, torch.tensor([0, 1])) == pytest.approx(
        (abs(0.92 - 1) + abs(0.99 - 0)) / 2)
    assert expected_calibration_error(two, torch.tensor([0, 1]), bins=1) == pytest.approx(
        abs((0.92 + 0.99) / 2 - 0.5))
    # 0.94 and 0.99 share the top bin
    top = torch.tensor([[0.94, 0.06], [0.99, 0.01]])
    assert expected_calibration_error(top, torch.tensor([0, 1])) == pytest.approx(
        abs((0.94 + 0.99) / 2 - 0.5))


def test_threshold_keeps_the_requested_share_in_distribution() -> None:
    scores = torch.arange(100, dtype=torch.float64)
    threshold = fit_ood_threshold(scores, 0.95)
    assert threshold == 5.0
    assert float((scores >= threshold).double().mean()) == 0.95
    shuffled = scores[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    assert fit_ood_threshold(shuffled, 0.95) == 5.0
    assert fit_ood_threshold(torch.tensor([3.0]), 0.95) == 3.0
    with pytest.raises(ConfigError):
        fit_ood_threshold(torch.tensor([]))


def test_auroc() -> None:
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5


def test_softmax_scores_miss_an_image_with_huge_logits_that_the_distance_flags() -> None:
    g = torch.Generator().manual_seed(0)
    classes = 4
    centres = torch.eye(classes) * 8.0  # class c: logit c high, the others near 0

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(classes, (n,), generator=g)
        return centres[labels] + torch.randn(n, classes, generator=g), labels

    train, train_y = draw(2000)
    val, val_y = draw(400)
    odd = torch.tensor([[30.0, 12.0, 0.0, 0.0]])  # larger than any class's logits
    confidence = fit_confidence(val, val_y, train_logits=train, train_labels=train_y)
    assert confidence.ood_score is OodScore.LOGIT_DISTANCE
    assert bool(confidence.flags(confidence.scores(odd))[0])
    test, _ = draw(2000)
    rate = float(confidence.flags(confidence.scores(test)).double().mean())
    assert 0.02 < rate < 0.09  # ~5% of in-distribution images by construction
    for kind in (OodScore.MAX_PROBABILITY, OodScore.ENERGY):
        softmax = fit_confidence(val, val_y, score=kind)
        assert not bool(softmax.flags(softmax.scores(odd))[0])
    # one row and a batch score alike
    assert float(confidence.scores(odd[0])) == float(confidence.scores(odd)[0])


def test_logit_statistics() -> None:
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    means, variance = logit_statistics(logits, labels)
    assert torch.allclose(means, torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    # residuals (-1, 0), (1, 0), (0, -1), (0, 1) over 4 - 2 degrees of freedom
    assert torch.allclose(variance, torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-5)
    at_mean = logit_distance_scores(torch.tensor([2.0, 0.0]), means, variance)
    assert float(at_mean) == pytest.approx(0.0, abs=1e-9)
    far = logit_distance_scores(torch.tensor([9.0, 9.0]), means, variance)
    assert float(far) < -10


def test_confidence_round_trips_through_json_data() -> None:
    logits, labels = calibrated_logits(300, classes=3, seed=4)
    fitted = fit_confidence(logits, labels, train_logits=logits, train_labels=labels)
    again = Confidence.from_dict(fitted.to_dict())
    assert again == fitted and again.classes == 3
    assert Confidence.from_dict({}) == UNCALIBRATED
    assert not bool(UNCALIBRATED.flags(UNCALIBRATED.scores(logits)).any())


@pytest.mark.parametrize("data", [
    {"temperature": 0}, {"temperature": -1.0}, {"temperature": "2"},
    {"temperature": True}, {"ood_threshold": "x"}, {"ood_score": "psychic"},
    {"ood_score": "logit_distance"},  # no statistics
    {"class_means": [[0.0, 1.0], [1.0, 0.0]]},  # no variance
    {"class_means": [[0.0, 1.0]], "logit_variance": [1.0, 1.0]},
    {"class_means": [[0.0, 1.0], [1.0, 0.0]], "logit_variance": [1.0, 0.0]},
    {"class_means": [[0.0, "a"], [1.0, 0.0]], "logit_variance": [1.0, 1.0]},
    {"fitted_on": -1},
])
def test_bad_confidence_data_is_refused(data: dict) -> None:
    with pytest.raises(ConfigError):
        Confidence.from_dict(data)


def test_bad_logits_are_refused() -> None:
    with pytest.raises(ConfigError):
        fit_temperature(torch.tensor([[math.nan, 0.0]]), torch.tensor([0]))
    with pytest.raises(ConfigError):
        fit_temperature(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError):
        ood_scores(torch.zeros(3, 2), kind=OodScore.LOGIT_DISTANCE)
