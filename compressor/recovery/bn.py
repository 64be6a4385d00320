"""BatchNorm re-estimation: recompute running statistics of the pruned model on calibration data."""

from __future__ import annotations

import torch

from compressor.recovery import register
from compressor.recovery.base import RecoveryContext, RecoveryMethod
from compressor.recovery.common import BN_TYPES, batches, image_cap, require_calib


def reestimate_bn(model: torch.nn.Module, calib: torch.Tensor, batch_size: int, device: str) -> int:
    """Reset and recompute every BatchNorm's running mean/var as a cumulative average over ``calib``.

    Only the BatchNorm layers run in training mode (dropout etc. stay in eval); no gradients.
    Returns the number of BatchNorm layers updated. The model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the exact mean over all batches
            m.train()
        # calibration sets are often stored class by class: shuffle so every batch is representative
        order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for x in batches(calib[order], batch_size, device):
                if len(x) < 2:  # a 1-sample batch gives a degenerate variance estimate
                    continue
                model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return len(norms)


@register
class BatchNormReestimation(RecoveryMethod):
    name = "bn"
    description = "re-estimate BatchNorm running statistics of the pruned model on the calibration images"
    needs_data = True

    def apply(self, ctx: RecoveryContext) -> None:
        calib = require_calib(ctx, self.name)
        # One batch as large as memory allows: in training mode each BN normalizes with its batch's
        # statistics, so a single batch gives exactly the statistics the eval-mode model will see.
        reestimate_bn(ctx.pruned, calib, max(ctx.batch_size, image_cap(ctx.pruned, calib, ctx.device)), ctx.device)
