"""Channel dependency graph, physical pruning, masking and the soundness check.

(Interface stub: the implementation replaces the bodies; signatures are the contract.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.groups import ChannelGroup, Plan


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
    """

    model: nn.Module
    kept: dict[str, dict[str, list[int]]]


def build_graph(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ignore: Sequence[str] = (),
    min_channels: int = 1,
    round_to: int = 1,
) -> ChannelGraph:
    """Trace ``model`` and return its channel groups."""
    raise NotImplementedError


def apply_plan(graph: ChannelGraph, plan: Plan) -> PrunedModel:
    """Physically remove every channel not kept by ``plan``, on a deep copy."""
    raise NotImplementedError


def mask_model(graph: ChannelGraph, plan: Plan) -> nn.Module:
    """A deep copy of ``graph.model`` whose removed channels are zeroed at their producers."""
    raise NotImplementedError


def soundness_diff(graph: ChannelGraph, plan: Plan, pruned: nn.Module, inputs: torch.Tensor) -> float:
    """Max |pruned(x) - masked_original(x)| over ``inputs``."""
    raise NotImplementedError


def estimate_macs(graph: ChannelGraph, kept_counts: dict[int, int]) -> int:
    """Fast MAC count of the model with ``kept_counts[group_id]`` channels kept per group."""
    raise NotImplementedError


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Exact (MACs, parameters) of ``model`` for one ``example_input`` batch."""
    raise NotImplementedError
