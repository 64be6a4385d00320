"""``lrp``: Layer-wise Relevance Propagation relevance of each channel (Yeom et al., Pattern Recognition 2021).

"Pruning by explaining" scores a filter by the LRP relevance that reaches its output, summed
over a set of reference images, and normalizes the relevances of each layer so that one global
ranking compares layers. Our implementation follows the authors' code
(github.com/seulkiyeom/LRP_pruning: ``filterprune.py``, ``prune_resnet.py``):

* each image starts with a relevance of 1 at the explained class (their ``lrp_anchor``, the
  logit divided by itself), so every image weighs the same; the explained class is the model's
  own prediction (label-free) or the true class when ``ctx.labels`` is given (their code uses
  the labels);
* Linear layers use the epsilon rule (``eps = 1e-6``, as their ``linear_eps``; stabilizer
  ``eps * sign(z)``);
* convolutions use the alpha-beta rule with alpha=1, beta=0 (``z+``; for non-negative inputs
  it is exactly the z+ rule, for signed inputs it keeps only positive contributions
  ``(x_j w_jk)^+``);
* a BatchNorm that directly follows a convolution is folded into it (the alpha1-beta0 rule
  is applied to the folded conv, whose weights are ``w * gamma / sqrt(var + eps)``); any other
  BatchNorm is treated as a per-channel linear map (z rule, its shift absorbs relevance);
* ReLU, pooling, padding and subsampling pass relevance by the ordinary gradient, and residual
  additions split it in proportion to the addends (``R_a = a / (a + b) * R``), which is what
  gradient x input gives at an addition;
* a channel's score is the sum of the absolute relevance ``|R|`` over its positions and the
  images (their ``relevance.abs()`` summed over batch, height and width), and each layer's
  scores are divided by their sum (their per-layer normalization for ``lrp``).

It is computed with the "modified gradient" formulation of LRP: on a frozen copy of the model,
forward hooks keep every layer's output value but replace its gradient by the rule's
(``y = y0.detach() + (z - z.detach()) * (y0 / z).detach()`` with ``z`` the rule's
contributions); one backward pass of the explained logits, each divided by its own value, then
gives at any layer output ``a`` the LRP relevance ``R = a * dE/da``. A channel's relevance is
read at its producer's output (after BatchNorm). Coupled groups add the per-layer-normalized
scores of their producer outputs.

Deviations from the authors' code: they prune iteratively with fine-tuning between steps; here
relevance is computed once, like every criterion of this tool. Their BatchNorm handling passes
relevance through unchanged; we fold it instead. Before the thirteenth session this module
started from the logit's value, summed signed relevance (clamping negative totals to 0) and
normalized each layer by its L2 norm.

A model that outputs features (``ctx.output == "features"``, an embedding without classes) is explained
for its output's component along its own output vector (``_common.target_score``), in place of a class logit.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.criteria import Criterion, register
from compressor.criteria._common import (
    BN_TYPES,
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

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TINY = 1e-9


def _alpha1_beta0(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum of the positive contributions ``(x_j w_jk)^+`` of each output (differentiable in ``x``)."""
    pos = conv._conv_forward(x.clamp(min=0), weight.clamp(min=0), None)
    neg = conv._conv_forward(x.clamp(max=0), weight.clamp(max=0), None)
    return pos + neg


def _with_rule_gradient(value: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass; in the backward pass, the gradient of ``z * (value / z)``."""
    zd = z.detach()
    scale = torch.where(zd > TINY, value.detach() / zd.clamp_min(TINY), torch.zeros_like(zd))
    return value.detach() + (z - zd) * scale


class LRPRules:
    """Forward hooks that give every conv / BatchNorm / Linear of ``model`` its LRP backward rule."""

    def __init__(self, model: nn.Module, eps: float = 1e-6) -> None:
        self.model = model
        self.eps = eps
        self.folded: set[nn.Module] = set()  # convs seen feeding a BatchNorm directly (their own rule is unused)
        self._pending: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> LRPRules:
        for module in self.model.modules():
            if isinstance(module, CONV_TYPES):
                self._handles.append(module.register_forward_hook(self._conv))
            elif isinstance(module, BN_TYPES):
                self._handles.append(module.register_forward_hook(self._bn))
            elif isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(self._linear))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending.clear()

    def clear(self) -> None:
        self._pending.clear()

    def _conv(self, module, inputs, output):
        x = inputs[0]
        if module in self.folded:  # the BatchNorm after it applies the rule to the folded conv
            y = output.view_as(output)
        else:
            y = _with_rule_gradient(output, _alpha1_beta0(module, x, module.weight))
        self._pending[id(y)] = (module, x, y)  # the tensor is kept alive, so its id stays unique
        return y

    def _bn(self, module, inputs, output):
        entry = self._pending.get(id(inputs[0]))
        if entry is None or entry[2] is not inputs[0]:
            return None  # not directly after a conv: linear map, plain gradient (z rule)
        conv, x, _ = entry
        if module.training or module.running_var is None or conv.weight.shape[0] != output.shape[1]:
            return None
        self.folded.add(conv)
        gamma = module.weight if module.weight is not None else torch.ones_like(module.running_var)
        scale = gamma / torch.sqrt(module.running_var + module.eps)
        folded = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        return _with_rule_gradient(output, _alpha1_beta0(conv, x, folded))

    def _linear(self, module, inputs, output):
        zd = output.detach()
        stab = zd + self.eps * torch.where(zd >= 0, torch.ones_like(zd), -torch.ones_like(zd))
        return zd + (output - zd) * (zd / stab)


def lrp_relevance(ctx: ScoringContext, *, eps: float = 1e-6) -> dict[int, dict[str, torch.Tensor]]:
    """Per prunable group and producer output: the absolute LRP relevance per channel, summed.

    Each image's explained logit starts with a relevance of 1 (a logit of exactly 0 explains nothing).
    """
    model = working_copy(ctx)
    groups = ctx.prunable_groups()
    acc: dict[int, dict[str, torch.Tensor]] = {}
    with LRPRules(model, eps) as rules, Taps(model, groups, keep_graph=True) as taps:
        for x, y in batches(ctx):
            taps.clear()
            rules.clear()
            logits = logits_of(model(x.requires_grad_(True))).flatten(1)
            tgt = targets(logits, y, ctx.output)
            chosen = target_score(logits, tgt)[:, None]
            held = chosen.detach()
            explained = (chosen * torch.where(held.abs() > TINY, 1 / held, torch.zeros_like(held))).sum()
            grads = grads_of(explained, taps.records)
            for (gid, name, a), (_, _, g) in zip(taps.views(), taps.views(grads), strict=True):
                r = (a.detach() * g).abs().sum((0, 2)).double().cpu()
                per = acc.setdefault(gid, {})
                per[name] = per.get(name, 0) + r
            taps.clear()
            rules.clear()
    return acc


@register
class LRP(Criterion):
    name = "lrp"
    description = "LRP relevance of each channel for the predicted class (eps rule on linears, z+ on convs)"
    paper = (
        "Yeom, Seegerer, Lapuschkin, Binder, Wiedemann, Mueller, Samek: Pruning by Explaining: A Novel Criterion "
        "for Deep Neural Network Pruning, Pattern Recognition 115, 2021"
    )
    needs_data = True
    needs_gradients = True
    eps = 1e-6

    def score(self, ctx: ScoringContext) -> Scores:
        require_calib(ctx, self.name)
        raw: dict[int, torch.Tensor] = {}
        for gid, per in lrp_relevance(ctx, eps=self.eps).items():
            total = 0
            for r in per.values():
                total = total + r / r.sum().clamp_min(1e-30)
            raw[gid] = total
        return finalize(ctx.groups, raw)


