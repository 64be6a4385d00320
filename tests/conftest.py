"""Shared fixtures: the reference data in ../shared (tests skip with a message without it)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test with a message saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests need the reference data in ../shared beside the repo")
    return path


@pytest.fixture
def cifar_resnet_file() -> Path:
    return shared_path("models", "cifar_resnet.py")


@pytest.fixture
def resnet56_weights() -> Path:
    return shared_path("models", "resnet56-cifar10-jpeg.pt")


@pytest.fixture
def cifar_train_tar() -> Path:
    return shared_path("data", "cifar10-jpeg", "train.tar.gz")


@pytest.fixture
def cifar_val_tar() -> Path:
    return shared_path("data", "cifar10-jpeg", "val.tar.gz")


def load_cifar_resnet(depth: int = 20) -> torch.nn.Module:
    """A random-weight option-A CIFAR ResNet from ../shared/models/cifar_resnet.py."""
    import importlib.util

    path = shared_path("models", "cifar_resnet.py")
    spec = importlib.util.spec_from_file_location("shared_cifar_resnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.CifarResNet(depth).eval()


@functools.cache
def load_cifar_shapes():
    """``bench/cifar_shapes.py``: CIFAR architectures written in community training repositories' idioms."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cifar_shapes", REPO / "bench" / "cifar_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BN statistics/affine so that activations keep a useful scale through the net."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture
def bn_net_file(tmp_path) -> Path:
    """A model file with ``Net`` (two conv-BN-ReLU layers and a 5-class head, initial BatchNorm statistics)
    and ``Trained`` (the same with the statistics moved, as training leaves them)."""
    path = tmp_path / "net.py"
    path.write_text(
        "import torch.nn as nn\n"
        "def Net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),\n"
        "                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))\n"
        "def Trained():\n"
        "    net = Net()\n"
        "    for m in net.modules():\n"
        "        if isinstance(m, nn.BatchNorm2d):\n"
        "            m.running_mean.fill_(0.3); m.running_var.fill_(2.0)\n"
        "    return net\n"
    )
    return path
