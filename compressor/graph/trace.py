"""Step 2 of building the graph: torch-pruning's DependencyGraph, repaired and checked.

Ops recorded inside a Linear/LayerNorm are collapsed into the module, and every op that fails
the trust check (:func:`node_problem`) is replaced by a barrier that couples nothing.
"""

from __future__ import annotations

import contextlib

import torch
import torch_pruning as tp
from torch import nn

from compressor.channel_ops import ChannelScatter, ChannelScatterPruner
from compressor.graph.rewrite import _pad_channel_amounts

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
