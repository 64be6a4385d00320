"""Model factories for ``bench/zoo_run.py``: architectures with random weights and 10 classes.

The torchvision zoo (ARCHITECTURES), and the CIFAR shapes of ``bench/cifar_shapes.py``
(CIFAR_SHAPES: community-style definitions at 32x32). Each factory seeds torch, builds the
architecture and sets its BatchNorm statistics from a few batches of noise (64x64 for torchvision,
32x32 for the CIFAR shapes), so activations neither vanish nor explode through deep stacks, then
returns it in eval mode. ``compress bench/zoo_models.py:resnet18 ...`` calls one with no arguments.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torchvision
from torch import nn

# loaded by path: ``compress`` imports this file by path, without bench/ on sys.path
_spec = importlib.util.spec_from_file_location("bench_cifar_shapes", Path(__file__).with_name("cifar_shapes.py"))
cifar_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cifar_shapes)

ARCHITECTURES = (
    "resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg11_bn", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121",
    "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "mnasnet1_0", "convnext_tiny",
)
CIFAR_SHAPES = tuple(cifar_shapes.SHAPES)
EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}


def build(name: str, size: int | None = None) -> nn.Module:
    """``name`` with 10 classes, BatchNorm statistics set on noise of ``size`` x ``size``.

    ``size`` defaults to 32 for the CIFAR shapes and 64 for torchvision's architectures.
    """
    torch.manual_seed(0)
    if name in cifar_shapes.SHAPES:
        model, size = cifar_shapes.build(name), size or 32
    else:
        model, size = getattr(torchvision.models, name)(num_classes=10, **EXTRA_KWARGS.get(name, {})), size or 64
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average over the batches below
            module.reset_running_stats()
    model.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, size, size, generator=gen))
    return model.eval()


def _factory(name: str):
    def make() -> nn.Module:
        return build(name)

    make.__name__ = name
    make.__doc__ = f"{name}, random weights, 10 classes."
    return make


for _name in ARCHITECTURES + CIFAR_SHAPES:
    globals()[_name] = _factory(_name)
