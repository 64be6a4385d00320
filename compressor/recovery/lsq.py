"""Least-squares reconstruction: refit each layer's weights so its output matches the original's.

Layer by layer in execution order, the input a layer receives in the pruned (and already
corrected) network is regressed onto the output the same layer produces in the original
network (kept output channels, mapped through the following BatchNorm so that both BNs give
the same output). The calibration images run as one batch (as many as fit in memory), so a
layer is refit before anything downstream of it runs and errors do not accumulate:

* fx path (traceable models): both graphs are executed node by node in lock-step. When a
  layer feeds (through its BN) an addition, the other operand (the shortcut) is computed
  first and its error is added to the layer's target, so residual streams are repaired too.
* hook path (otherwise): one pass through the original stores the targets at sampled
  positions, then one pass through the pruned model whose forward pre-hooks solve and replace
  each layer's weights before it runs.

The solve (:mod:`compressor.recovery.lsq_solve`) is ridge regression in Gram form,
``W = (G + lam I)^-1 (B + lam W_old)`` with
``G = X^T X`` (D x D, D = kept input channels x kernel area / groups, +1 for the bias) and
``B = X^T Y``; it shrinks toward the pruned weights. ``lam`` is picked per layer from a few
multiples of ``trace(G)/D`` on held-out positions, and the pruned weights are kept when no
solve beats them there. Grouped and depthwise convolutions are solved per group.

ReLU-aware rounds (fx path): when a layer's output reaches a ReLU (through its BN and the
residual addition), positions where the original's ReLU is off need only stay off in the pruned
network, not match a negative value. The fit alternates a few times between projecting the
prediction onto that constraint at those positions and re-solving with the same ridge (two
rounds), which minimizes the error after the ReLU. On ResNet-56 (l1, 1,024 images, 5,000 val images) the default
recipe went from 78.3% to 80.2% at 40% FLOPs and from 83.5% to 84.2% at 50%.

More data for the same fit did not help, so the refit is limited by what a linear layer can
express, not by the sample: 4x or 16x the sampled positions per layer (ResNet-56 at 50%: 84.40% ->
84.48% / 84.26%, for 1.5x / 3x the time), or the calibration images plus their mirror images
(ResNet-56 at 50% / 40%: 84.40 -> 84.38% / 81.86 -> 81.90%; vgg_cifar +0.16 / +0.16 points; 1.5x
the time), all within about 0.2 points (reconstruction criterion, sensitivity allocation, 1,024
images, 5,000 val images).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from compressor.graph.core import run_hooked
from compressor.recovery import register
from compressor.recovery.base import RecoveryContext, RecoveryMethod
from compressor.recovery.common import (
    BN_TYPES,
    LAYER_TYPES,
    bf16_pays,
    conv_bn_pairs,
    execution_order,
    image_cap,
    in_bf16,
    is_frozen,
    require_calib,
    spread,
)
from compressor.recovery.lsq_solve import bn_affine, fit_layer, sample_positions, values_at


def _layers_to_fit(pruned: nn.Module, kept, x1: torch.Tensor, scope: str) -> list[str]:
    order = execution_order(pruned, x1)
    changed = {n for n, rec in kept.items() if "in" in rec}
    first = next((i for i, n in enumerate(order) if n in changed), None)
    if first is None:
        return []
    names = order[first:] if scope == "downstream" else [n for n in order if n in changed]
    layers = [(n, pruned.get_submodule(n)) for n in names]
    return [n for n, m in layers if isinstance(m, LAYER_TYPES) and not is_frozen(m)]


def refit_layers(
    original: nn.Module,
    pruned: nn.Module,
    kept: dict[str, dict[str, list[int]]],
    calib: torch.Tensor,
    *,
    device: str = "cpu",
    scope: str = "downstream",
    residual: bool = True,
    fit_bias: bool = True,
    samples_per_dim: int = 64,
    min_samples: int = 4096,
    max_samples: int = 65536,
    seed: int = 0,
) -> dict[str, dict]:
    """Refit conv/linear layers of ``pruned`` (in place) so their outputs match ``original``'s.

    Args:
        scope: "downstream" refits every layer from the first one whose inputs were pruned on
            (it also absorbs upstream errors); "consumers" only layers whose inputs were pruned.
        residual: When the layer (through its BatchNorm) feeds an addition, also absorb the error
            of the addition's other operand (the shortcut) into its target, so residual streams
            do not carry errors forward. Needs an fx-traceable model; otherwise plain targets.
        fit_bias: Also fit a bias (created if absent; exported as the conv's bias).
        samples_per_dim, min_samples, max_samples: Sampled output positions per layer.
    Returns per-layer diagnostics.
    """
    calib = spread(calib, image_cap(original, calib, device))
    x1 = calib[:1].to(device)
    names = _layers_to_fit(pruned, kept, x1, scope)
    if not names:
        return {}
    opts = dict(fit_bias=fit_bias, per_dim=samples_per_dim, lo=min_samples, hi=max_samples, seed=seed)
    traced = _trace_pair(original, pruned) if residual else None
    calib = calib.to(device)
    if calib.dim() == 4:  # channels-last activations: the full-batch convolutions run about 25% faster on a CPU
        calib = calib.contiguous(memory_format=torch.channels_last)
    if traced is not None:
        return _refit_fx(original, pruned, kept, calib, set(names), traced, **opts)
    return _refit_hooks(original, pruned, kept, calib, names, **opts)


def _refit_hooks(original, pruned, kept, calib, names, *, fit_bias, per_dim, lo, hi, seed) -> dict[str, dict]:
    """Two full-batch passes with hooks: targets from the original, solves before each pruned layer runs."""
    gen = torch.Generator().manual_seed(seed)
    pairs = conv_bn_pairs(pruned, calib[:1])
    state: dict[str, dict] = {n: {} for n in names}

    def target_hook(name):
        def hook(module, _inputs, out):
            st = state[name]
            if "target" in st:
                return
            st["n"], st["hw"], st["out_w"] = sample_positions(out, module, gen, per_dim, lo, hi)
            y = values_at(out, module, st["n"], st["hw"])
            out_idx = kept.get(name, {}).get("out")
            st["target"] = y[:, torch.as_tensor(out_idx, dtype=torch.long, device=y.device)] if out_idx else y

        return hook

    def solve_hook(name):
        def hook(module, inputs):
            st = state[name]
            if st.get("done") or "target" not in st:
                return
            st["done"] = True
            target = st.pop("target")
            if name in pairs:
                bn = pairs[name]
                a_o, c_o = bn_affine(original.get_submodule(bn), kept.get(bn, {}).get("out"))
                a_p, c_p = bn_affine(pruned.get_submodule(bn), None)
                target = _into_bn_input(target, a_o, c_o, a_p, c_p, None)
            st["info"] = fit_layer(module, inputs[0].detach(), st["n"], st["hw"], st["out_w"], target, fit_bias)

        return hook

    for model, make, kind in ((original, target_hook, "forward"), (pruned, solve_hook, "pre")):
        handles = []
        for n in names:
            mod = model.get_submodule(n)
            reg = mod.register_forward_hook if kind == "forward" else mod.register_forward_pre_hook
            handles.append(reg(make(n)))
        run_hooked(model, calib, handles)
    return {n: st.get("info", {"status": "skipped"}) for n, st in state.items()}


def _into_bn_input(y, a_o, c_o, a_p, c_p, comp):
    """Pre-BN target for the pruned layer: BN_p(t) == BN_o(y) + comp, i.e. t = (a_o y + c_o + comp - c_p) / a_p."""
    if a_p.shape != a_o.shape or bool((a_p.abs() < 1e-8).any()):
        return y if comp is None else y + comp  # degenerate BN: best effort
    out = y.double().cpu() * a_o + c_o - c_p
    if comp is not None:
        out = out + comp.double().cpu()
    return (out / a_p).to(y.dtype)


# ------------------------------------------------------------------------ fx lockstep execution

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def _trace_pair(original: nn.Module, pruned: nn.Module):
    """fx graphs of both models with identical structure, or None when tracing is not possible."""
    try:
        g_o = fx.symbolic_trace(original)
        g_p = fx.symbolic_trace(pruned)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the hook path
        return None
    nodes_o, nodes_p = list(g_o.graph.nodes), list(g_p.graph.nodes)
    if len(nodes_o) != len(nodes_p) or any(
        a.op != b.op or (a.op in ("call_module", "call_method") and a.target != b.target)
        for a, b in zip(nodes_o, nodes_p, strict=True)
    ):
        return None
    if sum(n.op == "placeholder" for n in nodes_o) != 1:
        return None
    return g_o, g_p


def _exec_order(graph: fx.Graph) -> list[fx.Node]:
    """A topological order that, at each addition, computes the cheaper operand (the shortcut) first."""
    output = next(n for n in graph.nodes if n.op == "output")
    done: set[fx.Node] = set()
    order: list[fx.Node] = []

    def pending(node: fx.Node) -> int:
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen or n in done:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return len(seen)

    stack: list[tuple[fx.Node, bool]] = [(output, False)]
    while stack:
        node, expanded = stack.pop()
        if node in done:
            continue
        if expanded:
            done.add(node)
            order.append(node)
            continue
        stack.append((node, True))
        inputs = [a for a in node.all_input_nodes if a not in done]
        if _is_add(node) and len(inputs) > 1:
            inputs.sort(key=pending)
        stack.extend((a, False) for a in reversed(inputs))
    return order


def run_node(gm: fx.GraphModule, node: fx.Node, env: dict, x: torch.Tensor, bf16: bool = False):
    """The value of ``node`` given the values ``env`` of its inputs (``x``: the placeholder's).

    ``bf16``: a convolution for which ``bf16_pays`` runs in bfloat16 on float32 inputs (float32 out).
    """
    if node.op == "placeholder":
        return x
    if node.op == "output":
        return None
    args = fx.node.map_arg(node.args, lambda a: env[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
    if node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    if node.op == "call_function":
        if node.target is F.layer_norm:
            args, kwargs = _layer_norm_shape_of_weight(args, kwargs)
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    module = gm.get_submodule(node.target)
    if bf16 and bf16_pays(module) and args and getattr(args[0], "dtype", None) == torch.float32:
        return in_bf16(module, *args, **kwargs)
    return module(*args, **kwargs)


def _layer_norm_shape_of_weight(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``F.layer_norm`` arguments with ``normalized_shape`` taken from the weight's shape.

    A trace bakes ``normalized_shape`` in as a constant (ConvNeXt's ``LayerNorm2d`` passes
    ``self.normalized_shape``), so a trace of the original run on a pruned model would still
    normalize over the original channel count.
    """
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    if not isinstance(weight, torch.Tensor):
        return args, kwargs
    if len(args) > 1:
        return (args[0], tuple(weight.shape), *args[2:]), kwargs
    return args, {**kwargs, "normalized_shape": tuple(weight.shape)}


def _residual_partner(node: fx.Node, gm: fx.GraphModule):
    """(bn_node or None, other operand) when ``node`` feeds (through one BN) a two-operand addition."""
    chain, bn = node, None
    users = list(chain.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(gm.get_submodule(users[0].target), BN_TYPES):
        bn = chain = users[0]
        users = list(chain.users)
    if len(users) != 1 or not _is_add(users[0]):
        return bn, None
    operands = [a for a in users[0].args if isinstance(a, fx.Node)]
    if len(operands) != 2 or users[0].kwargs or chain not in operands or operands[0] is operands[1]:
        return bn, None
    return bn, operands[1] if operands[0] is chain else operands[0]


RELU_AWARE = True
_RELU_FUNCS = {F.relu, torch.relu}


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _feeds_relu(node: fx.Node, bn: fx.Node | None, partner: fx.Node | None, gm: fx.GraphModule) -> bool:
    """Whether the layer's output reaches a ReLU (through its BN and the residual addition) and nothing else."""
    chain = bn if bn is not None else node
    if partner is not None:
        chain = next(iter(chain.users))
    users = list(chain.users)
    return len(users) == 1 and _is_relu(users[0], gm) and (chain is node or len(node.users) == 1)


def _relu_threshold(target, a_p, c_p, shortcut):
    """(theta, sign, free) for a target ``t`` whose ReLU input is ``a_p * t + c_p + shortcut``.

    The ReLU is off where ``sign * (t - theta) <= 0``; ``free`` marks where the original's is off.
    """
    t = target.double().cpu()
    a = torch.ones(t.shape[1], dtype=torch.float64) if a_p is None else a_p.double()
    c = torch.zeros(t.shape[1], dtype=torch.float64) if c_p is None else c_p.double()
    if bool((a.abs() < 1e-8).any()) or a.shape[0] != t.shape[1]:
        return None
    offset = c + (shortcut.double().cpu() if shortcut is not None else 0.0)
    theta = (-offset / a).expand_as(t)
    sign = torch.sign(a)
    return theta, sign, sign * (t - theta) <= 0


def _refit_fx(original, pruned, kept, calib, names, traced, *, fit_bias, per_dim, lo, hi, seed) -> dict[str, dict]:
    """Run both graphs node by node on the full batch; refit each layer with residual-aware targets."""
    gm_o, gm_p = traced
    order = _exec_order(gm_p.graph)
    start = next(n for n in order if n.op == "placeholder")
    gen = torch.Generator().manual_seed(seed)
    infos, _ = refit_segment(traced, start, [n for n in order if n is not start], calib, calib, kept, names, gen,
                             fit_bias=fit_bias, per_dim=per_dim, lo=lo, hi=hi)
    return infos


def refit_segment(traced, start: fx.Node, body: list[fx.Node], x_o: torch.Tensor, x_p: torch.Tensor, kept: dict,
                  names: set[str], gen: torch.Generator, *, fit_bias: bool = True, per_dim: int = 64,
                  lo: int = 4096, hi: int = 65536) -> tuple[dict[str, dict], object]:
    """Lock-step refit of the layers in ``names`` among ``body`` (pruned graph's nodes, in execution order).

    ``start`` is the node whose value is ``x_p`` in the pruned graph and ``x_o`` in the original (the
    placeholder for a whole network; a block's input node for a block). Every value the body needs
    must come from ``start`` or from the body itself. Returns (per-layer diagnostics, the original
    graph's value of the body's last node).
    """
    gm_o, gm_p = traced
    to_orig = dict(zip(gm_p.graph.nodes, gm_o.graph.nodes, strict=True))
    remaining = {n: len(n.users) for n in [start, *body]}
    env_o: dict = {to_orig[start]: x_o}
    env_p: dict = {start: x_p}
    infos: dict[str, dict] = {}
    with torch.no_grad():
        for node in body:
            node_o = to_orig[node]
            for arg in node.all_input_nodes:
                if arg not in env_p and arg.op == "get_attr":  # a constant defined before the segment
                    env_p[arg] = run_node(gm_p, arg, env_p, x_p)
                    env_o[to_orig[arg]] = run_node(gm_o, to_orig[arg], env_o, x_o)
            env_o[node_o] = run_node(gm_o, node_o, env_o, x_o)
            if node.op == "call_module" and node.target in names and node.target not in infos:
                infos[node.target] = _refit_node(gm_o, gm_p, to_orig, node, env_o, env_p, kept, gen,
                                                 fit_bias, per_dim, lo, hi)
            env_p[node] = run_node(gm_p, node, env_p, x_p)
            for a in node.all_input_nodes:
                if a not in remaining:
                    continue
                remaining[a] -= 1
                if remaining[a] == 0:
                    env_p.pop(a, None)
                    env_o.pop(to_orig[a], None)
    return infos, env_o.get(to_orig[body[-1]])


def _refit_node(gm_o, gm_p, to_orig, node, env_o, env_p, kept, gen, fit_bias, per_dim, lo, hi) -> dict:
    """Refit the layer at ``node`` of the pruned graph (in place) from the lock-step values so far."""
    name = node.target
    module = gm_p.get_submodule(name)
    y = env_o[to_orig[node]]
    n, hw, out_w = sample_positions(y, module, gen, per_dim, lo, hi)
    target = values_at(y, module, n, hw)
    out_idx = kept.get(name, {}).get("out")
    if out_idx:
        target = target[:, torch.as_tensor(out_idx, dtype=torch.long, device=target.device)]
    bn, partner = _residual_partner(node, gm_p)
    comp = None
    if partner is not None and partner in env_p and to_orig[partner] in env_o:
        b_o, b_p = env_o[to_orig[partner]], env_p[partner]
        if b_o.dim() == b_p.dim() >= 2 and b_o.shape[2:] == b_p.shape[2:]:
            s_o, s_p = values_at(b_o, module, n, hw), values_at(b_p, module, n, hw)  # S x C: sampled only
            ch = kept.get(bn.target if bn is not None else name, {}).get("out")
            if ch is not None:
                s_o = s_o[:, torch.as_tensor(ch, dtype=torch.long, device=s_o.device)]
            if s_o.shape == s_p.shape and s_o.shape[1] == target.shape[1]:
                comp = s_o - s_p
    if bn is not None:
        bn_name = bn.target
        a_o, c_o = bn_affine(gm_o.get_submodule(bn_name), kept.get(bn_name, {}).get("out"))
        a_p, c_p = bn_affine(gm_p.get_submodule(bn_name), None)
        target = _into_bn_input(target, a_o, c_o, a_p, c_p, comp)
    elif comp is not None:
        target = target + comp
    relu = None
    if RELU_AWARE and _feeds_relu(node, bn, partner, gm_p) and (partner is None or comp is not None):
        shortcut = s_p if partner is not None else None
        relu = _relu_threshold(target, a_p if bn is not None else None, c_p if bn is not None else None, shortcut)
    x = fx.node.map_arg(node.args, lambda a: env_p[a])[0]
    info = fit_layer(module, x, n, hw, out_w, target, fit_bias, relu=relu)
    info["residual"] = comp is not None
    info["relu_aware"] = relu is not None
    return info


@register
class LeastSquaresReconstruction(RecoveryMethod):
    name = "lsq"
    description = (
        "refit each layer after the first pruned one by ridge regression so its output on the calibration "
        "images matches the original's, feeding it the already corrected upstream"
    )
    needs_data = True

    def __init__(self, scope: str = "downstream", residual: bool = True) -> None:
        self.scope = scope
        self.residual = residual
        self.last_info: dict[str, dict] = {}

    def apply(self, ctx: RecoveryContext) -> None:
        calib = require_calib(ctx, self.name)
        ctx.pruned.eval()
        self.last_info = refit_layers(
            ctx.original, ctx.pruned, ctx.kept, calib, device=ctx.device, scope=self.scope, residual=self.residual
        )
