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
  ``phi_i = integral_0^1 dF/dx_i(q) dq``, and ``dF/dx_i(q) = E[V(S + i) - V(S - i)]``. We sample
  ``q`` at the midpoints of STRATA equal strata, one Bernoulli(q) coalition per (image, stratum)
  sample, SAMPLES samples over distinct calibration images (spread over the set). A player's
  marginal contribution to a sampled coalition is taken to first order from one backward pass,
  for all players at once: the gradient of ``V`` with respect to its mask, at 1 for a member
  (removing it) and at ABSENT (1e-4, one-sided) for a non-member (adding it).
* **Utilization strength = order of the interactions.** With the Harsanyi dividends ``I(T)``
  of the game (``V(S) = sum over T in S of I(T)``), ``F(q) - V({}) = sum_T I(T) q^|T|``, so the
  ``F'``-weighted mean density ``U = integral q F'(q) dq / integral F'(q) dq`` equals
  ``sum_T I(T) |T|/(|T|+1) / sum_T I(T)``: 0.5 when every filter contributes alone (additive
  game), towards 1 when the decision needs many filters together, below 0.5 when filters
  duplicate each other (the worth saturates with a few). ``F'(q)`` is the sum of the players'
  marginal contributions at ``q``, so it comes from the same samples (differences within an image:
  no image-to-image offset enters). :meth:`SNPFI.propose_keep_ratios` returns ``U`` (clamped to
  ``[1/size, 1]``) as the group's keep ratio, which the width search scales by one factor to meet
  the budget (``--allocation criterion``).
* Channel score: ``phi_i`` (negative values, filters that lower the class probability, are
  ordered below zero-contribution ones).

Recovery by "minimizing the interaction difference" is left to the recovery stage (``lsq`` and
``block`` make the pruned network's outputs match the original's).

Precision and cost (ResNet-56, two threads): on the 4- and 8-channel layers of a test network the
estimates are within a few percent of the enumerated Shapley values. On ResNet-56 they are noisy,
because a filter's contribution varies from image to image: between two disjoint halves of 1,024
calibration images the per-layer correlation of the scores had a median of 0.41 with 128 samples
and 0.52 with 256, and the layers' keep ratios a correlation of 0.64 (128 samples). With the same
images and only the coalitions drawn anew, reading marginal contributions from members only (a
mask's gradient at exactly 0 is cut by the ReLU) gave a median of 0.21, reading non-members too
0.74. Scoring costs one forward-backward pass over SAMPLES images per group: about 25 s with 256.

A model that outputs features (``ctx.output == "features"``) plays the game on ``V(M)`` = the output's
component along the whole model's own output vector (``_common.target_log_prob``), in place of ``log P(y)``.
"""

from __future__ import annotations

import torch

from compressor.criteria import Criterion, register
from compressor.criteria._common import (
    Taps,
    finalize,
    logits_of,
    require_calib,
    target_log_prob,
    targets,
    working_copy,
)
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores
from compressor.recovery.common import spread_indices

STRATA = 4  # coalition densities q at the midpoints of equal strata of [0, 1]
# An absent player's mask: not 0, so that the gradient is the one-sided derivative of adding it (at exactly
# 0 the ReLU after the layer would cut it); its activation, scaled by 1e-4, no longer matters.
ABSENT = 1e-4
SAMPLES = 256  # (image, coalition) samples per group, spread over the strata


def utilization_strength(density: torch.Tensor, slope: torch.Tensor) -> float:
    """The slope-weighted mean coalition density: the interaction-weighted mean of |T|/(|T|+1).

    Args:
        density: Coalition densities ``q`` at the midpoints of equal strata of [0, 1].
        slope: ``F'(q)`` there: the summed marginal contributions of all players at that density.
    """
    gain = float(slope.sum())
    if not gain > 1e-12:
        return 0.0  # the layer does not help the decision: nothing in it is used
    return min(1.0, max(0.0, float((slope * density).sum()) / gain))


def _log_prob(model, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return target_log_prob(logits_of(model(x)).flatten(1), target)


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
        sizes = {g.id: g.size for g in groups}
        mids = (torch.arange(STRATA, dtype=torch.float64) + 0.5) / STRATA
        count = min(len(calib), SAMPLES)
        pick = spread_indices(len(calib), count)
        x = calib[pick].to(ctx.device).float()
        labels = ctx.labels[pick].to(ctx.device).long() if ctx.labels is not None else None
        step = max(1, int(ctx.batch_size))
        sample = torch.arange(SAMPLES)
        image = sample % count
        stratum = (sample + sample // count) % STRATA  # an image drawn again goes to the next stratum
        per_stratum = torch.bincount(stratum, minlength=STRATA).double()
        out: dict[int, tuple[torch.Tensor, float]] = {}
        with Taps(model, groups) as taps:
            with torch.no_grad():
                target = torch.cat([targets(logits_of(model(x[i:i + step])).flatten(1), None if labels is None
                                            else labels[i:i + step], ctx.output)
                                    for i in range(0, len(x), step)])
                taps.clear()
            for gid in sorted(taps.tapped_groups):
                size = sizes[gid]
                gen = torch.Generator().manual_seed(ctx.seed * 100003 + gid)
                members = torch.rand(SAMPLES, size, generator=gen, dtype=torch.float64) < mids[stratum][:, None]
                contribution = torch.zeros(STRATA, size, dtype=torch.float64)
                for i in range(0, SAMPLES, step):
                    rows = image[i:i + step]
                    mask = torch.where(members[i:i + step], 1.0, ABSENT).float().to(ctx.device).requires_grad_(True)
                    taps.masks[gid] = mask
                    value = _log_prob(model, x[rows], target[rows])
                    (grad,) = torch.autograd.grad(value.sum(), mask)
                    taps.clear()
                    contribution.index_add_(0, stratum[i:i + step], grad.double().cpu())
                del taps.masks[gid]
                marginal = contribution / per_stratum[:, None]  # E[V(S + i) - V(S - i)] at each density
                out[gid] = (marginal.mean(0), utilization_strength(mids, marginal.sum(1)))
        return out

    def _cached_game(self, ctx: ScoringContext) -> dict[int, tuple[torch.Tensor, float]]:
        """The game of ``ctx``, played once for both ``score`` and ``propose_keep_ratios``."""
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] is ctx:
            return cached[1]
        game = self._game(ctx)
        self._cache = (ctx, game)
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
