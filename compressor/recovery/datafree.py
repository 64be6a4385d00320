"""Data-free neuron merging (Kim et al., "Neuron Merging", NeurIPS 2020).

Each removed channel is compared with the kept channels of its group by the cosine similarity
of their *effective* producer filters (conv weights scaled by the following BatchNorm's
gamma / sqrt(var + eps), with the BN shift appended). When a removed channel ``r`` is well
approximated by a positive multiple ``s`` of a kept channel ``k`` (pre-activation), then after
a ReLU ``a_r ~= s * a_k``, so the consumers' weights for ``r`` are added, scaled by ``s``, to
their weights for ``k``. No data is used.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.recovery import register
from compressor.recovery.base import RecoveryContext, RecoveryMethod
from compressor.recovery.common import BN_TYPES, LAYER_TYPES, is_frozen, module_or_none

COSINE_THRESHOLD = 0.5  # measured on ResNet-56 (0.3 hurt, 0.8 merges almost nothing)


def _bn_after(model: nn.Module) -> dict[str, str]:
    """layer name -> BatchNorm registered right after it (module order; no forward pass needed)."""
    pairs, previous = {}, None
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            previous = name
        elif isinstance(module, BN_TYPES):
            if previous is not None:
                pairs[previous] = name
            previous = None
    return pairs


def _effective_vectors(ctx: RecoveryContext, group, bn_after: dict[str, str]) -> torch.Tensor | None:
    """size x F matrix: one effective (BN-normalized) producer filter per group channel."""
    members = {m.module: m for m in group.producers()}
    parts = []
    for m in group.producers():
        layer = module_or_none(ctx.original, m.module)
        if not isinstance(layer, LAYER_TYPES):
            continue
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            return None  # depthwise / grouped producer: a channel is not a free combination
        idx = torch.as_tensor(m.indices, dtype=torch.long)
        w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)[idx]
        b = layer.bias.detach().double()[idx] if layer.bias is not None else torch.zeros(len(idx), dtype=torch.float64)
        bn_name = bn_after.get(m.module)
        if bn_name in members:
            bn = ctx.original.get_submodule(bn_name)
            bidx = torch.as_tensor(members[bn_name].indices, dtype=torch.long)
            scale = (bn.weight.detach().double() if bn.weight is not None else torch.ones(bn.num_features))[bidx]
            scale = scale / torch.sqrt(bn.running_var.double()[bidx] + bn.eps)
            shift = bn.bias.detach().double()[bidx] if bn.bias is not None else torch.zeros(len(bidx))
            b = (b - bn.running_mean.double()[bidx]) * scale + shift
            w = w * scale[:, None]
        parts += [w, b[:, None]]
    if not parts:
        return None
    return torch.cat(parts, dim=1)


def merge_group(ctx: RecoveryContext, group, bn_after: dict[str, str], threshold: float = COSINE_THRESHOLD) -> int:
    """Merge the removed channels of ``group`` into kept ones; returns how many were merged."""
    keep = ctx.plan[group.id].long()
    removed_mask = torch.ones(group.size, dtype=torch.bool)
    removed_mask[keep] = False
    removed = torch.nonzero(removed_mask).flatten()
    if len(removed) == 0 or len(keep) == 0:
        return 0
    consumers = []
    for m in group.consumers():
        layer = module_or_none(ctx.original, m.module)
        if isinstance(layer, BN_TYPES):
            continue
        if not isinstance(layer, LAYER_TYPES) or (isinstance(layer, nn.Conv2d) and layer.groups != 1):
            return 0  # merging through depthwise/grouped consumers or unknown ops is not sound
        if is_frozen(ctx.pruned.get_submodule(m.module)):
            return 0  # a removed branch: its consumers stay silent
        consumers.append(m)
    vec = _effective_vectors(ctx, group, bn_after)
    if vec is None or not consumers:
        return 0
    norms = vec.norm(dim=1).clamp_min(1e-12)
    unit = vec / norms[:, None]
    cos = unit[removed] @ unit[keep].T  # |removed| x |keep|
    best_cos, best = cos.max(dim=1)
    merged = 0
    for r, c, j in zip(removed.tolist(), best_cos.tolist(), best.tolist(), strict=True):
        if c < threshold:
            continue
        k = int(keep[j])
        scale = c * float(norms[r] / norms[k])  # least-squares multiple: <v_r, v_k> / |v_k|^2
        for m in consumers:
            orig = ctx.original.get_submodule(m.module)
            layer = ctx.pruned.get_submodule(m.module)
            rec = ctx.kept.get(m.module, {})
            kept_in = rec.get("in")
            if kept_in is None:
                continue
            try:
                pos = list(kept_in).index(m.indices[k])
            except ValueError:
                continue
            w_r = orig.weight.detach()[:, m.indices[r]]
            if "out" in rec:
                w_r = w_r[torch.as_tensor(rec["out"], dtype=torch.long)]
            with torch.no_grad():
                layer.weight[:, pos] += scale * w_r.to(layer.weight)
        merged += 1
    return merged


@register
class NeuronMerging(RecoveryMethod):
    name = "datafree"
    description = (
        "data-free neuron merging: fold each removed channel into its most similar kept channel "
        "(cosine of BN-normalized producer filters), scaling the consumers' weights (Kim et al. 2020)"
    )
    needs_data = False

    def __init__(self, threshold: float = COSINE_THRESHOLD) -> None:
        self.threshold = threshold
        self.merged = 0

    def apply(self, ctx: RecoveryContext) -> None:
        bn_after = _bn_after(ctx.original)
        self.merged = 0
        for group in ctx.groups:
            if group.prunable and group.id in ctx.plan:
                self.merged += merge_group(ctx, group, bn_after, self.threshold)
