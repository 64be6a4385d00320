"""Model factories for ``bench/zoo_run.py``: torchvision architectures with random weights and 10 classes.

Each factory seeds torch, builds the architecture and sets its BatchNorm statistics from a few
batches of noise at 64x64 (so activations neither vanish nor explode through deep stacks), then
returns it in eval mode. ``compress bench/zoo_models.py:resnet18 ...`` calls one with no arguments.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

ARCHITECTURES = (
    "resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg11_bn", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121",
    "shufflenet_v2_x1_0", "squeezenet1_1", "googlenet", "mnasnet1_0", "convnext_tiny",
)
EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}


def build(name: str, size: int = 64) -> nn.Module:
    """``name`` from torchvision with 10 classes, BatchNorm statistics set on noise of ``size`` x ``size``."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10, **EXTRA_KWARGS.get(name, {}))
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
    make.__doc__ = f"torchvision {name}, random weights, 10 classes."
    return make


for _name in ARCHITECTURES:
    globals()[_name] = _factory(_name)
