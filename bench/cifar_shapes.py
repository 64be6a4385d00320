"""CIFAR architectures written the way community training repositories commonly write them.

The recipe will be judged on networks users trained themselves, and such networks are often
defined with idioms that the torchvision zoo does not use: ``out.view(out.size(0), -1)``,
``F.avg_pool2d(out, 4)``, an empty ``nn.Sequential()`` as the identity shortcut, ``out +=
shortcut`` in place, a residual addition chosen by a Python attribute (``if self.stride == 1``),
pre-activation blocks whose projection shortcut reads the ReLU'd input, squeeze-excitation through
``F.avg_pool2d(out, out.size(2))``, and DenseNet concatenations. These are our own definitions of
those shapes at 32x32 input (3x3 stems with stride 1), with a ``width`` multiplier so that tests
can run them small. ``bench/zoo_models.py`` registers them for ``bench/zoo_run.py``;
``tests/compressor/test_architectures.py`` runs the pipeline on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))  # (expansion, output channels, blocks, first stride)


def _w(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class VGG(nn.Module):
    """VGG-16 with BatchNorm, five max pools to 1x1, one linear layer."""

    def __init__(self, width: float = 1.0, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(channels, _w(v, width), 3, padding=1), nn.BatchNorm2d(_w(v, width)),
                       nn.ReLU(inplace=True)]
            channels = _w(v, width)
        layers.append(nn.AvgPool2d(1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x):
        out = self.features(x)
        out = out.view(out.size(0), -1)
        return self.classifier(out)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, an empty Sequential or a 1x1 conv-BN as shortcut, added in place."""

    def __init__(self, cin: int, cout: int, stride: int = 1, squeeze: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.squeeze = squeeze
        if squeeze:
            self.fc1 = nn.Conv2d(cout, max(1, cout // 16), 1)
            self.fc2 = nn.Conv2d(max(1, cout // 16), cout, 1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.squeeze:
            gate = F.avg_pool2d(out, out.size(2))
            out = out * torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        out += self.shortcut(x)
        return F.relu(out)


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the projection shortcut (when there is one) reads the ReLU'd input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stem, four stages of two blocks, 4x4 average pool."""

    def __init__(self, kind: str = "basic", width: float = 1.0, classes: int = 10) -> None:
        super().__init__()
        self.preact = kind == "preact"
        widths = [_w(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels, stages = widths[0], []
        for i, cout in enumerate(widths):
            blocks = []
            for j in range(2):
                stride = 2 if i > 0 and j == 0 else 1
                if kind == "preact":
                    blocks.append(PreActBlock(channels, cout, stride))
                else:
                    blocks.append(BasicBlock(channels, cout, stride, squeeze=kind == "squeeze"))
                channels = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if self.preact:
            self.bn_final = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, classes)

    def forward(self, x):
        out = self.conv1(x) if self.preact else F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn_final(out))
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        return self.linear(out)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 project; added to the input (or its 1x1 projection) at stride 1."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = expansion * cin
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x) if self.stride == 1 else out
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 images: stride-1 stem and second stage, 1x1 conv to 1280, 4x4 average pool."""

    def __init__(self, width: float = 1.0, classes: int = 10) -> None:
        super().__init__()
        channels = _w(32, width)
        self.conv1 = nn.Conv2d(3, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        blocks = []
        for expansion, cout, count, stride in MOBILENET_V2:
            for s in [stride] + [1] * (count - 1):
                blocks.append(InvertedResidual(channels, _w(cout, width), expansion, s))
                channels = _w(cout, width)
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(channels, _w(1280, width), 1, bias=False)
        self.bn2 = nn.BatchNorm2d(_w(1280, width))
        self.linear = nn.Linear(_w(1280, width), classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        return self.linear(out)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to 4 x growth, BN-ReLU-3x3 conv to growth, concatenated before the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class DenseNet(nn.Module):
    """Three dense stages of four layers with halving transitions (a small DenseNet-BC)."""

    def __init__(self, width: float = 1.0, classes: int = 10, growth: int = 12) -> None:
        super().__init__()
        growth = _w(growth, width)
        channels = 2 * growth
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i in range(3):
            layers = []
            for _ in range(4):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            stages.append(nn.Sequential(*layers))
            if i < 2:
                stages.append(nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                                            nn.Conv2d(channels, channels // 2, 1, bias=False), nn.AvgPool2d(2)))
                channels //= 2
        self.body = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, classes)

    def forward(self, x):
        out = self.body(self.conv1(x))
        out = F.avg_pool2d(F.relu(self.bn(out)), 8)
        out = out.view(out.size(0), -1)
        return self.linear(out)


SHAPES = {
    "cifar_vgg16": lambda width: VGG(width),
    "cifar_resnet18": lambda width: ResNet("basic", width),
    "cifar_preact_resnet18": lambda width: ResNet("preact", width),
    "cifar_senet18": lambda width: ResNet("squeeze", width),
    "cifar_mobilenet_v2": lambda width: MobileNetV2(width),
    "cifar_densenet": lambda width: DenseNet(width),
}


def build(name: str, width: float = 1.0) -> nn.Module:
    """The architecture ``name`` of SHAPES at ``width`` times its channel counts, randomly initialised."""
    return SHAPES[name](width)
