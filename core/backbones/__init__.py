"""ImageNet backbones (MobileNetV2, ResNet-18/50) with offline, strictly loaded weights."""

from __future__ import annotations

from core.backbones.mobilenet_v2 import ConvBNReLU, InvertedResidual, MobileNetV2, mobilenet_v2
from core.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess_image
from core.backbones.registry import BACKBONES, Backbone, build_backbone, imagenet_labels
from core.backbones.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from core.backbones.weights import load_state_dict_file, mobilenet_v2_weights_path

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BasicBlock",
    "Bottleneck",
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "build_backbone",
    "imagenet_labels",
    "load_state_dict_file",
    "mobilenet_v2",
    "mobilenet_v2_weights_path",
    "preprocess_image",
    "resnet18",
    "resnet50",
]
