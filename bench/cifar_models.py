"""Factories for the CIFAR ResNets of other depths in ../shared (the model file builds depth 56 by default)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "shared_cifar_resnet", Path(__file__).resolve().parents[2] / "shared" / "models" / "cifar_resnet.py"
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def resnet20():
    return _module.CifarResNet(20)


def resnet56():
    return _module.CifarResNet(56)
