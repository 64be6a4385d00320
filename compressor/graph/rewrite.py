"""Step 1 of building the graph: channel-dim zero padding becomes an index-mapped module.

The model is fx-traced; every ``F.pad`` that zero-pads the channel dimension becomes an owned
:class:`~compressor.channel_ops.ChannelScatter`. The rewritten model is the fx code in a plain
``nn.Module`` (the TorchScript ONNX exporter accepts it) with the user's module names.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compressor.channel_ops import ChannelScatter


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
