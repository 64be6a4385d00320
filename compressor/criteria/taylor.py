"""``taylor``: first-order Taylor importance of each channel (Molchanov et al., CVPR 2019).

The change of the loss when channel ``c`` is removed is approximated to first order by the
gradient w.r.t. a gate on the channel, ``z_c = sum_{h,w} a_c * dL/da_c``, and squared. The
paper's main score squares the gate gradient of each minibatch (``(sum_s g_s w_s)^2``, method 22,
"Taylor_gate", in the authors' code, github.com/NVlabs/Taylor_pruning ``pruning_engine.py``); its
"FG" variant (method 23, "Taylor FO-FG" in the paper's Tables 1 and 2) squares each example's
gradient. We use the per-example variant, averaged over the calibration images, which makes the
result independent of the batch size. The activation is read after BatchNorm (the paper's "gate
after BN"); coupled residual groups add the importance of every producer output.

Label-free by default: the loss is the cross-entropy against the model's own argmax prediction;
``ctx.labels`` replaces those targets when given. A model that outputs features (``ctx.output ==
"features"``: an embedding, no classes, no loss) is scored on a random projection of its output,
``L = sum_i <r_i, f(x_i)>`` with ``r_i`` standard normal (seeded) per image: the squared gate gradient
is then, in expectation over ``r``, the squared first-order change of the whole output vector when the
channel is removed, ``||J_f a_c||^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.criteria import Criterion, register
from compressor.criteria._common import (
    Taps,
    batches,
    finalize,
    grads_of,
    logits_of,
    require_calib,
    targets,
    working_copy,
)
from compressor.criteria.base import ScoringContext
from compressor.groups import Scores


@register
class Taylor(Criterion):
    name = "taylor"
    description = "first-order Taylor estimate of the loss change when a channel is removed (activation x gradient)"
    paper = (
        "Molchanov, Mallya, Tyree, Frosio, Kautz: Importance Estimation for Neural Network Pruning, CVPR 2019"
    )
    needs_data = True
    needs_gradients = True

    def score(self, ctx: ScoringContext) -> Scores:
        calib = require_calib(ctx, self.name)
        model = working_copy(ctx)
        groups = ctx.prunable_groups()
        acc: dict[int, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(ctx.seed)
        with Taps(model, groups, keep_graph=True) as taps:
            for x, y in batches(ctx):
                taps.clear()
                logits = logits_of(model(x.requires_grad_(True))).flatten(1)
                if ctx.output == "features":
                    loss = (logits.float() * torch.randn(logits.shape, generator=gen).to(logits.device)).sum()
                else:
                    loss = F.cross_entropy(logits, targets(logits, y), reduction="sum")
                grads = grads_of(loss, taps.records)
                for (gid, _, a), (_, _, g) in zip(taps.views(), taps.views(grads), strict=True):
                    z = (a.detach() * g).sum(2)  # N x size: gate gradient per image
                    acc[gid] = acc.get(gid, 0) + z.double().pow(2).sum(0).cpu()
                taps.clear()
        raw = {gid: s / len(calib) for gid, s in acc.items()}
        return finalize(ctx.groups, raw)
