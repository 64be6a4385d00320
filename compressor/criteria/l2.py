"""``l2``: L2 norm of each channel's filter (soft filter pruning's magnitude criterion)."""

from __future__ import annotations

from compressor.criteria import Criterion, register
from compressor.criteria._common import weight_norm_scores
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores


@register
class L2Norm(Criterion):
    """Euclidean norm of each producer filter; coupled groups add their members' (mean-normalized) norms."""

    name = "l2"
    description = "L2 norm of each channel's filter weights (data-free)"
    paper = "He, Kang, Dong, Fu, Yang: Soft Filter Pruning for Accelerating Deep CNNs, IJCAI 2018"

    def score(self, ctx: ScoringContext) -> Scores:
        return weight_norm_scores(ctx.model, ctx.groups, p=2)
