"""Residual branches left with one channel: removed whole, their mean contribution kept as a constant.

The width search may take a residual branch down to a single channel (the inner channels of a
ResNet basic block, the expansion of an inverted residual): ResNet-56 at 50% FLOPs keeps one inner
channel in four of its 27 blocks. Such a branch costs almost no FLOPs, but it still runs two or
three layers, and at batch 1 (and on launch-bound devices such as a Jetson) a layer costs its
launch whatever its width. Removing it makes the network shallower:

1. :func:`find_removable` (after the physical pruning): a group qualifies when it keeps one channel,
   every layer consuming it takes that channel as its whole input, and, with those layers giving
   constants, the constants reach nothing but element-wise operations (BatchNorm in eval mode,
   activations), layers that keep a uniform map uniform (1x1 convolutions without padding, as at the
   end of a bottleneck) and then additions whose other operand is not constant (the residual merge).
2. :func:`silence`: the consuming layers' weights become zero, so each outputs its bias, set to the
   original layer's mean output (the following BatchNorm's running mean, else the mean over the
   calibration images). The branch then adds its mean contribution to the residual stream. The
   layers of the branch are marked frozen, so the recovery (``lsq``, ``block``, ...) leaves them
   as they are and repairs the rest of the network for their absence.
3. :func:`fold` (after the recovery): each constant computation is evaluated once and replaced by a
   buffer added at its merge point; the branch's layers leave the graph, and the exported ONNX.

The fx graph is used throughout: a model fx cannot trace keeps its branches.

The width allocation does not know about the removal. Measuring one channel of a removable group as its
removal in the allocation's probes (the consumers giving their mean, without the probe's refit) removed
fewer branches and lost more accuracy (twenty-first session, 1,024 images, 5,000 val images): ResNet-56
85.82 / 85.76 / 85.40% at 50% FLOPs and 84.24 / 83.68 / 83.72% at 40% (seeds 0 / 1 / 2), against 85.92 /
85.58 / 85.72% and 84.26 / 84.44 / 83.26% for the removal after the usual allocation; ResNet-20 74.98 /
72.24% against 77.40 / 72.24%.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from compressor.channel_ops import ChannelScatter
from compressor.graph.core import device_of
from compressor.groups import ChannelGroup, Plan

FROZEN_ATTR = "_compressor_frozen"  # set on layers the recovery must leave as they are
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, torch.sigmoid, torch.tanh, F.dropout,
}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
ADDITIONS = {operator.add, operator.iadd, torch.add}


@dataclass
class Branch:
    """A group whose channel is removed and the layers that go with it.

    Attributes:
        group: The group's id in the channel graph.
        root: The group's root module (its name in the report).
        consumers: Layers whose whole input is the group's channel: zeroed, output their bias.
        producers: Layers computing the channel: left frozen, removed by the fold.
    """

    group: int
    root: str
    consumers: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)


class _Tracer(fx.Tracer):
    """fx tracer that keeps ChannelScatter whole (as the exported model has it)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelScatter) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``model`` as an fx GraphModule with the same module names, or None when fx cannot trace it."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - fx raises many types on untraceable code
        return None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def is_frozen(module: nn.Module) -> bool:
    """Whether the recovery must leave ``module``'s weights as they are (a removed branch's layer)."""
    return bool(getattr(module, FROZEN_ATTR, False))


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """One-tensor element-wise (or per-channel affine) op: a constant input gives a constant output."""
    if node.op == "call_module":
        m = _module(gm, node)
        return isinstance(m, ELEMENTWISE_MODULES) or (isinstance(m, NORMS) and not m.training)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS and len(node.all_input_nodes) == 1
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS and len(node.all_input_nodes) == 1
    return False


def _uniform_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A convolution that maps a spatially uniform input to a uniform output: its kernel is 1 and it pads
    nothing (a bottleneck's last 1x1 convolution)."""
    m = _module(gm, node)
    if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return False
    # with a 1-wide kernel "same" pads nothing either
    return all(k == 1 for k in m.kernel_size) and (isinstance(m.padding, str) or all(p == 0 for p in m.padding))


def _is_addition(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADDITIONS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _propagate(gm: fx.GraphModule, sources: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """(constant nodes in graph order, merge additions) when the constants of ``sources`` only pass
    element-wise ops into additions with a non-constant operand; None otherwise."""
    constant: list[fx.Node] = []
    merges: list[fx.Node] = []
    marked = set()
    for node in gm.graph.nodes:
        if node in sources:
            constant.append(node)
            marked.add(node)
            continue
        inputs = node.all_input_nodes
        hit = [a for a in inputs if a in marked]
        if not hit:
            continue
        if len(hit) == len(inputs) and (_elementwise(gm, node) or _uniform_layer(gm, node)):
            constant.append(node)
            marked.add(node)
        elif _is_addition(node) and len(hit) == 1 and len(inputs) == 2:
            merges.append(node)
        else:
            return None  # a constant reaches a layer, a reduction, a concatenation or the output
    return constant, merges


def find_removable(model: nn.Module, groups: list[ChannelGroup], plan: Plan) -> list[Branch]:
    """The groups of the physically pruned ``model`` that keep one channel and can be removed."""
    gm = trace(model)
    if gm is None:
        return []
    nodes_of: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            nodes_of.setdefault(node.target, []).append(node)
    found = []
    for group in groups:
        if not group.prunable or group.size < 2 or group.id not in plan or len(plan[group.id]) != 1:
            continue
        consumers = [m.module for m in group.consumers()]
        layers = [gm.get_submodule(n) if n in nodes_of else None for n in consumers]
        if not consumers or not all(_whole_input_layer(m) for m in layers):
            continue
        if not all(len(nodes_of[n]) == 1 for n in consumers):
            continue  # a layer called twice
        if _propagate(gm, {nodes_of[n][0] for n in consumers}) is None:
            continue
        producers = [m.module for m in group.producers() if m.module in nodes_of and m.module not in consumers]
        found.append(Branch(group.id, group.root, consumers, producers))
    return found


def _whole_input_layer(m: nn.Module | None) -> bool:
    """A conv/linear layer with one input channel and no grouping: its input is the group's channel."""
    if isinstance(m, nn.Linear):
        return m.in_features == 1
    return isinstance(m, LAYERS) and m.in_channels == 1 and m.groups == 1


@torch.no_grad()
def branch_means(original: nn.Module, branches: list[Branch], calib: torch.Tensor | None = None) -> dict:
    """Per-channel mean output of each branch's consuming layers in ``original``: the running mean of the
    BatchNorm right after the layer, else the mean over (some of) ``calib``; absent without either."""
    gm = trace(original)
    follower = {}
    if gm is not None:
        for node in gm.graph.nodes:
            users = list(node.users)
            if node.op == "call_module" and len(users) == 1 and isinstance(_module(gm, users[0]), NORMS):
                follower[node.target] = users[0].target
    names = [n for b in branches for n in b.consumers]
    means = {}
    for name in names:
        norm = original.get_submodule(follower[name]) if name in follower else None
        if norm is not None and norm.running_mean is not None:
            means[name] = norm.running_mean.detach().clone()
    missing = [n for n in names if n not in means]
    if missing and calib is not None:
        means.update(_mean_outputs(original, missing, calib))
    return means


@torch.no_grad()
def silence(model: nn.Module, branches: list[Branch], kept: dict, means: dict) -> None:
    """Zero the branches' consuming layers of ``model`` (in place) so each outputs its mean (``means``, from
    :func:`branch_means`; zero where absent), and freeze every layer of the branches (module docstring)."""
    for branch in branches:
        for name in branch.consumers:
            layer = model.get_submodule(name)
            layer.weight.zero_()
            mean = means.get(name)
            if mean is not None:
                out = kept.get(name, {}).get("out")
                if out is not None:
                    mean = mean[torch.as_tensor(out, dtype=torch.long, device=mean.device)]
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros_like(mean, dtype=layer.weight.dtype))
                layer.bias.copy_(mean.to(layer.bias))
        for name in branch.consumers + branch.producers:
            layer = model.get_submodule(name)
            setattr(layer, FROZEN_ATTR, True)
            for p in layer.parameters():
                p.requires_grad_(False)


def _mean_outputs(model: nn.Module, names: list[str], calib: torch.Tensor, images: int = 256) -> dict:
    """Per-channel mean output of the layers ``names`` of ``model`` over (at most ``images``) calibration images."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(_m, _i, out, name=name):
            sums[name] = sums.get(name, 0) + out.double().sum(dim=[d for d in range(out.dim()) if d != 1])
            counts[name] = counts.get(name, 0) + out.numel() // out.shape[1]
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    x = calib[:images].to(device_of(model))
    try:
        for i in range(0, len(x), 64):
            model(x[i : i + 64])
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


@torch.no_grad()
def fold(model: nn.Module, branches: list[Branch]) -> tuple[nn.Module, int]:
    """``model`` with the silenced branches' constant computations replaced by buffers, and how many
    merge points received a constant. Returns ``model`` itself (and 0) when nothing folds."""
    if not branches:
        return model, 0
    gm = trace(model)
    if gm is None:
        return model, 0
    names = {n for b in branches for n in b.consumers}
    sources = {n for n in gm.graph.nodes if n.op == "call_module" and n.target in names}
    found = _propagate(gm, sources)
    if found is None:
        return model, 0
    constant, merges = found
    values = {}
    for node in constant:
        if node in sources:
            layer = _module(gm, node)
            channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            bias = layer.bias if layer.bias is not None else torch.zeros(channels, device=layer.weight.device)
            values[node] = bias.detach().clone().reshape(1, channels, *([1] * _spatial_dims(layer)))
        elif node.op == "call_module":  # inputs cloned: an in-place activation must not change another value
            values[node] = _module(gm, node)(values[node.all_input_nodes[0]].clone())
        else:
            args = fx.node.map_arg(node.args, lambda a: values[a].clone())
            kwargs = fx.node.map_arg(node.kwargs, lambda a: values[a].clone())
            fn = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
            values[node] = fn(*args, **kwargs)
    for k, merge in enumerate(merges):
        const, other = (merge.args[0], merge.args[1]) if merge.args[0] in values else (merge.args[1], merge.args[0])
        value = values[const]
        if not bool(value.any()):
            merge.replace_all_uses_with(other)
            continue
        buffer = f"removed_branch_{k}"
        gm.register_buffer(buffer, value.clone())
        with gm.graph.inserting_before(merge):
            attr = gm.graph.get_attr(buffer)
            new = gm.graph.call_function(operator.add, (other, attr))
        merge.replace_all_uses_with(new)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    from compressor.graph.rewrite import _plain_module

    return _plain_module(gm, type(model).__name__).train(model.training), len(merges)


@torch.no_grad()
def fold_checked(model: nn.Module, branches: list[Branch], inputs: torch.Tensor,
                 tolerance: float) -> tuple[nn.Module, bool]:
    """:func:`fold`, kept only when the folded model's outputs on ``inputs`` stay within ``tolerance`` (relative
    to the outputs' magnitude) of ``model``'s: (folded model, True), else (``model``, False)."""
    folded, _ = fold(model, branches)
    if folded is model:
        return model, False
    x = inputs.to(device_of(model))
    ref, out = model.eval()(x), folded.eval()(x)
    if float((ref - out).abs().max()) > tolerance * max(1.0, float(ref.abs().max())):
        return model, False
    return folded, True


def _spatial_dims(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return 0
    return {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(layer)]


__all__ = ["Branch", "FROZEN_ATTR", "branch_means", "find_removable", "fold", "fold_checked", "is_frozen",
           "silence", "trace"]
