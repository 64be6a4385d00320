"""Bias correction: fold the mean contribution of removed input channels into the consumer's bias."""

from __future__ import annotations

import torch
from torch import nn

from compressor.recovery import register
from compressor.recovery.base import RecoveryContext, RecoveryMethod
from compressor.recovery.common import (
    LAYER_TYPES,
    batches,
    conv_bn_pairs,
    is_frozen,
    module_or_none,
    require_calib,
    set_bias,
)


def input_channel_means(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int, device: str):
    """Mean of each input channel of the layers ``names`` of ``model`` over ``calib`` (all but dim 1 averaged)."""
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    handles = []

    def hook(name):
        def fn(module, inputs):
            x = inputs[0].detach().double()
            if isinstance(module, nn.Linear):
                x = x.reshape(-1, x.shape[-1])
                s, n = x.sum(0), x.shape[0]
            else:
                s, n = x.transpose(0, 1).reshape(x.shape[1], -1).sum(1), x.numel() // x.shape[1]
            sums[name] = sums.get(name, 0) + s
            count[name] = count.get(name, 0) + n

        return fn

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for x in batches(calib, batch_size, device):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / count[n]).cpu() for n in sums}


def removed_contribution(layer: nn.Module, mean: torch.Tensor, kept_in: list[int]) -> torch.Tensor:
    """Expected output shift (per original output channel) from the input channels not in ``kept_in``.

    ``layer`` is the original layer; ``mean`` the mean of each of its input channels.
    """
    w = layer.weight.detach().double().cpu()
    mu = mean.double().clone()
    mu[torch.as_tensor(kept_in, dtype=torch.long)] = 0.0
    if isinstance(layer, nn.Linear):
        return w @ mu
    groups = layer.groups
    cout, cin_g = w.shape[0], w.shape[1]
    wsum = w.reshape(cout, cin_g, -1).sum(-1)  # spatial sum of the kernel (border effects ignored)
    mu_per_out = mu.reshape(groups, cin_g).repeat_interleave(cout // groups, dim=0)
    return (wsum * mu_per_out).sum(1)


@register
class BiasCorrection(RecoveryMethod):
    name = "bias"
    description = (
        "fold the mean contribution of removed input channels (measured on the original network) into the "
        "consumer layer's bias, or into the following BatchNorm's running mean"
    )
    needs_data = True

    def apply(self, ctx: RecoveryContext) -> None:
        calib = require_calib(ctx, self.name)
        consumers = [
            name for name, rec in ctx.kept.items()
            if "in" in rec and isinstance(module_or_none(ctx.original, name), LAYER_TYPES)
            and not is_frozen(ctx.pruned.get_submodule(name))
        ]
        if not consumers:
            return
        means = input_channel_means(ctx.original, consumers, calib, ctx.batch_size, ctx.device)
        pairs = conv_bn_pairs(ctx.pruned, calib[:2].to(ctx.device))
        for name in consumers:
            if name not in means:
                continue  # never ran on this input
            orig = ctx.original.get_submodule(name)
            delta = removed_contribution(orig, means[name], ctx.kept[name]["in"])
            out = ctx.kept[name].get("out")
            if out is not None:
                delta = delta[torch.as_tensor(out, dtype=torch.long)]
            layer = ctx.pruned.get_submodule(name)
            bn = ctx.pruned.get_submodule(pairs[name]) if name in pairs else None
            with torch.no_grad():
                if bn is not None and bn.running_mean is not None:
                    # BN((x + d) - m) == BN(x - (m - d)): the BN then sees the original's statistics
                    bn.running_mean.sub_(delta.to(bn.running_mean))
                else:
                    base = layer.bias.detach().double().cpu() if layer.bias is not None else torch.zeros_like(delta)
                    set_bias(layer, base + delta)
