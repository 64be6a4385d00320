"""``random``: uniformly random scores, the control every criterion should beat."""

from __future__ import annotations

import torch

from compressor.criteria import Criterion, register
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores


@register
class RandomScores(Criterion):
    """Independent U(0, 1) scores per channel, seeded by ``ctx.seed`` and the group id."""

    name = "random"
    description = "random scores (control; seeded, data-free)"
    paper = "control baseline; cf. Mittal et al., Recovering from Random Pruning, WACV 2018"

    def score(self, ctx: ScoringContext) -> Scores:
        out: Scores = {}
        for g in ctx.prunable_groups():
            gen = torch.Generator().manual_seed(int(ctx.seed) * 100003 + g.id)
            out[g.id] = torch.rand(g.size, generator=gen, dtype=torch.float32)
        return out
