"""The interface every recovery method (accuracy repair without retraining) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compressor.groups import ChannelGroup, Plan


@dataclass(frozen=True)
class RecoveryContext:
    """What a recovery method may use.

    Attributes:
        original: The unpruned model (eval mode). Never modified.
        pruned: The physically pruned model; module names match ``original``. Methods modify
            it in place.
        groups: Channel groups of the original model.
        plan: Kept channel indices per group id (group channel space).
        kept: Replayable record: module name -> {"in": kept input indices, "out": kept output
            indices} in the original module's index space (absent key = dimension untouched).
        calib: Unlabelled calibration inputs (N x C x H x W, CPU), or None when data-free.
        sources: For each calibration image, the index of the image it was copied from
            (``compressor.augment``), so that held-out checks hold out whole source images; None:
            every image is its own source.
        device: Torch device for the passes.
        batch_size: Batch size for the passes.
        log: Receives progress lines from long methods (None: silent).
        output: ``"logits"`` (class scores) or ``"features"`` (an embedding): how the held-out check
            of ``recipe.run_recipe`` measures the distance to the original.
    """

    original: nn.Module
    pruned: nn.Module
    groups: list[ChannelGroup]
    plan: Plan
    kept: dict[str, dict[str, list[int]]]
    calib: torch.Tensor | None
    sources: torch.Tensor | None = None
    device: str = "cpu"
    batch_size: int = 64
    log: Callable[[str], None] | None = None
    output: str = "logits"


class RecoveryMethod(ABC):
    """One step of a recovery recipe. Uses no labels."""

    name: str = ""
    description: str = ""
    needs_data: bool = True

    @abstractmethod
    def apply(self, ctx: RecoveryContext) -> None:
        """Modify ``ctx.pruned`` in place to bring its outputs closer to ``ctx.original``."""
