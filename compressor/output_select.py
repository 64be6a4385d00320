"""Models that return several outputs: compress against one of them (``--output-key``).

Segmentation networks return a dict (torchvision's ``{"out": ..., "aux": ...}``), multi-head networks a
tuple. The pipeline needs one tensor, so the model is made to return the chosen entry: its class is
replaced by a subclass whose ``forward`` indexes the original ``forward``'s result. The layers keep
their names (no wrapper prefix), so ``--ignore`` globs, ``pruning.json`` and the report speak of the
user's own modules, and the exported ONNX has the one chosen output.

A dict or tuple with a single tensor entry is unwrapped without being asked; with several, the key must
be given.

The original ``forward`` still computes the other outputs (torchvision's auxiliary classifier), but
nothing reads them any more: the dependency graph, traced back from the chosen output, does not see
those layers, and pruning the channels they read would break them. Where fx can trace the model, the
model compressed is its trace without those computations (the layers keep their names). Elsewhere
``drop_unused_layers`` replaces each such layer by :class:`UnusedLayer`, which returns zeros of the
shape the layer gave, so the discarded computation still runs and the export leaves it out.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import fx, nn

from compressor.errors import CompressorError


def describe(output: object) -> str:
    """Short description of a model output, for messages: ``dict with keys 'out', 'aux'``, ``tensor 1x10``."""
    if isinstance(output, torch.Tensor):
        return "tensor " + "x".join(str(s) for s in output.shape)
    if isinstance(output, Mapping):
        keys = ", ".join(repr(k) for k in output)
        return f"{type(output).__name__} with keys {keys}" if output else f"empty {type(output).__name__}"
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__} of {len(output)} entries"
    return type(output).__name__


def _resolve(output: Mapping | tuple | list, key: str) -> object:
    """The entry of ``output`` that ``key`` (a dict key, or a position of a tuple/list) names."""
    if isinstance(output, Mapping):
        matches = [k for k in output if str(k) == key]
        if not matches:
            raise CompressorError(f"--output-key {key!r} is not among the model's outputs ({describe(output)}); "
                                  "pass one of those keys")
        return matches[0]
    if not key.lstrip("-").isdigit() or not -len(output) <= int(key) < len(output):
        raise CompressorError(f"--output-key {key!r} is not a position of the model's {describe(output)}; "
                              f"pass 0 to {len(output) - 1}")
    return int(key)


def choose_key(output: object, key: str | None) -> object | None:
    """Which entry of ``output`` to compress against: None for a plain tensor (nothing to select).

    Raises:
        CompressorError: the output has several entries and no ``key``, ``key`` names none of them, or
            the named entry is not a tensor.
    """
    if not isinstance(output, (Mapping, tuple, list)):
        if key is not None:
            raise CompressorError(f"--output-key {key!r} given, but the model returns a single output "
                                  f"({describe(output)}); drop --output-key")
        return None
    if key is not None:
        chosen = _resolve(output, key)
    else:
        entries = output.items() if isinstance(output, Mapping) else enumerate(output)
        tensors = [k for k, v in entries if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            what = "several outputs" if tensors else "no tensor output"
            raise CompressorError(f"the model returns {what} ({describe(output)}); pass --output-key to say which "
                                  f"one to compress against (e.g. --output-key {tensors[0] if tensors else 0})")
        chosen = tensors[0]
    if not isinstance(output[chosen], torch.Tensor):
        raise CompressorError(f"the model's output {chosen!r} is a {describe(output[chosen])}, not a tensor; "
                              "pass --output-key naming a tensor output")
    return chosen


def select_output(model: nn.Module, key: object, example: torch.Tensor,
                  expected: torch.Tensor | None = None) -> tuple[nn.Module, list[str]]:
    """``model`` made to return ``forward(...)[key]``, and the layers that then feed nothing it returns.

    Its class becomes a subclass of its own class that indexes ``forward``'s result (in place), so its
    modules, parameters and buffers keep their names. Where fx can trace it, the result is that trace
    without the computations the chosen output does not need (a ``GraphModule`` with the same layer
    names), kept only if its output on ``example`` is ``expected`` (the entry, computed when not given);
    elsewhere those layers become :class:`UnusedLayer` (``drop_unused_layers``).
    """
    base = type(model)
    if expected is None:
        with torch.no_grad():
            expected = model(example)[key]

    @functools.wraps(base.forward)  # the same signature: torch.export maps dynamic shapes by it
    def forward(self, *args, **kwargs):
        return base.forward(self, *args, **kwargs)[key]

    model.__class__ = type(base.__name__, (base,), {
        "forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
    })
    layers = [name for name, module in model.named_modules() if _is_layer(module)]
    try:
        traced = fx.symbolic_trace(model)
        traced.graph.eliminate_dead_code()
        slim: nn.Module = fx.GraphModule(traced, traced.graph, class_name=base.__name__).eval()
        with torch.no_grad():
            same = bool(torch.equal(slim(example), expected))
    except Exception:  # noqa: BLE001 - not traceable: the layers are replaced instead
        same = False
    if same:
        kept = {name for name, module in slim.named_modules() if _is_layer(module)}
        return slim, [name for name in layers if name not in kept]
    return model, drop_unused_layers(model, example)


def _is_layer(module: nn.Module) -> bool:
    """A leaf module with parameters of its own."""
    return not any(True for _ in module.children()) and any(True for _ in module.parameters(recurse=False))


class UnusedLayer(nn.Module):
    """Stands in for a layer whose output no longer reaches the model's output: zeros of its output's shape
    (per sample), whatever its input's channels."""

    def __init__(self, name: str, sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.name = name
        self.sample_shape = tuple(sample_shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        del args, kwargs
        return x.new_zeros((x.shape[0], *self.sample_shape))

    def extra_repr(self) -> str:
        return f"{self.name}: output unused, {self.sample_shape}"


def drop_unused_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Replace the leaf layers with parameters whose outputs do not reach ``model``'s output by UnusedLayer.

    Found by autograd: a layer is unused when no output of any of its calls gets a gradient from the
    model's output. Returns the replaced layers' names.
    """
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if name and _is_layer(module):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: outputs.setdefault(name, []).append(out)
                if isinstance(out, torch.Tensor) and out.requires_grad else None
            ))
    try:
        with torch.enable_grad():
            result = model(example.detach().clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(result, torch.Tensor) or not result.requires_grad:
        return []
    tensors = [t for ts in outputs.values() for t in ts]
    grads = torch.autograd.grad(result.float().sum(), tensors, allow_unused=True)
    used: dict[str, bool] = {}
    position = 0
    for name, ts in outputs.items():
        used[name] = any(g is not None for g in grads[position:position + len(ts)])
        position += len(ts)
    unused = [name for name, is_used in used.items() if not is_used]
    for name in unused:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        shape = tuple(outputs[name][0].shape[1:])
        if isinstance(parent, (nn.Sequential, nn.ModuleList)) and attr.isdigit():
            parent[int(attr)] = UnusedLayer(name, shape)
        else:
            setattr(parent, attr, UnusedLayer(name, shape))
    return unused


__all__ = ["UnusedLayer", "choose_key", "describe", "drop_unused_layers", "select_output"]
