"""The built-in ImageNet task carries the fp32 model's BatchNorms as its own affine terms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.backbones import build_backbone
from core.backbones.shipped import imagenet_head_only, imagenet_task, load_backbone
from core.engine import CrossbarEngine
from core.errors import ConfigError
from core.learning.imagenet_task import fp32_top1, top1_agreement
from core.nn.calibration import agreement_crops
from core.nn.model import CrossbarModel, fp32_batchnorm_terms


@pytest.fixture(scope="module")
def backbone() -> CrossbarModel:
    return load_backbone(None)


@pytest.fixture(scope="module")
def fp32() -> nn.Module:
    return build_backbone("mobilenet_v2").eval()


def _norms(module: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}


def test_each_norm_with_the_task_terms_is_the_fp32_norm(backbone: CrossbarModel,
                                                        fp32: nn.Module) -> None:
    """The backbone's statistics with the task's affine terms give the fp32 norm's output."""
    terms = fp32_batchnorm_terms(backbone, fp32)
    own, reference = _norms(backbone.body), _norms(fp32)
    assert set(terms) == {f"{n}.{a}" for n in own for a in ("weight", "bias")}
    g = torch.Generator().manual_seed(0)
    for name, norm in own.items():
        teacher = reference[name]
        y = 3 * torch.randn(2, norm.num_features, 3, 3, generator=g)
        with torch.no_grad():
            ours = nn.functional.batch_norm(y, norm.running_mean, norm.running_var,
                                            terms[f"{name}.weight"], terms[f"{name}.bias"],
                                            False, 0.0, norm.eps)
            theirs = teacher(y)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)
    # The backbone's own terms differ from the fp32 ones (else this would prove nothing).
    name = next(iter(own))
    assert not torch.allclose(terms[f"{name}.weight"], own[name].weight.detach())


def test_a_model_without_the_norms_is_refused(backbone: CrossbarModel) -> None:
    with pytest.raises(ConfigError, match="no BatchNorm"):
        fp32_batchnorm_terms(backbone, nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_the_built_in_task_agrees_with_fp32_more_often_than_the_head_alone(
        backbone: CrossbarModel, fp32: nn.Module) -> None:
    """On 60 of the held-out crops (ideal fidelity; 43% against 31% on all 200)."""
    crops = agreement_crops(60, seed=0)
    reference = fp32_top1(fp32, crops)
    head_only = imagenet_head_only(backbone, fp32)
    built_in = imagenet_task(backbone, fp32)
    assert not head_only.digital and built_in.digital
    agreement = {}
    for label, task in (("head only", head_only), ("built in", built_in)):
        engine = CrossbarEngine(backbone)
        engine.add_task(task)
        agreement[label] = top1_agreement(lambda x, e=engine: e.forward(x, "imagenet"), crops,
                                          reference)
    assert agreement["built in"] >= agreement["head only"] + 0.05, agreement
