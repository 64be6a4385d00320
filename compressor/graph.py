"""Channel dependency graph, physical pruning, masking and the soundness check.

How the groups are found
------------------------
1. ``_rewrite_channel_pads``: the model is fx-traced; every ``F.pad`` that zero-pads the
   channel dimension becomes an owned :class:`~compressor.channel_ops.ChannelScatter`
   module (an index map). The rewritten model (the fx code in a plain ``nn.Module``, so that
   the TorchScript ONNX exporter accepts it) keeps the user's module names. When there is
   nothing to rewrite (or tracing fails) the user's model is used as it is.
2. torch-pruning's ``DependencyGraph`` is built on that model (ChannelScatter registered as
   a customized layer whose input and output channels are *independent*). Two repairs
   between tracing and linking: ops recorded *inside* a Linear/LayerNorm (view-addmm-view
   of a Linear on 4-D input, LayerNorm2d's permutes) are collapsed into the module, and every
   op that fails the trust check below is replaced by a barrier that couples nothing.
   Every group rooted at a convolution or linear layer becomes a :class:`ChannelGroup`.
3. Trust checks: ops torch-pruning handles as element-wise must be in an allow-list of
   channel-wise ops (``CHANNELWISE_OPS``; permutes only NCHW<->NHWC, reductions/as_strided
   only over spatial dims, constant pads only spatial); concatenations, splits and slices
   must act on the channel dimension with inferred offsets; reshapes are accepted only as the
   flatten in front of a Linear (channel shuffles are not); broadcasts across channels,
   partial (split) mappings, transposed convolutions, GroupNorm and multi-dimensional
   LayerNorm are refused; the model's output channels are never pruned. A group touching
   anything refused is left whole, with a reason naming the op. ``build_graph(verify=True)``
   additionally prunes a random plan and checks it against the masked model (probing each
   group alone when the whole plan fails).
4. Grouped (non-depthwise) convolutions: the groups on either side get ``multiple =
   lcm(round_to, conv groups)`` and ``min_channels >= conv groups``; the kept count must be
   the same in every convolution group (``conv_groups`` gives each channel's convolution
   group; ``normalize_plan`` rebalances plans that ignore it, and ``apply_plan``,
   ``mask_model`` and ``soundness_diff`` all apply the normalized plan). torch-pruning slices
   grouped weights as if dense, so ``apply_plan`` rebuilds them from the original weights.

Member index maps
-----------------
Each group keeps, privately, a *link* per touched module dimension: for each group channel
the tuple of indices it maps to (a flatten in front of a Linear maps one channel to H*W
inputs). ``group.members`` lists the one-to-one links of real modules and parameters (what
the criteria and recovery read); the full links drive ``apply_plan``'s record, the masking
and the MAC estimate.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compressor.channel_ops import ChannelScatter, ChannelScatterPruner, MaskedLayerNorm
from compressor.groups import ChannelGroup, GroupMember, Plan

# grad_fn names (lower case, without the trailing "backward<N>") that act channel by channel
# and that torch-pruning may therefore treat as element-wise.
CHANNELWISE_OPS = frozenset({
    "add", "sub", "mul", "div", "neg", "relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "sigmoid",
    "silu", "gelu", "tanh", "leakyrelu", "elu", "prelu", "mish", "softplus", "clamp", "clampmin",
    "maxpool2dwithindices", "maxpool2d", "avgpool2d", "adaptiveavgpool2d", "adaptivemaxpool2d",
    "maxpool1dwithindices", "avgpool1d", "adaptiveavgpool1d",
    "dropout", "nativedropout", "clone", "tocopy", "alias", "upsamplenearest2d", "upsamplebilinear2d",
    "mulscalar", "addscalar", "divscalar", "subscalar", "pow", "sqrt", "exp", "abs",
})


def _op_name(grad_fn) -> str:
    if grad_fn is None or not hasattr(grad_fn, "name"):
        return "unknown"
    name = grad_fn.name()
    base = name.lower()
    if "backward" in base:
        base = base[: base.index("backward")]
    return base


@dataclass
class _Link:
    """One module dimension touched by a group: ``indices[c]`` = its indices for channel c."""

    module: str
    kind: str  # "out" | "in"
    indices: list[tuple[int, ...]]
    is_param: bool = False


@dataclass
class _Layer:
    """Cost-table row of one conv/linear layer: MACs = positions * kernel * out * in_per_group."""

    name: str
    positions_kernel: int
    out_size: int
    in_size: int
    groups: int
    depthwise: bool
    out_terms: list[tuple[int, int]] = field(default_factory=list)  # (group id, indices per channel)
    in_terms: list[tuple[int, int]] = field(default_factory=list)
    out_fixed: int = 0
    in_fixed: int = 0


@dataclass
class ChannelGraph:
    """The coupled channel groups of a model.

    Attributes:
        model: The model the groups refer to. It may be a rewritten copy of the user's model
            (e.g. an fx GraphModule in which channel-dim padding became an index-mapped
            module); every later stage uses this model as "the original". Eval mode.
        example_input: One input batch (1 x C x H x W) used for tracing.
        groups: All channel groups, prunable or not, ``groups[i].id == i``.
    """

    model: nn.Module
    example_input: torch.Tensor
    groups: list[ChannelGroup] = field(default_factory=list)
    _links: dict[int, list[_Link]] = field(default_factory=dict, repr=False)
    _layers: list[_Layer] = field(default_factory=list, repr=False)
    _dims: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)
    _norms: dict[str, bool] = field(default_factory=dict, repr=False)  # LayerNorm name -> channels_first
    _balance: dict[int, list[int]] = field(default_factory=dict, repr=False)  # group id -> conv-group per channel
    _check_ops: bool = field(default=True, repr=False)
    _layers_of_group: dict[int, list[_Layer]] = field(default_factory=dict, repr=False)  # filled on first use

    @property
    def excluded(self) -> list[ChannelGroup]:
        """Groups left whole, with their reasons (for the report and the terminal)."""
        return [g for g in self.groups if not g.prunable]


@dataclass
class PrunedModel:
    """A physically pruned copy and the replayable record of what was kept.

    Attributes:
        model: Deep copy of ``graph.model`` with channels removed; module names unchanged.
        kept: module name -> {"in": kept input indices, "out": kept output indices} in the
            original module's index space; only dimensions that changed are listed.
        plan: The plan actually applied (``normalize_plan`` of the requested one: differs only
            for groups tied to grouped convolutions whose request was unbalanced).
    """

    model: nn.Module
    kept: dict[str, dict[str, list[int]]]
    plan: Plan | None = None


# --------------------------------------------------------------------------- preparation


def _pad_channel_amounts(pad: Sequence[int], ndim: int) -> tuple[int, int, list[int]] | None:
    """(before, after, spatial pad) when ``pad`` pads dim 1 of an ``ndim`` tensor, else None."""
    pad = [int(p) for p in pad]
    if len(pad) % 2 or ndim < 2:
        return None
    n_dims = len(pad) // 2
    channel_pos = ndim - 2  # pad pairs run from the last dim backwards; dim 1 is pair ndim-2
    if channel_pos >= n_dims:
        return None
    before, after = pad[2 * channel_pos], pad[2 * channel_pos + 1]
    if before == 0 and after == 0:
        return None
    if any(p != 0 for p in pad[2 * (channel_pos + 1):]):  # the batch dim is padded too
        return None
    spatial = pad[: 2 * channel_pos]
    return before, after, spatial


def _rewrite_channel_pads(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """fx GraphModule with channel-dim zero pads replaced by ChannelScatter, or ``model``."""
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception:
        return model
    changed = False
    used = {name for name, _ in gm.named_modules()}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.pad, torch._C._nn.pad):
            continue
        args = list(node.args) + [None] * 4
        src = args[0]
        pad = args[1] if args[1] is not None else node.kwargs.get("pad")
        mode = args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if mode not in (None, "constant") or value not in (None, 0, 0.0) or not isinstance(pad, (tuple, list)):
            continue
        if not all(isinstance(p, int) for p in pad):
            continue
        meta = getattr(src, "meta", {}).get("tensor_meta")
        if meta is None:
            continue
        amounts = _pad_channel_amounts(pad, len(meta.shape))
        if amounts is None:
            continue
        before, after, spatial = amounts
        if before < 0 or after < 0:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        owner = ""
        if stack:
            last = list(stack.values())[-1]
            owner = last[0] if isinstance(last, tuple) else str(last)
        base = f"{owner}.channel_pad" if owner else "channel_pad"
        name, k = base, 1
        while name in used:
            name = f"{base}_{k}"
            k += 1
        used.add(name)
        gm.add_submodule(name, ChannelScatter.from_pad(int(meta.shape[1]), before, after))
        with gm.graph.inserting_before(node):
            inp = src
            if any(p != 0 for p in spatial):
                inp = gm.graph.call_function(F.pad, (src, tuple(spatial)))
            new = gm.graph.call_module(name, (inp,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if not changed:
        return model
    gm.graph.lint()
    gm.recompile()
    plain = _plain_module(gm, type(model).__name__)
    plain.eval()
    with torch.no_grad():
        ref, out = model(example_input), plain(example_input)
    if not (isinstance(ref, torch.Tensor) and torch.allclose(ref, out, atol=1e-5, rtol=1e-4)):
        return model
    return plain


class _Rewritten(nn.Module):
    """Base of the rewritten models: pickles through an fx GraphModule (its class is made at
    run time), deep-copies like any module."""

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce__(self):
        import torch.fx as fx

        gm = fx.GraphModule(self, copy.deepcopy(self._fx_graph), class_name=type(self).__name__)
        return _restore_rewritten, (gm, type(self).__name__, self.training)


def _restore_rewritten(gm: nn.Module, class_name: str, training: bool) -> nn.Module:
    return _plain_module(gm, class_name).train(training)


def _plain_module(gm: nn.Module, class_name: str) -> nn.Module:
    """The GraphModule's code and children in a plain ``nn.Module`` (same module names).

    A GraphModule has a ``.graph`` attribute, which the TorchScript ONNX exporter mistakes for
    a ScriptModule's graph (``dynamic_axes`` then fails); the plain module exports normally.
    """
    cls = type(class_name, (_Rewritten,), {"forward": type(gm).forward, "__module__": __name__,
                                           "__doc__": "fx-rewritten copy of the user's model"})
    plain = cls.__new__(cls)
    nn.Module.__init__(plain)
    plain._fx_graph = gm.graph
    for name, child in gm.named_children():
        plain.add_module(name, child)
    for name, p in gm.named_parameters(recurse=False):
        plain.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        plain.register_buffer(name, b)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in node.target and not hasattr(plain, node.target):
            setattr(plain, node.target, getattr(gm, node.target))
    return plain


@contextlib.contextmanager
def _safe_reshape_mapping():
    """torch-pruning's reshape index mapping crashes on some views (channel shuffles);
    record the failure on the node (the trust check then rejects its groups) instead."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def safe(graph, node):
        try:
            original(graph, node)
        except Exception:  # noqa: BLE001
            node._cc_mapping_failed = True

    index_mapping.update_reshape_index_mapping = safe
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


class _Barrier(nn.Module):
    """Stands in for an op whose channel mapping is not trusted: torch-pruning links its input
    and output channels to nothing, and any group that reaches it is left whole."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


class _BarrierPruner(ChannelScatterPruner):
    def prune_out_channels(self, layer, idxs):
        raise RuntimeError(f"refusing to prune through an untrusted op: {layer.reason}")

    def prune_in_channels(self, layer, idxs):
        raise RuntimeError(f"refusing to prune through an untrusted op: {layer.reason}")

    def get_out_channels(self, layer):
        return None

    def get_in_channels(self, layer):
        return None


_DUMMY_OPS = (tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._UnbindOp,
              tp.ops._ExpandOp, tp.ops._SliceOp)


def _insert_barriers(dg: tp.DependencyGraph) -> None:
    for module, node in list(dg.module2node.items()):
        if not isinstance(module, _DUMMY_OPS) or not node.inputs:
            continue
        why = _node_problem(node, dg, before_mapping=True)
        if why is None:
            continue
        barrier = _Barrier(why)
        node.module = barrier
        node.module_class = _Barrier
        node.type = tp.ops.OPTYPE.CUSTOMIZED
        dg.module2node[barrier] = dg.module2node.pop(module)


def _build_dg(model: nn.Module, example_input: torch.Tensor, check_ops: bool = True) -> tp.DependencyGraph:
    """torch-pruning's ``build_dependency``, plus one repair between tracing and linking.

    Recent PyTorch records a Linear on a 4-D tensor as view -> addmm -> view, and
    torchvision's LayerNorm2d as permute -> layer_norm -> permute; torch-pruning maps only
    the module's *output* grad_fn to the module and treats the inner ops as separate
    element-wise nodes (coupling a Linear's inputs with its outputs). Inner nodes between a
    module's recorded input and output are removed and the module is linked directly.
    """
    from torch_pruning.dependency import index_mapping, shape_infer

    flags = {p: p.requires_grad for p in model.parameters()}
    inputs: dict[nn.Module, list] = {}

    def pre_hook(mod, args):
        if args and isinstance(args[0], torch.Tensor):
            inputs.setdefault(mod, []).append(args[0].grad_fn)

    outputs: set = set()

    def out_hook(_mod, _args, out):
        for t in tp.utils.flatten_as_list(out):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                outputs.add(t.grad_fn)

    hooks = [m.register_forward_pre_hook(pre_hook) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.LayerNorm, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase))]
    hooks.append(model.register_forward_hook(out_hook))
    try:
        for p in flags:
            p.requires_grad_(True)
        with torch.enable_grad(), _safe_reshape_mapping():
            dg = tp.DependencyGraph()
            dg.verbose = False
            dg.model = model
            dg._module2name = {module: name for (name, module) in model.named_modules()}
            dg.register_customized_layer(ChannelScatter, ChannelScatterPruner())
            dg.register_customized_layer(_Barrier, _BarrierPruner())
            dg.ignored_params = []
            dg._param_to_name, dg.unwrapped_parameters = dg._detect_unwrapped_parameters(None)
            dg.module2node = dg._trace(model, (example_input,), None, output_transform=None)
            _collapse_inner_nodes(dg, inputs)
            if check_ops:
                _insert_barriers(dg)
            dg._build_dependency(dg.module2node)
            shape_infer.init_shape_information(dg)
            index_mapping.update_index_mapping(dg)
            dg._cc_outputs = outputs
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    return dg


def _collapse_inner_nodes(dg: tp.DependencyGraph, inputs: dict[nn.Module, list]) -> None:
    by_gf = {node.grad_fn: node for node in dg.module2node.values() if node.grad_fn is not None}
    for module, gfs in inputs.items():
        if len(gfs) != 1 or module not in dg.module2node:
            continue
        node = dg.module2node[module]
        in_node = by_gf.get(gfs[0])
        if in_node is None or in_node in node.inputs:
            continue
        # inner nodes: everything reachable backwards from the module before in_node
        inner, stack = set(), [n for n in node.inputs]
        ok = True
        while stack:
            n = stack.pop()
            if n in inner or n is in_node:
                continue
            if isinstance(n.module, nn.Module) and n.module in dg._module2name:
                ok = False  # reached another real module: not an inner chain
                break
            if isinstance(n.module, (nn.Parameter, torch.Tensor)):
                continue
            inner.add(n)
            stack.extend(n.inputs)
        if not ok or not inner:
            continue
        if not any(in_node in n.inputs for n in inner):
            continue
        node.inputs = [in_node] + [n for n in node.inputs if n not in inner and n is not in_node]
        in_node.outputs = [n for n in in_node.outputs if n not in inner]
        if node not in in_node.outputs:
            in_node.outputs.append(node)
        for n in inner:
            for other in n.inputs:
                if other is not in_node:
                    other.outputs = [o for o in other.outputs if o is not n]
            dg.module2node.pop(n.module, None)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _is_depthwise(m)


def _dim_size(obj, kind: str, dg_dim: int | None = None) -> int | None:
    if isinstance(obj, nn.Parameter) or isinstance(obj, torch.Tensor):
        return int(obj.shape[dg_dim if dg_dim is not None else 0])
    if isinstance(obj, nn.modules.conv._ConvNd):
        return obj.out_channels if kind == "out" else obj.in_channels
    if isinstance(obj, nn.Linear):
        return obj.out_features if kind == "out" else obj.in_features
    if isinstance(obj, nn.modules.batchnorm._NormBase):
        return obj.num_features
    if isinstance(obj, nn.LayerNorm):
        return obj.normalized_shape[-1]
    if isinstance(obj, nn.GroupNorm):
        return obj.num_channels
    if isinstance(obj, nn.PReLU):
        return obj.num_parameters
    if isinstance(obj, ChannelScatter):
        return obj.out_channels if kind == "out" else obj.in_channels
    return None


# --------------------------------------------------------------------------- trust checks


def _node_problem(node, dg: tp.DependencyGraph, before_mapping: bool = False) -> str | None:
    """Why torch-pruning's handling of this (non-module) node is not trusted, or None."""
    ops = tp.ops
    t = node.type
    gf = node.grad_fn
    name = _op_name(gf)
    if t == ops.OPTYPE.ELEMENTWISE:
        if name in CHANNELWISE_OPS:
            return None
        if name == "permute":
            dims = list(getattr(gf, "_saved_dims", ()))
            if dims in ([0, 2, 3, 1], [0, 3, 1, 2]):
                return None
            return f"permute{tuple(dims)} moves the channel dimension"
        if name in ("mean", "sum", "amax", "amin"):
            dims = getattr(gf, "_saved_dim", None)
            sizes = getattr(gf, "_saved_self_sym_sizes", None)
            if dims is not None and sizes is not None:
                nd = len(sizes)
                dims = [d % nd for d in dims]
                if 1 not in dims and 0 not in dims:
                    return None
            return f"reduction {gf.name()} over channels"
        if name == "asstrided":  # adaptive pooling to 1x1: (N, C, 1, 1) with channels contiguous
            size = list(getattr(gf, "_saved_size", ()))
            stride = list(getattr(gf, "_saved_stride", ()))
            if len(size) >= 2 and all(int(v) == 1 for v in size[2:]) and stride and int(stride[1]) == 1 \
                    and int(getattr(gf, "_saved_storage_offset", 0) or 0) == 0:
                return None
            return f"{gf.name()} with size {tuple(size)}"
        if name == "constantpadnd":
            pad = list(getattr(gf, "_saved_pad", ()))
            sizes = getattr(gf, "_saved_self_sym_sizes", None)
            if sizes is not None and pad and _pad_channel_amounts(pad, len(sizes)) is None:
                return None
            return f"{gf.name()} pads the channel dimension"
        return f"unsupported op {gf.name() if gf is not None and hasattr(gf, 'name') else 'unknown'}"
    if t == ops.OPTYPE.CONCAT or t == ops.OPTYPE.SPLIT:
        dim = getattr(gf, "_saved_dim", None)
        if dim is None:
            return f"{name} with an unknown dimension"
        if int(dim) not in (1, -3):
            return f"{gf.name()} over dim {dim}, not the channel dimension"
        if not before_mapping and (getattr(node.module, "offsets", None) is None or not node.enable_index_mapping):
            return f"{gf.name()} whose channel offsets torch-pruning could not infer"
        return None
    if t == ops.OPTYPE.SLICE:
        dim = int(getattr(node.module, "dim", -1))
        sizes = getattr(gf, "_saved_self_sym_sizes", None)
        if sizes is not None and dim % len(sizes) not in (1,) and len(sizes) == 4:
            return None  # spatial slicing; channel indices pass unchanged
        return f"{gf.name()} slices the channel dimension"
    if t == ops.OPTYPE.RESHAPE:
        if getattr(node, "_cc_mapping_failed", False):
            return f"{gf.name() if gf is not None else 'reshape'} that torch-pruning could not map"
        # accepted only as the flatten in front of Linear layers
        stack, seen = list(node.outputs), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.type == ops.OPTYPE.LINEAR or n.type == ops.OPTYPE.OUTPUT:
                continue
            if n.type == ops.OPTYPE.ELEMENTWISE and _op_name(n.grad_fn) in CHANNELWISE_OPS:
                stack.extend(n.outputs)
                continue
            return f"{gf.name() if gf is not None else 'reshape'} over channels (e.g. a channel shuffle)"
        return None
    if t in (ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND):
        return f"{gf.name() if gf is not None else name} over channels"
    return None


# --------------------------------------------------------------------------- build


def build_graph(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ignore: Sequence[str] = (),
    min_channels: int = 1,
    round_to: int = 1,
    rewrite: bool = True,
    check_ops: bool = True,
    verify: bool = False,
) -> ChannelGraph:
    """Trace ``model`` and return its channel groups.

    Args:
        ignore: module-name globs (fnmatch; a glob also matches the module's children); any
            group touching such a module is left whole ("ignored by --ignore").
        min_channels: per-group floor of the kept count (clipped to the group size).
        round_to: kept counts must be multiples of this (device alignment).
        rewrite: map channel-dim zero padding through ChannelScatter (turning it off is only
            for tests demonstrating what the check catches).
        check_ops: apply the trust checks on the ops torch-pruning handled (tests only).
        verify: prune a random ~50% plan and compare it with the masked model; groups that fail
            alone are then marked not prunable.
    """
    model.eval()
    example_input = example_input[:1].detach()
    work = _rewrite_channel_pads(model, example_input) if rewrite else model
    work.eval()
    dg = _build_dg(work, example_input, check_ops)
    module2name = {m: n for n, m in work.named_modules()}
    param2name = dict(dg._param_to_name)
    ops = tp.ops

    graph = ChannelGraph(model=work, example_input=example_input)
    graph._check_ops = check_ops
    seen_roots: set[nn.Module] = set()
    failed: set[str] = set()
    root_types = (nn.modules.conv._ConvNd, nn.Linear)
    for module in list(dg.module2node.keys()):
        if not isinstance(module, root_types) or module in seen_roots:
            continue
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        size = int(pruner.get_out_channels(module))
        root_name = module2name[module]
        try:
            with _safe_reshape_mapping():
                tp_group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(size)))
        except Exception as exc:  # noqa: BLE001 - torch-pruning's index mapping failed
            gid = len(graph.groups)
            graph.groups.append(ChannelGroup(
                id=gid, root=root_name, size=size,
                members=[GroupMember(root_name, "out", tuple(range(size)))], prunable=False,
                reason=f"torch-pruning could not map this group ({type(exc).__name__})",
                multiple=1, min_channels=max(1, min(int(min_channels), size)),
            ))
            graph._links[gid] = [_Link(root_name, "out", [(i,) for i in range(size)])]
            graph._dims[(root_name, "out")] = size
            failed.add(root_name)
            seen_roots.add(module)
            continue
        problems: list[str] = []
        maps: dict[tuple[str, str], dict[int, list[int]]] = {}
        is_param: dict[tuple[str, str], bool] = {}
        objs: dict[tuple[str, str], object] = {}
        for item in tp_group:
            dep, idxs = item.dep, item.idxs
            root_idxs = item.root_idxs
            target = dep.target
            obj = target.module
            handler = dep.handler.__name__
            kind = "in" if "in_channels" in handler else "out"
            if isinstance(obj, nn.Parameter) or isinstance(obj, torch.Tensor):
                name = param2name.get(obj)
                if name is None:
                    problems.append("an unnamed parameter")
                    continue
                key = (name, "out")
                is_param[key] = True
            elif obj in module2name and not isinstance(obj, tp.ops._ElementWiseOp):
                name = module2name[obj]
                if isinstance(obj, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)):
                    kind = "out"
                if _is_depthwise(obj):
                    kind = "out"
                key = (name, kind)
                is_param[key] = False
                if isinstance(obj, root_types) and kind == "out":
                    seen_roots.add(obj)
                if isinstance(obj, nn.modules.conv._ConvTransposeNd):
                    problems.append(f"transposed convolution {name}")
                if isinstance(obj, nn.GroupNorm):
                    problems.append(f"GroupNorm {name} (statistics span channels)")
                if isinstance(obj, nn.LayerNorm) and len(obj.normalized_shape) != 1:
                    problems.append(f"LayerNorm {name} over {tuple(obj.normalized_shape)}")
                if isinstance(obj, nn.LayerNorm) and len(obj.normalized_shape) == 1:
                    cls = type(obj).__name__
                    if type(obj) is nn.LayerNorm:
                        graph._norms[name] = False
                    elif cls == "LayerNorm2d":
                        graph._norms[name] = True
                    else:
                        problems.append(f"LayerNorm subclass {cls} at {name}")
                if not isinstance(obj, (root_types, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                        nn.PReLU, ChannelScatter)):
                    problems.append(f"module {name} of type {type(obj).__name__}")
            else:
                if isinstance(obj, _Barrier):
                    problems.append(obj.reason)
                elif target.type == ops.OPTYPE.OUTPUT or target.grad_fn in dg._cc_outputs:
                    problems.append("model output channels")
                elif check_ops and target.inputs:  # input-less nodes only transform parameters (e.g. W.t())
                    why = _node_problem(target, dg)
                    if why:
                        problems.append(why)
                continue
            if kind == "out" and (not target.outputs or target.grad_fn in dg._cc_outputs):
                problems.append("model output channels")
            objs[key] = obj
            bucket = maps.setdefault(key, {})
            for i, r in zip(idxs, root_idxs, strict=True):
                lst = bucket.setdefault(int(r), [])
                if int(i) not in lst:
                    lst.append(int(i))
        links = []
        for key, bucket in maps.items():
            name, kind = key
            if set(bucket) != set(range(size)):
                problems.append(f"{name} sees only part of the channels (split across branches)")
                continue
            indices = [tuple(sorted(bucket[c])) for c in range(size)]
            flat = [i for t in indices for i in t]
            if len(set(flat)) != len(flat):
                problems.append(f"{name} receives a channel twice")
            links.append(_Link(name, kind, indices, is_param[key]))
            obj = objs[key]
            dim = _dim_size(obj, kind, dg.module2node[obj].pruning_dim if is_param[key] else None)
            if dim is not None:
                graph._dims[key] = dim
                if max(flat) >= dim:
                    problems.append(f"channel indices beyond the {dim} {kind} channels of {name} (broadcast?)")
        gid = len(graph.groups)
        members = [
            GroupMember(link.module, link.kind, tuple(t[0] for t in link.indices))
            for link in links
            if all(len(t) == 1 for t in link.indices) and not isinstance(objs[(link.module, link.kind)], ChannelScatter)
        ]
        group = ChannelGroup(id=gid, root=root_name, size=size, members=members)
        group.multiple = max(1, int(round_to))
        floor = int(min_channels)
        partitions = set()
        for link in links:
            obj = objs[(link.module, link.kind)]
            if not _is_grouped(obj):
                continue
            width = _dim_size(obj, link.kind) // obj.groups
            if width <= 1 or any(len(t) != 1 for t in link.indices):
                problems.append(f"grouped convolution {link.module} (groups={obj.groups}) with group width {width}")
                continue
            partitions.add(tuple(t[0] // width for t in link.indices))
            group.multiple = math.lcm(group.multiple, obj.groups)
            floor = max(floor, obj.groups)
        if len(partitions) > 1:
            problems.append("grouped convolutions with different channel partitions")
        elif partitions:
            graph._balance[gid] = list(partitions.pop())
        group.min_channels = max(1, min(floor, size))
        if problems:
            group.prunable = False
            group.reason = "; ".join(dict.fromkeys(problems))
        elif ignore and any(_matches(link.module, ignore) for link in links):
            group.prunable = False
            group.reason = "ignored by --ignore"
        elif size <= 1:
            group.prunable = False
            group.reason = "a single channel"
        graph.groups.append(group)
        graph._links[gid] = links

    if failed:
        for group in graph.groups:
            if group.prunable and any(link.module in failed and link.kind == "out" for link in graph._links[group.id]):
                group.prunable = False
                group.reason = "coupled with a group torch-pruning could not map"
    _build_cost_table(graph)
    if verify:
        _verify_groups(graph)
    return graph


def _matches(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


def _build_cost_table(graph: ChannelGraph) -> None:
    model, x = graph.model, graph.example_input
    positions: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            def hook(mod, _inp, out, name=name):
                ch = mod.out_channels if isinstance(mod, nn.modules.conv._ConvNd) else mod.out_features
                positions[name] = positions.get(name, 0) + out.numel() // ch // max(1, out.shape[0])
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    by_key: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for gid, links in graph._links.items():
        for link in links:
            by_key.setdefault((link.module, link.kind), []).append((gid, len(link.indices[0])))
    for name, m in model.named_modules():
        if name not in positions:
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            out_size, in_size, groups = m.out_channels, m.in_channels, m.groups
            kernel = math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            out_size, in_size, groups, kernel = m.out_features, m.in_features, 1, 1
        else:
            continue
        row = _Layer(name, positions[name] * kernel, out_size, in_size, groups, _is_depthwise(m))
        row.out_terms = by_key.get((name, "out"), [])
        row.in_terms = [] if row.depthwise else by_key.get((name, "in"), [])
        row.out_fixed = out_size - sum(graph.groups[g].size * k for g, k in row.out_terms)
        row.in_fixed = in_size - sum(graph.groups[g].size * k for g, k in row.in_terms)
        graph._layers.append(row)


# --------------------------------------------------------------------------- plans


def conv_groups(graph: ChannelGraph, group_id: int) -> torch.Tensor | None:
    """For a group feeding or produced by a grouped convolution: the convolution group of each
    channel (kept counts must be equal in all of them); None for unconstrained groups."""
    part = graph._balance.get(group_id)
    return None if part is None else torch.as_tensor(part, dtype=torch.long)


def normalize_plan(graph: ChannelGraph, plan: Plan) -> Plan:
    """The plan ``apply_plan`` really applies.

    Groups tied to grouped convolutions (``conv_groups(graph, id)`` is not None) must keep the
    same number of channels in every convolution group. A plan that does not is rebalanced
    deterministically: the count is rounded up to a multiple of the number of convolution
    groups, over-full convolution groups drop their highest-index kept channels and under-full
    ones take back their lowest-index removed channels. Plan makers that want to control the
    choice should select the top channels per convolution group themselves.
    """
    out: Plan = {}
    for gid, kept in plan.items():
        keep = sorted({int(i) for i in torch.as_tensor(kept).flatten().tolist()})
        part = graph._balance.get(int(gid))
        size = graph.groups[int(gid)].size
        if part is not None and 0 < len(keep) < size:
            n_groups = max(part) + 1
            quota = -(-len(keep) // n_groups)
            chosen = []
            for b in range(n_groups):
                mine = [c for c in keep if part[c] == b]
                if len(mine) > quota:
                    mine = mine[:quota]
                elif len(mine) < quota:
                    extra = [c for c in range(size) if part[c] == b and c not in set(mine)]
                    mine = sorted(mine + extra[: quota - len(mine)])
                chosen.extend(mine)
            keep = sorted(chosen)
        out[int(gid)] = torch.as_tensor(keep, dtype=torch.long)
    return out


def _removed(graph: ChannelGraph, plan: Plan) -> dict[int, list[int]]:
    """Group id -> removed group channels; validates the plan."""
    out = {}
    for gid, kept in normalize_plan(graph, plan).items():
        group = graph.groups[int(gid)]
        keep = kept.tolist()
        if any(i < 0 or i >= group.size for i in keep):
            raise ValueError(f"plan for group {gid} ({group.root}) has indices outside 0..{group.size - 1}")
        if len(keep) == group.size:
            continue
        if not group.prunable:
            raise ValueError(f"plan prunes group {gid} ({group.root}), which is not prunable: {group.reason}")
        if len(keep) < 1:
            raise ValueError(f"plan keeps no channel of group {gid} ({group.root})")
        kept_set = set(keep)
        out[int(gid)] = [c for c in range(group.size) if c not in kept_set]
    return out


def _removed_by_dim(graph: ChannelGraph, removed: dict[int, list[int]]) -> dict[tuple[str, str], set[int]]:
    by_dim: dict[tuple[str, str], set[int]] = {}
    for gid, chans in removed.items():
        for link in graph._links[gid]:
            s = by_dim.setdefault((link.module, link.kind), set())
            for c in chans:
                s.update(link.indices[c])
    return by_dim


def apply_plan(graph: ChannelGraph, plan: Plan, *, share_untouched: bool = False) -> PrunedModel:
    """Physically remove every channel not kept by ``plan``, on a deep copy.

    ``share_untouched``: copy only the module structure and let modules the plan does not touch
    share their tensors with ``graph.model`` (several times faster than a deep copy; for throw-away
    probes that change nothing but the touched modules). Parameters then keep their
    ``requires_grad`` flags. When every touched module is a plain convolution, linear layer or
    BatchNorm, their tensors are sliced directly instead of building torch-pruning's graph.
    """
    removed = _removed(graph, plan)
    by_dim = _removed_by_dim(graph, removed)
    kept = _kept_records(graph, by_dim)
    model = (_structural_copy(graph.model) if share_untouched else copy.deepcopy(graph.model)).eval()
    if removed and not (share_untouched and _slice_directly(model, by_dim, kept)):
        grouped = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                   for name, m in model.named_modules() if _is_grouped(m)}
        dg = _build_dg(model, graph.example_input, graph._check_ops)
        for gid in sorted(removed):
            group = graph.groups[gid]
            root = model.get_submodule(group.root)
            root_link = next(lk for lk in graph._links[gid] if lk.module == group.root and lk.kind == "out")
            idxs = sorted(root_link.indices[c][0] for c in removed[gid])
            pruner = dg.get_pruner_of_module(root)
            with _safe_reshape_mapping():
                tp_group = dg.get_pruning_group(root, pruner.prune_out_channels, idxs)
            tp_group.prune()
        _rebuild_grouped(model, grouped, kept)
    _check_kept(model, kept)
    if share_untouched:
        _own_tensors(model, graph.model, kept)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return PrunedModel(model=model.eval(), kept=kept, plan=normalize_plan(graph, plan))


def _kept_records(graph: ChannelGraph, by_dim: dict[tuple[str, str], set[int]]) -> dict[str, dict[str, list[int]]]:
    """``PrunedModel.kept``: kept indices of every changed module dimension, in the original's numbering."""
    kept: dict[str, dict[str, list[int]]] = {}
    for (name, kind), drop in by_dim.items():
        if not drop:
            continue
        obj = lookup(graph.model, name)
        if obj is None or isinstance(obj, ChannelScatter):
            continue
        size = graph._dims.get((name, kind))
        if size is None:
            continue
        kept.setdefault(name, {})[kind] = [i for i in range(size) if i not in drop]
        if isinstance(obj, nn.Module) and _is_depthwise(obj):
            kept[name]["in"] = kept[name]["out"]
    return kept


_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _slice_directly(model: nn.Module, by_dim: dict[tuple[str, str], set[int]],
                    kept: dict[str, dict[str, list[int]]]) -> bool:
    """Slice the kept channels out of ``model`` (a structural copy) when every changed module is an
    ungrouped convolution, a linear layer or a BatchNorm; False (nothing changed) otherwise."""
    modules = {name: lookup(model, name) for (name, _), drop in by_dim.items() if drop}
    for module in modules.values():
        plain_conv = type(module) in _PLAIN_CONVS and module.groups == 1
        if not (plain_conv or type(module) in (nn.Linear, *_PLAIN_NORMS)):
            return False
    if set(kept) != set(modules):
        return False
    for name, dims in kept.items():
        module = modules[name]
        for kind, keep in dims.items():
            index = torch.as_tensor(keep, dtype=torch.long)
            if type(module) in _PLAIN_NORMS:
                for key in ("weight", "bias"):
                    if module._parameters.get(key) is not None:
                        module._parameters[key] = nn.Parameter(module._parameters[key].detach()[index],
                                                               requires_grad=False)
                for key in ("running_mean", "running_var"):
                    if module._buffers.get(key) is not None:
                        module._buffers[key] = module._buffers[key][index]
                module.num_features = len(keep)
                continue
            dim = 0 if kind == "out" else 1
            module._parameters["weight"] = nn.Parameter(module.weight.detach().index_select(dim, index),
                                                        requires_grad=False)
            if kind == "out" and module.bias is not None:
                module._parameters["bias"] = nn.Parameter(module.bias.detach()[index], requires_grad=False)
            attr = {("out", True): "out_features", ("in", True): "in_features",
                    ("out", False): "out_channels", ("in", False): "in_channels"}[kind, isinstance(module, nn.Linear)]
            setattr(module, attr, len(keep))
    return True


def _structural_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's tensors.

    Pruning replaces tensors rather than writing into them, so the original is left intact;
    containers (hooks, parameter and buffer dicts) are copied so registering on the copy does not
    reach the original.
    """
    new = object.__new__(type(module))
    for key, value in module.__dict__.items():
        new.__dict__[key] = type(value)(value) if isinstance(value, (dict, set, list)) else value
    new._modules = {k: None if m is None else _structural_copy(m) for k, m in module._modules.items()}
    return new


def _own_tensors(model: nn.Module, original: nn.Module, kept: dict[str, dict[str, list[int]]]) -> None:
    """Give every module the plan touched its own copy of tensors still shared with ``original``."""
    shared = {id(t) for t in (*original.parameters(), *original.buffers())}
    for name in kept:
        module = lookup(model, name)
        if not isinstance(module, nn.Module):
            continue
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None and id(t) in shared:
                    clone = t.detach().clone()
                    table[key] = nn.Parameter(clone, requires_grad=False) if isinstance(t, nn.Parameter) else clone


def _rebuild_grouped(model: nn.Module, snapshots: dict, kept: dict[str, dict[str, list[int]]]) -> None:
    """torch-pruning slices grouped convolutions' input weights as if they were dense; rebuild
    them from the original weights: output o of conv-group g reads its group's kept inputs."""
    for name, (weight, bias) in snapshots.items():
        rec = kept.get(name)
        if not rec:
            continue
        conv = model.get_submodule(name)
        g = conv.groups
        out_size, in_width = weight.shape[0], weight.shape[1]
        in_size = in_width * g
        kept_out = rec.get("out", list(range(out_size)))
        kept_in = rec.get("in", list(range(in_size)))
        out_width = out_size // g
        rows = []
        for o in kept_out:
            b = o // out_width
            local = [i - b * in_width for i in kept_in if i // in_width == b]
            rows.append(weight[o, local])
        new_w = torch.stack(rows)
        if new_w.shape[1] * g != len(kept_in):
            raise RuntimeError(f"grouped convolution {name}: unbalanced input channels per group")
        conv.weight = nn.Parameter(new_w.contiguous())
        if bias is not None:
            conv.bias = nn.Parameter(bias[torch.as_tensor(kept_out, dtype=torch.long)].clone())
        conv.in_channels, conv.out_channels = len(kept_in), len(kept_out)


def lookup(model: nn.Module, name: str) -> nn.Module | nn.Parameter | None:
    """The module called ``name``, else the bare parameter called ``name``, else None."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _check_kept(model: nn.Module, kept: dict[str, dict[str, list[int]]]) -> None:
    """The pruned modules must have exactly the recorded sizes (catches silent divergence)."""
    for name, rec in kept.items():
        obj = lookup(model, name)
        for kind, idx in rec.items():
            if isinstance(obj, torch.Tensor):
                if len(idx) not in obj.shape:
                    raise RuntimeError(f"pruned parameter {name} has shape {tuple(obj.shape)}, expected {len(idx)}")
                continue
            size = _dim_size(obj, kind)
            if size is not None and size != len(idx):
                raise RuntimeError(f"pruned {name} has {size} {kind} channels, the plan keeps {len(idx)}")


# --------------------------------------------------------------------------- masking


def mask_model(graph: ChannelGraph, plan: Plan) -> nn.Module:
    """A deep copy of ``graph.model`` whose removed channels are zeroed at their producers.

    LayerNorms touched by the plan are replaced by :class:`MaskedLayerNorm`, which normalizes
    over the kept channels only (what the pruned LayerNorm computes).
    """
    removed = _removed(graph, plan)
    model = copy.deepcopy(graph.model).eval()
    by_dim = _removed_by_dim(graph, removed)
    with torch.no_grad():
        for (name, kind), drop in by_dim.items():
            if kind != "out" or not drop:
                continue
            idx = torch.as_tensor(sorted(drop), dtype=torch.long)
            obj = lookup(model, name)
            if isinstance(obj, torch.Tensor):
                dim = _param_dim(graph, name, obj)
                obj.index_fill_(dim, idx, 0.0)
                continue
            if isinstance(obj, ChannelScatter):  # removed output channels read the zero channel
                obj.gather.index_fill_(0, idx, obj.in_channels)
                continue
            for attr in ("weight", "bias"):
                t = getattr(obj, attr, None)
                if isinstance(t, torch.Tensor):
                    t.index_fill_(0, idx, 0.0)
            if isinstance(obj, nn.modules.batchnorm._NormBase) and obj.running_mean is not None:
                obj.running_mean.index_fill_(0, idx, 0.0)
                obj.running_var.index_fill_(0, idx, 1.0)
        for name, channels_first in graph._norms.items():
            drop = by_dim.get((name, "out"))
            if not drop:
                continue
            norm = model.get_submodule(name)
            keep = [i for i in range(norm.normalized_shape[-1]) if i not in drop]
            _set_submodule(model, name, MaskedLayerNorm(norm, keep, channels_first))
    return model


def _param_dim(graph: ChannelGraph, name: str, param: torch.Tensor) -> int:
    size = graph._dims.get((name, "out"))
    for d, s in enumerate(param.shape):
        if s == size and s > 1:
            return d
    return 0


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def soundness_diff(graph: ChannelGraph, plan: Plan, pruned: nn.Module, inputs: torch.Tensor) -> float:
    """Max |pruned(x) - masked_original(x)| over ``inputs``."""
    device = _device_of(pruned)
    masked = mask_model(graph, plan).to(device)
    inputs = inputs.to(device)
    was_training = pruned.training
    pruned.eval()
    try:
        with torch.no_grad():
            a = _run(pruned, inputs)
            b = _run(masked, inputs)
    finally:
        pruned.train(was_training)
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


# --------------------------------------------------------------------------- cost


def estimate_macs(graph: ChannelGraph, kept_counts: dict[int, int]) -> int:
    """Fast MAC count of the model with ``kept_counts[group_id]`` channels kept per group.

    Counts convolution and linear layers (as :func:`count_macs_params` does).
    """
    return _rows_macs(graph, graph._layers, kept_counts)


def estimate_macs_change(graph: ChannelGraph, kept_counts: dict[int, int], group_id: int, count: int) -> int:
    """``estimate_macs`` with group ``group_id`` at ``count`` minus ``estimate_macs`` at ``kept_counts``,
    summed over the layers that group touches only (a greedy search asks this thousands of times)."""
    if not graph._layers_of_group:
        for row in graph._layers:
            for gid in {gid for gid, _ in (*row.out_terms, *row.in_terms)}:
                graph._layers_of_group.setdefault(gid, []).append(row)
    rows = graph._layers_of_group.get(group_id, [])
    return _rows_macs(graph, rows, {**kept_counts, group_id: count}) - _rows_macs(graph, rows, kept_counts)


def _rows_macs(graph: ChannelGraph, rows, kept_counts: dict[int, int]) -> int:
    total = 0
    groups = graph.groups
    get = kept_counts.get
    for row in rows:
        out = row.out_fixed
        for gid, k in row.out_terms:
            out += get(gid, groups[gid].size) * k
        if row.depthwise:
            total += row.positions_kernel * out
            continue
        cin = row.in_fixed
        for gid, k in row.in_terms:
            cin += get(gid, groups[gid].size) * k
        total += row.positions_kernel * out * cin // row.groups
    return int(total)


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Exact (MACs, parameters) of ``model`` for one ``example_input`` batch.

    MACs of convolutions and linear layers (multiply-accumulates per sample of the batch).
    """
    macs = [0]
    hooks = []

    def hook(mod, _inp, out):
        if isinstance(mod, nn.modules.conv._ConvNd):
            per_out = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        else:
            per_out = mod.in_features
        macs[0] += out.numel() // max(1, out.shape[0]) * per_out

    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1].to(_device_of(model)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return int(macs[0]), int(params)


# --------------------------------------------------------------------------- verification


def random_plan(graph: ChannelGraph, keep_ratio: float = 0.5, seed: int = 0) -> Plan:
    """A random plan keeping about ``keep_ratio`` of every prunable group (tests, probing)."""
    gen = torch.Generator().manual_seed(seed)
    plan: Plan = {}
    for g in graph.groups:
        if not g.prunable:
            continue
        m = max(1, g.multiple)
        k = max(g.min_channels, int(round(g.size * keep_ratio)))
        k = min(g.size, -(-k // m) * m)
        part = graph._balance.get(g.id)
        if part is None:
            plan[g.id] = torch.randperm(g.size, generator=gen)[:k].sort().values
            continue
        part_t = torch.as_tensor(part)
        n_groups = int(part_t.max()) + 1
        chosen = []
        for b in range(n_groups):
            mine = torch.nonzero(part_t == b).flatten()
            chosen.append(mine[torch.randperm(len(mine), generator=gen)[: k // n_groups]])
        plan[g.id] = torch.cat(chosen).sort().values
    return plan


def _verify_groups(graph: ChannelGraph, tol: float = 1e-4) -> None:
    x = torch.randn((2,) + tuple(graph.example_input.shape[1:]), generator=torch.Generator().manual_seed(0))

    def ok(plan: Plan) -> tuple[bool, str]:
        try:
            pruned = apply_plan(graph, plan)
            with torch.no_grad():
                scale = float(_run(graph.model, x).abs().max())
            diff = soundness_diff(graph, plan, pruned.model, x)
        except Exception as exc:  # noqa: BLE001 - any failure means the group is not trusted
            return False, f"probe failed: {type(exc).__name__}: {exc}"[:200]
        return diff <= tol * max(1.0, scale) + tol, f"probe mismatch {diff:.3g}"

    plan = random_plan(graph)
    if not plan or ok(plan)[0]:
        return
    for gid in list(plan):
        good, why = ok({gid: plan[gid]})
        if not good:
            graph.groups[gid].prunable = False
            graph.groups[gid].reason = why


__all__ = [
    "ChannelGraph", "PrunedModel", "build_graph", "apply_plan", "mask_model", "soundness_diff",
    "estimate_macs", "count_macs_params", "random_plan", "normalize_plan", "conv_groups", "CHANNELWISE_OPS",
]
