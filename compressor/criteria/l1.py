"""``l1``: L1 norm of each channel's filter (Li et al., ICLR 2017)."""

from __future__ import annotations

from compressor.criteria import Criterion, register
from compressor.criteria._common import weight_norm_scores
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores


@register
class L1Norm(Criterion):
    """Sum of |w| over each producer filter; coupled groups add their members' (mean-normalized) norms.

    Groups whose producers have no conv/linear weights (e.g. only a norm or a bare parameter)
    use the absolute per-channel scale of those members instead.
    """

    name = "l1"
    description = "L1 norm of each channel's filter weights (data-free)"
    paper = "Li, Kadav, Durdanovic, Samet, Graf: Pruning Filters for Efficient ConvNets, ICLR 2017"

    def score(self, ctx: ScoringContext) -> Scores:
        return weight_norm_scores(ctx.model, ctx.groups, p=1)
