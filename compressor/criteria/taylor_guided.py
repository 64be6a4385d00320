"""``taylor_guided``: iterative, positive-evidence Taylor scores (a variant of Molchanov et al. 2019).

Differences from ``taylor``:

* the objective is the logit of the predicted class (true class with ``ctx.labels``), not the
  loss, and only the *positive* part of each image's gate gradient
  ``z_c = sum_{h,w} a_c * dlogit/da_c`` is accumulated: a channel counts when it supports the
  prediction, channels that only argue against it do not;
* scoring is iterative: in ``steps`` rounds (default 4), the channels are scored, the lowest
  scoring ``prune_fraction * k / steps`` of every group are masked (zeroed by forward hooks on a
  copy of the model, never pruned physically), and the survivors are re-scored with those
  channels gone, so a channel that only matters once a redundant twin is removed is noticed.

The target fraction is the class attribute ``prune_fraction`` (default 0.5: the fraction of each
group's channels expected to be removed; it only sets how far the masking goes, the width search
still decides the final widths). The returned score orders channels by the round in which they
were masked (earlier = lower) and, within a round, by that round's score: channels masked in
round ``k`` score in ``[k, k+1) / steps``, the survivors of the last round in ``[(steps-1), steps) / steps``.

This is our variant ("guided" by positive evidence and by re-scoring); it is not a published
method as such. The iterative re-scoring follows Molchanov et al.'s iterative pruning schedule,
and the positive-evidence restriction follows the sign-aware Taylor criteria of that paper's
follow-ups.

A model that outputs features (``ctx.output == "features"``) uses its output's component along the
unmasked model's own output vector (``_common.target_score``) in place of the predicted class's logit.
"""

from __future__ import annotations

import math

import torch

from compressor.criteria import Criterion, register
from compressor.criteria._common import (
    Taps,
    batches,
    finalize,
    grads_of,
    logits_of,
    require_calib,
    target_score,
    targets,
    working_copy,
)
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores


@register
class TaylorGuided(Criterion):
    name = "taylor_guided"
    description = "iterative Taylor scores keeping only positive evidence for the predicted class (masked re-scoring)"
    paper = (
        "variant of Molchanov, Mallya, Tyree, Frosio, Kautz: Importance Estimation for Neural Network Pruning, "
        "CVPR 2019"
    )
    needs_data = True
    needs_gradients = True
    prune_fraction = 0.5
    steps = 4

    def score(self, ctx: ScoringContext) -> Scores:
        require_calib(ctx, self.name)
        model = working_copy(ctx)
        groups = ctx.prunable_groups()
        by_id = {g.id: g for g in groups}
        with Taps(model, groups, keep_graph=True) as taps:
            # targets fixed on the unmasked model
            fixed: list[torch.Tensor] = []
            with torch.no_grad():
                for x, y in batches(ctx):
                    fixed.append(targets(logits_of(model(x)).flatten(1), y, ctx.output))
            taps.clear()
            alive = {g.id: torch.ones(g.size, dtype=torch.bool) for g in groups if g.id in taps.tapped_groups}
            level = {gid: torch.full((by_id[gid].size,), float(self.steps - 1)) for gid in alive}
            within = {gid: torch.zeros(by_id[gid].size, dtype=torch.float64) for gid in alive}
            for k in range(self.steps):
                s = self._round(ctx, model, taps, fixed)
                for gid, on in alive.items():
                    sk = s.get(gid, torch.zeros(len(on), dtype=torch.float64))
                    peak = sk[on].max().clamp_min(1e-30) if on.any() else torch.tensor(1.0)
                    within[gid] = torch.where(on, (sk / peak).clamp(0, 1) * 0.999, within[gid])
                    if k == self.steps - 1:
                        continue
                    size = len(on)
                    want_masked = min(size - 1, int(math.floor(self.prune_fraction * size * (k + 1) / self.steps)))
                    extra = want_masked - int((~on).sum())
                    if extra <= 0:
                        continue
                    cand = torch.nonzero(on).flatten()
                    order = cand[torch.argsort(sk[cand], stable=True)][:extra]
                    on[order] = False
                    level[gid][order] = float(k)
                    taps.masks[gid] = on.to(torch.float32).to(ctx.device)
            taps.masks.clear()
        raw = {gid: (level[gid].double() + within[gid]) / self.steps for gid in alive}
        return finalize(ctx.groups, raw)

    @staticmethod
    def _round(ctx: ScoringContext, model, taps: Taps, fixed: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        acc: dict[int, torch.Tensor] = {}
        for (x, _), tgt in zip(batches(ctx), fixed, strict=True):
            taps.clear()
            logits = logits_of(model(x.requires_grad_(True))).flatten(1)
            grads = grads_of(target_score(logits, tgt).sum(), taps.records)
            for (gid, _, a), (_, _, g) in zip(taps.views(), taps.views(grads), strict=True):
                z = (a.detach() * g).sum(2).clamp_min(0)
                acc[gid] = acc.get(gid, 0) + z.double().sum(0).cpu()
            taps.clear()
        return acc
