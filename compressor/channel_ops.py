"""Owned modules that make channel-remapping ops explicit for the dependency graph.

``ChannelScatter`` replaces a zero padding over the channel dimension (the CIFAR ResNet
option-A shortcut ``F.pad(x, (0, 0, 0, 0, p, p))``) by an index map: output channel ``j``
reads input channel ``gather[j]`` or, where ``gather[j] == in_channels``, a zero channel.
Its input and output channel spaces are separate (it is registered with torch-pruning with
distinct in/out pruning functions), so both sides can be pruned independently.

``MaskedLayerNorm`` is used only by the masked reference model (``graph.mask_model``): it
normalizes over the kept channels only, which is what a physically pruned LayerNorm does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn


class ChannelScatter(nn.Module):
    """``out[:, j] = x[:, gather[j]]``, or zeros where ``gather[j] == in_channels``.

    Exports to ONNX (Concat + Gather) and through ``torch.export``.
    """

    def __init__(self, in_channels: int, gather: Sequence[int] | torch.Tensor):
        super().__init__()
        self.in_channels = int(in_channels)
        self.register_buffer("gather", torch.as_tensor(gather, dtype=torch.long).clone())

    @property
    def out_channels(self) -> int:
        return int(self.gather.numel())

    @classmethod
    def from_pad(cls, in_channels: int, before: int, after: int) -> ChannelScatter:
        """The scatter equivalent to zero padding ``before``/``after`` channels."""
        gather = [in_channels] * before + list(range(in_channels)) + [in_channels] * after
        return cls(in_channels, gather)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        return padded.index_select(1, self.gather)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"


class ChannelScatterPruner(tp.pruner.BasePruningFunc):
    """torch-pruning handler: input and output channels of a ChannelScatter are independent."""

    TARGET_MODULES = ChannelScatter

    def prune_out_channels(self, layer: ChannelScatter, idxs: Sequence[int]) -> ChannelScatter:
        drop = set(int(i) for i in idxs)
        keep = [j for j in range(layer.out_channels) if j not in drop]
        layer.gather = layer.gather[torch.as_tensor(keep, dtype=torch.long)].clone()
        return layer

    def prune_in_channels(self, layer: ChannelScatter, idxs: Sequence[int]) -> ChannelScatter:
        drop = set(int(i) for i in idxs)
        old = layer.in_channels
        remap = {}
        for i in range(old):
            if i not in drop:
                remap[i] = len(remap)
        new_in = len(remap)
        gather = [remap.get(int(g), new_in) if int(g) < old else new_in for g in layer.gather.tolist()]
        layer.in_channels = new_in
        layer.gather = torch.as_tensor(gather, dtype=torch.long, device=layer.gather.device)
        return layer

    def get_out_channels(self, layer: ChannelScatter) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelScatter) -> int:
        return layer.in_channels

    def get_in_channel_groups(self, layer) -> int:
        return 1

    def get_out_channel_groups(self, layer) -> int:
        return 1


class MaskedLayerNorm(nn.Module):
    """A LayerNorm over the channel dimension whose statistics use the kept channels only.

    Args:
        norm: the original ``nn.LayerNorm`` (1-D ``normalized_shape``); weight/bias are shared.
        kept: kept channel indices.
        channels_first: normalize dim 1 (torchvision's ``LayerNorm2d``) instead of the last dim.
    """

    def __init__(self, norm: nn.LayerNorm, kept: Sequence[int], channels_first: bool):
        super().__init__()
        self.norm = norm
        self.channels_first = channels_first
        self.register_buffer("kept", torch.as_tensor(list(kept), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        sub = x.index_select(-1, self.kept)
        mean = sub.mean(-1, keepdim=True)
        var = sub.var(-1, unbiased=False, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.norm.eps)
        if self.norm.weight is not None:
            y = y * self.norm.weight
        if self.norm.bias is not None:
            y = y + self.norm.bias
        if self.channels_first:
            y = y.permute(0, 3, 1, 2)
        return y


__all__ = ["ChannelScatter", "ChannelScatterPruner", "MaskedLayerNorm"]
