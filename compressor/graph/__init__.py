"""Channel dependency graph, physical pruning, masking and the soundness check.

Modules: ``rewrite`` (step 1 below), ``trace`` (step 2: torch-pruning's graph and the trust
checks), ``build`` (``build_graph``: groups, step 3 and 4), ``prune`` (plans, ``apply_plan``,
``mask_model``, ``soundness_diff``), ``cost`` (MAC estimates and counts), ``core`` (data types).

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

from compressor.graph.build import build_graph
from compressor.graph.core import ChannelGraph, PrunedModel, device_of, lookup
from compressor.graph.cost import count_macs_params, estimate_macs, estimate_macs_change
from compressor.graph.prune import apply_plan, conv_groups, mask_model, normalize_plan, random_plan, soundness_diff
from compressor.graph.trace import CHANNELWISE_OPS

__all__ = [
    "ChannelGraph", "PrunedModel", "build_graph", "apply_plan", "mask_model", "soundness_diff", "lookup",
    "estimate_macs", "estimate_macs_change", "count_macs_params", "random_plan", "normalize_plan", "conv_groups",
    "CHANNELWISE_OPS", "device_of",
]
