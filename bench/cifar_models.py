"""CIFAR model factories for the benchmarks.

The CIFAR ResNets of other depths in ../shared (its model file builds depth 56 by default), and
``vgg_cifar``: a plain VGG-style network (no shortcuts) trained here by ``bench/train_cifar.py``.
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn

_spec = importlib.util.spec_from_file_location(
    "shared_cifar_resnet", Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar_resnet.py"
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def resnet20():
    return _module.CifarResNet(20)


def resnet56():
    return _module.CifarResNet(56)


# VGG-11's layout at half width: conv widths, "M" = 2x2 max pooling (32x32 -> 2x2 before the classifier)
VGG_LAYOUT = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256)


def vgg_cifar(num_classes: int = 10) -> nn.Module:
    """Plain VGG-style CIFAR network: 8 conv-BN-ReLU layers, 4 max-pools, a two-layer classifier on the 2 x 2 map.

    The classifier flattens a 256 x 2 x 2 map, so each pruned channel removes four inputs of the
    first linear layer (the graph must map channels through the flatten).
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
        channels = item
    return nn.Sequential(
        *layers, nn.Flatten(),
        nn.Linear(channels * 4, 256), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(256, num_classes),
    )


def resnet56_features(weights: str):
    """ResNet-56 loaded from ``weights`` without its classifier: it outputs the 64 pooled features, as a
    backbone is deployed under a head of its own (``bench/features.py``)."""
    return trained_backbone("resnet56", weights)


class _Trunk(nn.Module):
    """A CIFAR ResNet up to its last stage's output (before the pooling and the classifier)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1 = net.conv1, net.bn1
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        return self.layer3(self.layer2(self.layer1(x)))


def resnet56_feature_maps(weights: str):
    """ResNet-56 loaded from ``weights`` cut before its pooling: it outputs 64 x 8 x 8 feature maps, as a
    backbone under a dense head (``bench/features.py --cut maps``)."""
    return _Trunk(_module.load(weights, 56))


def load_trained(arch: str, weights: str) -> nn.Module:
    """``resnet56`` with a checkpoint of ../shared, or ``vgg_cifar`` / ``cifar_mobilenet_v2_half`` with the
    state_dict ``bench/train_cifar.py`` saved at ``weights``."""
    if arch == "resnet56":
        return _module.load(weights, 56).eval()
    if arch == "vgg_cifar":
        model = vgg_cifar()
    elif arch == "cifar_mobilenet_v2_half":
        spec = importlib.util.spec_from_file_location("bench_cifar_shapes", Path(__file__).with_name("cifar_shapes.py"))
        shapes = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shapes)
        model = shapes.build("cifar_mobilenet_v2", width=0.5)
    else:
        raise ValueError(f"no trained {arch!r} here; resnet56, vgg_cifar or cifar_mobilenet_v2_half")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def split_classifier(arch: str, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a ``load_trained`` network: ``vgg_cifar`` cut after its flatten (1,024 features of the
    256 x 2 x 2 map; the head is its two-layer classifier), ResNet-56 and the MobileNetV2 before their linear
    layers (64 and 640 pooled features)."""
    if arch == "vgg_cifar":
        cut = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten)) + 1
        return nn.Sequential(*model[:cut]), nn.Sequential(*model[cut:])
    head = model.linear
    model.linear = nn.Identity()
    return model, head


def trained_backbone(arch: str, weights: str) -> nn.Module:
    """A network trained by ``bench/train_cifar.py`` without its classifier (``split_classifier``), as a
    backbone is deployed under a head of its own (``bench/features.py --model ARCH``)."""
    return split_classifier(arch, load_trained(arch, weights))[0]
