"""``snpfi``: each layer's filters as players of a coalition game on the class log-probability.

Paper: Tang, Wei, Li, "Structured Network Pruning by Measuring Filter-wise Interactions"
(SNPFI, arXiv:2307.00758, 2023). What we have of it: the abstract, and the passage that sets up
its redundancy criterion: the inference achieved by the filters of layer ``l`` is a cooperative
game; on an image, each filter is a player, a coalition ``M`` of them (the others removed) is
worth ``V(M) = log P(y)``. From that game come the *filter importance* (the decision ability of
a filter alone) and the *filter utilization strength* (that of filters used jointly, i.e. their
interactions); the utilization strength sets each layer's sparsity, the importance chooses which
filters go, and the pruned model is recovered without retraining by minimizing the interaction
difference. The paper's estimators and formulas are not available to us; this module implements
that game, with the following choices of ours:

* **Game.** Players are a channel group's channels (a coupled residual group is one game: a
  removed channel disappears from every producer output, as pruning removes it). ``V`` is the
  log-softmax of the target class: the original's own prediction (label-free) or the true label
  with ``--labels``; the other layers stay whole.
* **Importance = Shapley value**, through Owen's multilinear extension: with ``F(q)`` the
  expected worth of a coalition that holds every player independently with probability ``q``,
  ``phi_i = integral_0^1 E[V(S + i) - V(S - i)] dq``. We sample ``q`` at the midpoints of
  STRATA equal strata, one Bernoulli(q) coalition per sampled (image, stratum) pair, with more
  pairs where ``q`` is small (:func:`stratum_sizes`). A player's marginal contribution to a
  sampled coalition that contains it is taken to first order, the gradient of ``V`` with respect
  to the player's 0/1 mask at 1, so one backward pass gives it for all members at once; averaged
  over the coalitions that contain it, stratum by stratum, that is ``E[V(S + i) - V(S - i)]`` at
  that ``q`` (on a 4-filter layer of a small network it was within a few percent of the
  enumerated value).
* **Utilization strength = order of the interactions.** With the Harsanyi dividends ``I(T)``
  of the game (``V(S) = sum over T in S of I(T)``), ``F(q) - V({}) = sum_T I(T) q^|T|``, so
  ``U = 1 - integral_0^1 (F(q) - V({})) / (V(N) - V({})) dq = sum_T I(T) |T|/(|T|+1) / sum_T I(T)``:
  0.5 when every filter contributes alone (additive game), towards 1 when the decision needs many
  filters together, below 0.5 when filters duplicate each other (the worth saturates with a few).
  ``F`` is measured at the strata and at ``q`` = 0 and 1 (trapezoid rule). :meth:`SNPFI.propose_keep_ratios`
  returns ``U`` (clamped to ``[1/size, 1]``) as the group's keep ratio, which the width search
  scales by one factor to meet the budget (``--allocation criterion``).
* Channel score: ``phi_i`` (negative values, filters that lower the class probability, are
  ordered below zero-contribution ones).

Recovery by "minimizing the interaction difference" is left to the recovery stage (``lsq`` and
``block`` make the pruned network's outputs match the original's).

Cost: per group, one forward-backward pass over SAMPLES (image, coalition) pairs and one
forward pass over the images with the layer removed; the worth curve is measured on the same
passes, each coalition's worth taken relative to its image's worth with the whole layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.criteria import Criterion, register
from compressor.criteria._common import Taps, finalize, logits_of, require_calib, targets, working_copy
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores

STRATA = 4  # coalition densities q at the midpoints of equal strata of [0, 1]
SAMPLES = 128  # (image, coalition) pairs per group, over all strata


def utilization_strength(q: torch.Tensor, worth: torch.Tensor) -> float:
    """``1 - normalized area under the worth curve``: the interaction-weighted mean of |T|/(|T|+1).

    Args:
        q: Increasing coalition densities, from 0 to 1.
        worth: Mean worth ``F(q)`` at each density (``worth[0]`` = empty layer, ``worth[-1]`` = whole).
    """
    gain = float(worth[-1] - worth[0])
    if not gain > 1e-9:
        return 0.0  # the layer does not help the decision: nothing in it is used
    curve = (worth - worth[0]) / gain
    return float(1.0 - torch.trapezoid(curve, q))


def stratum_sizes(density: torch.Tensor, total: int) -> torch.Tensor:
    """Coalitions per stratum, inversely proportional to its density: every player is then a member
    of about as many sampled coalitions in each stratum (its marginal contribution is read only there)."""
    weight = 1.0 / density
    return (weight / weight.sum() * total).round().long().clamp_min(1)


def _log_prob(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits_of(model(x)).flatten(1).float(), 1).gather(1, target[:, None]).squeeze(1)


@register
class SNPFI(Criterion):
    name = "snpfi"
    description = "Shapley value of each filter in its layer's game on log P(class); interaction order sets widths"
    paper = (
        "Tang, Wei, Li: Structured Network Pruning by Measuring Filter-wise Interactions (SNPFI), "
        "arXiv:2307.00758, 2023 (its coalition game; estimators ours)"
    )
    needs_data = True
    needs_gradients = True

    def _game(self, ctx: ScoringContext) -> dict[int, tuple[torch.Tensor, float]]:
        """Per group: (Shapley value per channel, utilization strength)."""
        calib = require_calib(ctx, self.name)
        model = working_copy(ctx)
        groups = ctx.prunable_groups()
        mids = (torch.arange(STRATA, dtype=torch.float64) + 0.5) / STRATA
        counts = stratum_sizes(mids, SAMPLES)
        count = min(len(calib), int(counts.max()))
        pick = (torch.linspace(0, len(calib) - 1, count).round().long() if count < len(calib)
                else torch.arange(len(calib)))  # evenly spread: image folders load class by class
        x = calib[pick].to(ctx.device).float()
        labels = ctx.labels[pick].to(ctx.device).long() if ctx.labels is not None else None
        step = max(1, int(ctx.batch_size))
        stratum = torch.cat([torch.full((int(c),), k) for k, c in enumerate(counts)])
        image = torch.cat([torch.arange(int(c)) % len(x) for c in counts])
        density = torch.cat([torch.zeros(1, dtype=torch.float64), mids, torch.ones(1, dtype=torch.float64)])
        out: dict[int, tuple[torch.Tensor, float]] = {}
        with Taps(model, groups) as taps:
            with torch.no_grad():
                target = torch.cat([targets(logits_of(model(x[i:i + step])).flatten(1), None if labels is None
                                            else labels[i:i + step]) for i in range(0, len(x), step)])
                whole = torch.cat([_log_prob(model, x[i:i + step], target[i:i + step])
                                   for i in range(0, len(x), step)]).double().cpu()
                taps.clear()
            for gid in sorted(taps.tapped_groups):
                size = next(g.size for g in groups if g.id == gid)
                gen = torch.Generator().manual_seed(ctx.seed * 100003 + gid)
                coalitions = (torch.rand(len(image), size, generator=gen, dtype=torch.float64)
                              < mids[stratum][:, None]).float()
                contribution = torch.zeros(STRATA, size, dtype=torch.float64)
                worth = torch.zeros(STRATA, dtype=torch.float64)
                for i in range(0, len(image), step):
                    rows = image[i:i + step]
                    mask = coalitions[i:i + step].to(ctx.device).requires_grad_(True)
                    taps.masks[gid] = mask
                    value = _log_prob(model, x[rows], target[rows])
                    (grad,) = torch.autograd.grad(value.sum(), mask)
                    taps.clear()
                    # a member's marginal contribution, to first order: the gradient of its 0/1 mask at 1
                    # (at 0 it would be cut by the ReLU after the layer)
                    members = coalitions[i:i + step].double()
                    contribution.index_add_(0, stratum[i:i + step], grad.double().cpu() * members)
                    worth.index_add_(0, stratum[i:i + step], value.detach().double().cpu() - whole[rows])
                present = torch.zeros(STRATA, size, dtype=torch.float64).index_add_(0, stratum, coalitions.double())
                per_stratum = contribution / present.clamp_min(1)
                with torch.no_grad():
                    taps.masks[gid] = torch.zeros(size, device=ctx.device)
                    empty = torch.cat([_log_prob(model, x[i:i + step], target[i:i + step])
                                       for i in range(0, len(x), step)]).double().cpu()
                    taps.clear()
                del taps.masks[gid]
                base = whole.mean()
                curve = torch.cat([empty.mean()[None], worth / counts.double() + base, base[None]])
                phi = (per_stratum * (present > 0)).sum(0) / (present > 0).sum(0).clamp_min(1)
                out[gid] = (phi, utilization_strength(density, curve))
        return out

    def _cached_game(self, ctx: ScoringContext) -> dict[int, tuple[torch.Tensor, float]]:
        key = (id(ctx), id(ctx.model), id(ctx.calib))
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        game = self._game(ctx)
        self._cache = (key, game)
        return game

    def score(self, ctx: ScoringContext) -> Scores:
        raw = {}
        for gid, (phi, _) in self._cached_game(ctx).items():
            # harmful filters (phi < 0) rank below useless ones, in their own order
            raw[gid] = phi.clamp_min(0) + 1e-9 * (phi - phi.min())
        return finalize(ctx.groups, raw)

    def propose_keep_ratios(self, ctx: ScoringContext) -> dict[int, float]:
        game = self._cached_game(ctx)
        ratios = {}
        for g in ctx.prunable_groups():
            u = game[g.id][1] if g.id in game else 1.0
            ratios[g.id] = min(1.0, max(1.0 / g.size, u))
        return ratios
