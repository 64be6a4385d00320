"""The interface every channel-importance criterion implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from compressor.groups import ChannelGroup, Scores


@dataclass(frozen=True)
class ScoringContext:
    """Everything a criterion may use. A criterion runs its own passes and leaves no state.

    Attributes:
        model: The original model in eval mode. Criteria must not modify it (work on a copy
            when parameters or modes must change) and must leave no hooks or ``.grad`` behind.
        groups: The channel groups (only ``prunable`` ones need scores).
        calib: Calibration inputs, N x C x H x W float tensor on the CPU (may be None for
            data-free criteria).
        labels: Integer labels for ``calib`` when the user asked for labelled scoring
            (``--labels``); None means label-free (use the model's own predictions).
        device: Torch device the passes run on.
        batch_size: Batch size for the passes.
        seed: Seed for any randomness (results must be deterministic given it).
        output: ``"logits"`` (class scores) or ``"features"`` (an embedding without classes: criteria
            that explain a prediction explain the model's own output vector instead, see
            ``_common.targets``).
    """

    model: nn.Module
    groups: list[ChannelGroup]
    calib: torch.Tensor | None
    labels: torch.Tensor | None = None
    device: str = "cpu"
    batch_size: int = 64
    seed: int = 0
    output: str = "logits"

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]


class Criterion(ABC):
    """A channel-importance criterion from the literature.

    Class attributes describe it for ``compress criteria`` and for the pipeline:
    ``name`` (registry key), ``description`` (one line), ``paper`` (citation),
    ``needs_data`` (calibration images), ``needs_labels`` (true labels, never required by
    the label-free members), ``needs_gradients``.

    Conventions every member follows (checked by tests/compressor/criteria):

    * one module per criterion in ``compressor/criteria/``, registered with ``@register``;
    * all producer members of a group are scored (coupled residual groups combine their
      members); only the relative order within a group and the spread of scores matter, since
      the width search divides each group's scores by their mean before ranking globally;
    * passes run on a frozen deep copy of ``ctx.model`` (``_common.working_copy``) or with hooks
      removed afterwards: no hooks, ``.grad``, ``requires_grad`` or mode changes are left behind;
    * data-driven criteria raise ``CompressorError`` ("needs calibration data") without
      ``ctx.calib``; results are deterministic given ``ctx.seed``.

    Shared helpers (activation taps on producer outputs, filter weights in group order,
    finalizing scores) live in ``compressor/criteria/_common.py``.
    """

    name: str = ""
    description: str = ""
    paper: str = ""
    needs_data: bool = False
    needs_labels: bool = False
    needs_gradients: bool = False

    @abstractmethod
    def score(self, ctx: ScoringContext) -> Scores:
        """Return one finite, non-negative score per channel of every prunable group.

        Higher means more important (kept first).
        """

    def propose_keep_ratios(self, ctx: ScoringContext) -> dict[int, float] | None:
        """Optionally propose a per-group keep ratio (0..1) that the width search scales.

        Criteria that set layer sparsity themselves (e.g. SNPFI) override this; the default
        lets the width search rank channels globally.
        """
        return None
