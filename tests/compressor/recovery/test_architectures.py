"""``lsq`` and ``block`` on the CIFAR shapes of ``bench/cifar_shapes.py`` (community idioms, random weights).

Both must run (neither skipped for want of an fx trace or a node correspondence) and bring the pruned
network's outputs on held-out images much closer to the original's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_cifar_shapes, randomize_bn
from torch import nn

from compressor import graph as G
from compressor.recovery import RecoveryContext, get_recovery
from compressor.recovery.recipe import fidelity

SHAPES = load_cifar_shapes()


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Low-frequency noise at 32x32, so that neighbouring pixels and channels correlate as in photographs."""
    gen = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 8, 8, generator=gen), size=(32, 32), mode="bilinear", align_corners=False)


def spread_logits(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Scale the classifier so that random weights give logits of standard deviation 3, not near-constant ones."""
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        scale = 3.0 / float(model(x).std().clamp_min(1e-6))
        classifier.weight.mul_(scale)
        classifier.bias.mul_(scale)
    return model


@pytest.mark.parametrize("name", sorted(SHAPES.SHAPES))
def test_lsq_and_block_run_and_recover(name):
    torch.manual_seed(0)
    calib, held = smooth_images(64, 0), smooth_images(64, 1)
    model = spread_logits(randomize_bn(SHAPES.build(name, width=0.125)), calib)
    graph = G.build_graph(model, calib[:1])
    plan = G.random_plan(graph, 0.5, seed=0)
    pruned = G.apply_plan(graph, plan)
    before = fidelity(graph.model, pruned.model, held)
    ctx = RecoveryContext(original=graph.model, pruned=pruned.model, groups=graph.groups, plan=plan,
                          kept=pruned.kept, calib=calib, batch_size=64)
    lsq, block = get_recovery("lsq"), get_recovery("block")
    lsq.apply(ctx)
    block.apply(ctx)
    after = fidelity(graph.model, pruned.model, held)
    assert lsq.last_info, "lsq refit no layer"
    assert block.last_info["status"] == "done", block.last_info
    assert after["kl"] < 0.5 * before["kl"], (before, after)
