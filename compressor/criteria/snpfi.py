"""``snpfi``: filter importance x filter utilization strength, with criterion-set layer widths.

Paper: Tang, Wei, Li, "Structured Network Pruning by Measuring Filter-wise Interactions"
(SNPFI, arXiv:2307.00758, 2023). Its idea: existing criteria judge filters one by one; SNPFI
adds the *interaction* between filters. A filter's *importance* reflects its individual
decision ability, the *utilization strength* reflects how much the decision needs it together
with the other filters; the utilization strength of a layer sets that layer's sparsity
automatically, and pruned models are recovered without retraining by *minimizing the
interaction difference* between the pruned and the original model.

We could not obtain the paper's equations here: only its abstract, and a summary saying that it
treats the filters of a layer as the players of a cooperative game whose coalition value is the
log-probability of the class when only those filters are active (the game-theoretic interaction
framework). This module does not sample coalitions; it is our formulation of the three ideas with
second-order activation statistics over the calibration images (a filter a linear combination of
the others can replace adds little to any coalition). Treat it as "SNPFI-style", not a
reproduction:

* responses ``r`` = ReLU of the channel's producer output (after BatchNorm), average-pooled to at
  most 8x8 positions per image; every (image, position) is one sample;
* importance ``I_c = sqrt(E[r_c^2])`` (the filter's response energy), divided by its layer mean;
* interaction: the correlation matrix ``P`` of the responses (ridge 1e-3); the utilization
  strength of filter ``c`` is the part of its response the other filters cannot reproduce,
  ``U_c = 1 - R^2_c = 1 / (P^-1)_cc`` (the unexplained variance of a linear regression of ``r_c``
  on the other channels). A filter that its neighbours duplicate has ``U_c`` near 0;
* channel score ``I_c * U_c`` (dead channels: 0);
* layer utilization strength = effective rank of ``P`` (exp of the entropy of its normalized
  eigenvalues) divided by the channel count: a layer whose filters are strongly interacting
  (redundant) has a low value and is pruned more. :meth:`SNPFI.propose_keep_ratios` returns it as
  the group's keep ratio, which the width search scales by one factor to meet the budget
  (``--allocation criterion``).

Coupled groups average the statistics of their producer outputs (importance and utilization
per channel, effective rank per layer).

Recovery proposed by the paper (not implemented here; for the recovery stage): after pruning,
adjust the remaining weights so that the filter-wise interaction of the pruned model matches the
original's, without iterative training. With our statistics that is a least-squares problem per
layer: choose the next layer's input weights for the kept channels so that its pre-activation
reproduces the original one, ``W' = argmin || W_keep' r_keep - W r ||^2``, whose solution uses
exactly the correlation statistics above (``W' = W P[:, keep] P[keep, keep]^-1`` in whitened
form): the removed channels' contributions are re-expressed through the kept ones they interact
with.
"""

from __future__ import annotations

import torch

from compressor.criteria import Criterion, register
from compressor.criteria._common import Taps, batches, finalize, per_channel, require_calib, spatial_pool, working_copy
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores

RIDGE = 1e-3


class _Moments:
    def __init__(self, size: int) -> None:
        self.n = 0
        self.s1 = torch.zeros(size, dtype=torch.float64)
        self.s2 = torch.zeros(size, size, dtype=torch.float64)

    def add(self, r: torch.Tensor) -> None:  # r: samples x size
        r = r.double().cpu()
        self.n += r.shape[0]
        self.s1 += r.sum(0)
        self.s2 += r.T @ r

    def stats(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(importance per channel, utilization per channel, layer utilization strength)."""
        n = max(1, self.n)
        energy = (self.s2.diagonal() / n).clamp_min(0)
        importance = energy.sqrt()
        importance = importance / importance.mean().clamp_min(1e-30)
        mean = self.s1 / n
        cov = self.s2 / n - torch.outer(mean, mean)
        var = cov.diagonal().clamp_min(0)
        live = var > 1e-12 * var.max().clamp_min(1e-30)
        size = len(var)
        util = torch.zeros(size, dtype=torch.float64)
        if live.sum() == 0:
            return importance, util, 1.0 / size
        std = var[live].sqrt()
        corr = cov[live][:, live] / torch.outer(std, std)
        corr = corr + RIDGE * torch.eye(len(std), dtype=corr.dtype)
        util[live] = 1.0 / torch.linalg.inv(corr).diagonal().clamp_min(1.0)
        eig = torch.linalg.eigvalsh(corr).clamp_min(0)
        p = eig / eig.sum().clamp_min(1e-30)
        erank = float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))
        return importance, util, min(1.0, max(1.0 / size, erank / size))


@register
class SNPFI(Criterion):
    name = "snpfi"
    description = "filter importance x utilization strength from activation interactions; sets layer widths itself"
    paper = (
        "Tang, Wei, Li: Structured Network Pruning by Measuring Filter-wise Interactions (SNPFI), "
        "arXiv:2307.00758, 2023 (our formulation)"
    )
    needs_data = True

    def _moments(self, ctx: ScoringContext) -> dict[int, dict[str, _Moments]]:
        require_calib(ctx, self.name)
        model = working_copy(ctx)
        groups = ctx.prunable_groups()
        sizes = {g.id: g.size for g in groups}
        moments: dict[int, dict[str, _Moments]] = {}
        with torch.no_grad(), Taps(model, groups) as taps:
            for x, _ in batches(ctx):
                taps.clear()
                model(x)
                for name, rec in list(taps.records):
                    pooled = spatial_pool(rec.clamp_min(0))
                    for gid, idx, dim in taps.entries[name]:
                        r = per_channel(pooled, dim, idx)  # N x size x positions
                        r = r.transpose(1, 2).reshape(-1, r.shape[1])
                        moments.setdefault(gid, {}).setdefault(name, _Moments(sizes[gid])).add(r)
                taps.clear()
        return moments

    def _stats(self, ctx: ScoringContext) -> dict[int, tuple[torch.Tensor, float]]:
        key = (id(ctx), id(ctx.model), id(ctx.calib))
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        out: dict[int, tuple[torch.Tensor, float]] = {}
        for gid, per in self._moments(ctx).items():
            stats = [m.stats() for m in per.values()]
            importance = sum(s[0] for s in stats) / len(stats)
            util = sum(s[1] for s in stats) / len(stats)
            out[gid] = (importance * util, sum(s[2] for s in stats) / len(stats))
        self._cache = (key, out)
        return out

    def score(self, ctx: ScoringContext) -> Scores:
        stats = self._stats(ctx)
        return finalize(ctx.groups, {gid: s for gid, (s, _) in stats.items()})

    def propose_keep_ratios(self, ctx: ScoringContext) -> dict[int, float]:
        stats = self._stats(ctx)
        return {g.id: float(stats[g.id][1]) if g.id in stats else 1.0 for g in ctx.prunable_groups()}
