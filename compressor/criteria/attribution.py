"""``attribution``: agreement of each channel's feature map with the model's attribution map.

For every calibration image the attribution map of the predicted class (or the true class with
``ctx.labels``) is computed at input resolution as gradient x input summed over colour channels,
``A = sum_colour x * dlogit/dx`` (Shrikumar et al. 2016 / Simonyan et al. 2014 saliency). A
channel scores high when its (ReLU'd) feature map lights up where the attribution is positive:

    score_c = mean over images of  max(0, cos(relu(a_c), A_l)) * mean |a_c|

where ``A_l`` is the attribution map area-averaged down to the feature map's resolution (cheaper
than upsampling every channel, and equivalent up to the interpolation kernel) and the cosine is
over spatial positions. The activation factor makes a silent channel score 0 however it is
aligned. Feature maps without spatial extent (linear outputs) score by activation magnitude
only. Coupled groups add the scores of their producer outputs (read after BatchNorm).

Honest provenance: this is our formulation in the spirit of the attribution-guided pruning line
of work, which uses explanation maps to decide which units matter (Sabih et al. 2020; Yeom et al.
2021 with LRP; Hatefi et al. 2024 with attribution-guided pruning of vision transformers and
CNNs). None of them defines exactly this feature-map/attribution correlation; treat it as an
heuristic inspired by them, not a reproduction.

A model that outputs features (``ctx.output == "features"``) is attributed for its output's component
along its own output vector (``_common.target_score``), in place of the predicted class's logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.criteria import Criterion, register
from compressor.criteria._common import (
    Taps,
    batches,
    finalize,
    logits_of,
    require_calib,
    target_score,
    targets,
    working_copy,
)
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores


def attribution_map(x: torch.Tensor, logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Gradient x input of the target logits (``_common.target_score``) w.r.t. ``x`` (requires grad), summed over
    dim 1."""
    (grad,) = torch.autograd.grad(target_score(logits, tgt).sum(), x)
    return (x.detach() * grad).sum(1)


@register
class Attribution(Criterion):
    name = "attribution"
    description = "agreement of each channel's feature map with the gradient x input attribution map"
    paper = (
        "heuristic after attribution-guided pruning, e.g. Sabih, Hannig, Teich: Utilizing Explainable AI for "
        "Quantization and Pruning of Deep Neural Networks, arXiv:2008.09072, 2020"
    )
    needs_data = True
    needs_gradients = True

    def score(self, ctx: ScoringContext) -> Scores:
        calib = require_calib(ctx, self.name)
        model = working_copy(ctx)
        acc: dict[int, torch.Tensor] = {}
        with Taps(model, ctx.prunable_groups()) as taps:
            for x, y in batches(ctx):
                taps.clear()
                x.requires_grad_(True)
                logits = logits_of(model(x)).flatten(1)
                amap = attribution_map(x, logits, targets(logits, y, ctx.output))  # N x H x W
                for name, rec in list(taps.records):
                    for gid, idx, dim in taps.entries[name]:
                        acc[gid] = acc.get(gid, 0) + self._agreement(rec, dim, idx, amap)
                taps.clear()
        raw = {gid: s / len(calib) for gid, s in acc.items()}
        return finalize(ctx.groups, raw)

    @staticmethod
    def _agreement(rec: torch.Tensor, dim: int, idx: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        a = rec.movedim(dim, 1) if dim != 1 else rec
        a = a.index_select(1, idx)
        magnitude = a.abs().reshape(a.shape[0], a.shape[1], -1).mean(2)
        if a.dim() != 4 or amap.dim() != 3:
            return magnitude.double().sum(0).cpu()
        target = F.adaptive_avg_pool2d(amap[:, None], a.shape[2:]).flatten(1)  # N x hw
        feat = a.clamp_min(0).flatten(2)  # N x C x hw
        cos = F.cosine_similarity(feat, target[:, None, :], dim=2, eps=1e-12)
        return (cos.clamp_min(0) * magnitude).double().sum(0).cpu()
