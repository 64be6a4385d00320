"""The channel graph's data types and the module helpers every part of the graph package uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.channel_ops import ChannelScatter
from compressor.groups import ChannelGroup, Plan


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
    _layers_of_group: dict[int, list[_Layer]] = field(default_factory=dict, repr=False)  # group id -> its cost rows

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


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def run_hooked(model: nn.Module, x: torch.Tensor, handles: list) -> None:
    """Run ``model(x)`` without gradients for its hooks' sake, then remove the hooks ``handles`` (also on error)."""
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out
