"""Data types shared by the graph, the criteria, the width search and the recovery stages.

A *channel group* is a set of tensor dimensions that must be pruned together: the output
channels of the convolution that produces a feature map, the BatchNorm that follows it, every
layer that consumes it (input channels), and everything tied to it by residual additions,
concatenations or depthwise convolutions. All members share one channel numbering
``0 .. size-1`` (the group's channel space); each member says which of its own indices
correspond to those group channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

MemberKind = Literal["out", "in"]


@dataclass(frozen=True)
class GroupMember:
    """One pruned dimension of one module inside a channel group.

    Attributes:
        module: Qualified module name in the model (``model.get_submodule(module)``), or the
            qualified name of a bare ``nn.Parameter`` (e.g. ConvNeXt's ``layer_scale``).
        kind: ``"out"`` when the group channels are this module's output channels
            (conv/linear weight dim 0, BatchNorm/LayerNorm channels), ``"in"`` when they are
            its input channels (conv weight dim 1, linear weight dim 1).
        indices: For each group channel ``c`` (0..size-1), the index in this module's
            dimension. Its length equals the group size.
    """

    module: str
    kind: MemberKind
    indices: tuple[int, ...]


@dataclass
class ChannelGroup:
    """A set of coupled channels that are kept or removed together.

    Attributes:
        id: Stable index of the group in ``ChannelGraph.groups``.
        root: Name of the module whose output channels define the group (usually a conv).
        size: Number of channels in the group.
        members: Every module dimension tied to these channels.
        prunable: False when the group must stay whole (classifier output, ignored layer,
            an op whose channel mapping is unknown).
        reason: Why the group is not prunable (shown in the report and terminal).
        multiple: The kept count must be a multiple of this (grouped convolutions, device
            alignment). 1 means any count.
        single_allowed: The group may also keep a single channel, below ``multiple``: set when the
            multiple comes from device alignment alone. One channel costs next to nothing
            whatever the alignment, and the width search uses it to all but remove a residual
            branch (unaligned, it takes six of ResNet-56's nine stage-1 blocks there at 40%).
        min_channels: The kept count never goes below this.
        spatial_macs: MACs of the root's producing layers per output channel, used by the
            width search's fast cost model (filled in by the graph).
    """

    id: int
    root: str
    size: int
    members: list[GroupMember] = field(default_factory=list)
    prunable: bool = True
    reason: str | None = None
    multiple: int = 1
    single_allowed: bool = False
    min_channels: int = 1

    def producers(self) -> list[GroupMember]:
        """Members whose *output* channels are the group's channels (convs, linears, norms)."""
        return [m for m in self.members if m.kind == "out"]

    def consumers(self) -> list[GroupMember]:
        """Members whose *input* channels are the group's channels."""
        return [m for m in self.members if m.kind == "in"]


# A pruning plan: for each group id, the sorted indices (group channel space) that are KEPT.
# Groups absent from the plan are kept whole.
Plan = dict[int, torch.Tensor]

# Per-channel importance: for each prunable group id, a float tensor of length group.size.
Scores = dict[int, torch.Tensor]
