"""``fpgm``: filter pruning via geometric median (He et al., CVPR 2019).

Filters close to the geometric median of their layer are the most replaceable by the others.
As in the authors' implementation, the distance to the geometric median is approximated by
each filter's summed Euclidean distance to all other filters of the layer: small sum = near
the median = pruned first. Coupled groups add their conv/linear producers' distances (each
divided by its mean); groups without conv/linear producers fall back to the L2 norm.
"""

from __future__ import annotations

import torch

from compressor.criteria import Criterion, register
from compressor.criteria._common import filter_rows, finalize, is_filter_layer, weight_norm_scores
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores


@register
class FPGM(Criterion):
    name = "fpgm"
    description = "distance of each filter to the layer's other filters (geometric-median redundancy, data-free)"
    paper = "He, Liu, Wang, Hu, Yang: Filter Pruning via Geometric Median for Deep CNN Acceleration, CVPR 2019"

    def score(self, ctx: ScoringContext) -> Scores:
        raw: dict[int, torch.Tensor] = {}
        for g in ctx.prunable_groups():
            total = torch.zeros(g.size, dtype=torch.float64)
            used = False
            for m in g.producers():
                if not is_filter_layer(ctx.model, m):
                    continue
                rows = filter_rows(ctx.model, m)
                if rows is None:
                    continue
                d = torch.cdist(rows.double().unsqueeze(0), rows.double().unsqueeze(0)).squeeze(0).sum(1)
                total += d / d.mean().clamp_min(1e-30)
                used = True
            if used:
                raw[g.id] = total
        return finalize(ctx.groups, raw, fallback=weight_norm_scores(ctx.model, ctx.groups, p=2))
