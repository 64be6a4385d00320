"""``bn_scale``: |gamma| of the BatchNorm that follows each channel (network slimming, Liu et al. 2017).

Coupled groups add the |gamma| of every BatchNorm member, each divided by its mean. Groups
without an affine BatchNorm (plain conv, LayerNorm-only blocks) fall back to the L1 filter norm.
Network slimming trains with an L1 penalty on gamma first; here the trained gammas are read as
they are (no sparsity training), which is how it is commonly used as a post-training criterion.
"""

from __future__ import annotations

import torch

from compressor.criteria import Criterion, register
from compressor.criteria._common import filter_rows, finalize, is_bn, weight_norm_scores
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores


@register
class BNScale(Criterion):
    name = "bn_scale"
    description = "|gamma| of each channel's BatchNorm (network slimming; L1 filter norm where no BN, data-free)"
    paper = (
        "Liu, Li, Shen, Huang, Yan, Zhang: Learning Efficient Convolutional Networks through Network Slimming, "
        "ICCV 2017"
    )

    def score(self, ctx: ScoringContext) -> Scores:
        raw: dict[int, torch.Tensor] = {}
        for g in ctx.prunable_groups():
            bns = [m for m in g.producers() if is_bn(ctx.model, m)]
            if not bns:
                continue
            total = torch.zeros(g.size, dtype=torch.float64)
            for m in bns:
                gamma = filter_rows(ctx.model, m).double().abs().squeeze(1)
                total += gamma / gamma.mean().clamp_min(1e-30)
            raw[g.id] = total
        return finalize(ctx.groups, raw, fallback=weight_norm_scores(ctx.model, ctx.groups, p=1))
