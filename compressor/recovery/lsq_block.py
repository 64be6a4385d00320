"""``lsq_block``: ``lsq`` and ``block`` interleaved, one block at a time.

``lsq`` then ``block`` refits every layer by least squares on the input the least-squares-repaired
upstream produces, and only then steps each block; from the second block on, the steps' changes
upstream reach a block whose least-squares fit was made for another input. Here each block is
first refit by least squares (the same residual- and ReLU-aware solve as ``lsq``, on the same
sampled positions) on the input the fully repaired upstream produces, then stepped as ``block``
does, and only then is its output passed on. The original network runs once instead of twice,
since the least-squares pass carries the original's block outputs that the steps need.

Measured against ``lsq,block`` on the same pruned networks (reconstruction criterion, sensitivity
allocation, 64 / 256 / 1,024 calibration images, 50% and 40% FLOPs; bench/results/recovery.md): level
over 26 cells on five networks (13 up, 13 down, +0.01 points on average). ResNet-56 +0.43 on average
(+0.68 / +1.40 with 64 images), ResNet-20 -0.53 (lower in all six cells, though its KL divergence
from the original went down in three). Whole ResNet-56 runs: recovery 1-2 s shorter. So it is
opt-in and the default stays ``lsq,block``. Models fx cannot trace, and sets too small for
``block``'s held-out images, get ``lsq`` alone.
"""

from __future__ import annotations

from compressor.recovery import register
from compressor.recovery.base import RecoveryContext, RecoveryMethod
from compressor.recovery.blockwise import reconstruct_blocks
from compressor.recovery.common import require_calib
from compressor.recovery.lsq import refit_layers


@register
class InterleavedReconstruction(RecoveryMethod):
    name = "lsq_block"
    description = (
        "lsq and block interleaved: per residual or conv block, a least-squares refit of its layers on the input "
        "the repaired upstream produces, then Adam steps toward the original block's output"
    )
    needs_data = True

    def __init__(self) -> None:
        self.last_info: dict = {}

    def apply(self, ctx: RecoveryContext) -> None:
        calib = require_calib(ctx, self.name)
        ctx.pruned.eval()
        self.last_info = reconstruct_blocks(ctx.original, ctx.pruned, ctx.kept, calib, device=ctx.device,
                                            log=ctx.log, refit=True, sources=ctx.sources)
        if self.last_info["status"] == "skipped":
            if ctx.log is not None:
                ctx.log(f"lsq_block: no block steps ({self.last_info['reason']}); least squares alone")
            self.last_info["lsq"] = refit_layers(ctx.original, ctx.pruned, ctx.kept, calib, device=ctx.device)
