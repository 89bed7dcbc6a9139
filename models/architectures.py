"""The forge's network architectures: bare torch modules, float32 NCHW in (32x32; ``resnet_large``: 128x128),
logits out.

Four families (and a large-input variant), so that the gate is measured on models unlike the one its defaults
were tuned on:

* ``small_cnn_v1`` (width w): three Conv-ReLU-MaxPool stages (16w, 32w, 64w) and a two-layer head; the
  demo models' architecture.
* ``deep_cnn`` (width w): VGG-style, two 3x3 convolutions per stage (16w, 32w, 64w), BatchNorm, global
  average pooling.
* ``resnet_bn`` (width w): a small ResNet: a stride-2 stem, three stages of one BasicBlock each (16w, 32w,
  64w; strides 1, 2, 2), BatchNorm, global average pooling.
* ``mobilenet_dw`` (width w): MobileNet-v1 style: a stride-2 stem and depthwise-separable blocks with
  BatchNorm.
* ``resnet_large`` (width w): ``resnet_bn`` behind a stem that divides the resolution by 8, for the forge's
  128x128 models (:mod:`models.large`).

Sizes were chosen so that one GTSRB epoch costs tens of seconds on one CPU thread, not minutes.

:func:`build_net` makes one from its name and width; He init for convolutions and linear layers.
"""

from __future__ import annotations

import torch.nn as nn

ARCHS = ("small_cnn_v1", "deep_cnn", "resnet_bn", "mobilenet_dw", "resnet_large")


def _he_init(module: nn.Module) -> None:
    for mod in module.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class _FeaturesThenHead(nn.Module):
    """``features`` then ``classifier``: the forward pass the families below share."""

    def forward(self, x):
        return self.classifier(self.features(x))


class SmallCNN(_FeaturesThenHead):
    """Conv(3->16w)-ReLU-MaxPool2 -> Conv(16w->32w)-ReLU-MaxPool2 -> Conv(32w->64w)-ReLU-MaxPool2
    -> Flatten -> Linear(64w*16 -> 128w)-ReLU -> Linear(128w -> K). Input NCHW 32x32, output logits."""

    def __init__(self, num_classes: int, width: int = 1):
        super().__init__()
        c1, c2, c3, h = 16 * width, 32 * width, 64 * width, 128 * width
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 4 * 4, h), nn.ReLU(), nn.Linear(h, num_classes),
        )
        _he_init(self)  # faster, steadier training than torch's default


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class DeepCNN(_FeaturesThenHead):
    def __init__(self, num_classes: int, width: int = 1):
        super().__init__()
        c = [16 * width, 32 * width, 64 * width]
        layers, cin = [], 3
        for cout in c:
            layers += [_conv_bn(cin, cout), _conv_bn(cout, cout), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        _he_init(self)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.skip(x))


class ResNetBN(nn.Module):
    def __init__(self, num_classes: int, width: int = 1):
        super().__init__()
        c = [16 * width, 32 * width, 64 * width]
        self.stem = _conv_bn(3, c[0], stride=2)
        self.stages = nn.Sequential(BasicBlock(c[0], c[0], 1), BasicBlock(c[0], c[1], 2), BasicBlock(c[1], c[2], 2))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c[2], num_classes))
        _he_init(self)

    def forward(self, x):
        return self.classifier(self.stages(self.stem(x)))


class ResNetLarge(ResNetBN):
    """``resnet_bn`` for inputs of 128x128 and more: a stem that divides the resolution by 8 (a stride-2
    convolution, a 2x2 max-pool, a stride-2 convolution), then ``resnet_bn``'s three stages, so a 128x128 image
    costs about what a 32x32 one costs ``resnet_bn``, plus the stem."""

    def __init__(self, num_classes: int, width: int = 1):
        super().__init__(num_classes, width)
        c0 = 16 * width
        self.stem = nn.Sequential(_conv_bn(3, c0, stride=2), nn.MaxPool2d(2), _conv_bn(c0, c0, stride=2))
        _he_init(self)


class MobileNetDW(_FeaturesThenHead):
    # (output channels, stride) of each depthwise-separable block, before the width multiplier
    BLOCKS = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1))

    def __init__(self, num_classes: int, width: int = 1):
        super().__init__()
        cin = 16 * width
        layers = [_conv_bn(3, cin, stride=2)]
        for cout, stride in self.BLOCKS:
            cout *= width
            layers += [_conv_bn(cin, cin, stride, groups=cin), _conv_bn(cin, cout, kernel=1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        _he_init(self)


_CLASSES = {"small_cnn_v1": SmallCNN, "deep_cnn": DeepCNN, "resnet_bn": ResNetBN, "mobilenet_dw": MobileNetDW,
            "resnet_large": ResNetLarge}


def build_net(arch: str, num_classes: int, width: int = 1) -> nn.Module:
    if arch not in _CLASSES:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    return _CLASSES[arch](num_classes, width)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
