"""The configuration of one ``compress`` run (frozen; ``None`` means the default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import UsageError

DEFAULT_CRITERION = "l1"  # without calibration data, or with fewer than DATA_CRITERION_MIN_IMAGES images
DATA_CRITERION = "reconstruction"  # the default with enough calibration data (bench/results/recovery.md)
DATA_CRITERION_MIN_IMAGES = 64  # with 32 images l1 did better on ResNet-56 (README, criteria section)
DEFAULT_CALIB_SIZE = 1024
ALLOCATIONS = ("global", "uniform", "sensitivity", "criterion")
MODEL_OUTPUTS = ("logits", "features")


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``pipeline.run`` needs.

    Attributes:
        model: ``torchvision:NAME``, ``file.py:CALLABLE`` (either optionally with literal arguments,
            e.g. ``file.py:Net(depth=20)``) or a pickled ``model.pt``.
        budget: Budget text (``50%flops``, ``3ms``, ``2x``); see ``budget.parse_budget``.
        out: Output folder (written atomically).
        weights: Optional state_dict file.
        trust_pickle: Allow unpickling a whole-model file.
        calib: Calibration data (folder, tar, .pt/.npy); None for data-free pruning.
        calib_size: Number of calibration images drawn at random (None: 1024).
        synthesize: Without ``calib``: images to synthesize from the model's BatchNorm statistics
            and use as calibration data (None: 128 when the model has BatchNorm layers and is small
            enough for the device, see ``synthesize.default_count``; 0: none, prune by the weights).
        augment: Recover with mirrored and shifted copies of the calibration images added (None:
            for fewer than ``augment.AUGMENT_BELOW`` images, real or synthesized; False: never; True:
            for any set under ``augment.AUGMENT_TO``; see ``augment.augmented_count``).
        eval: Labelled images in class folders for top-1 accuracy; None skips accuracy.
        eval_size: Use at most this many evaluation images (None: all).
        eval_before_recovery: Also measure the accuracy of the pruned model before recovery
            (a diagnostic: one more pass over the evaluation images).
        input_shape: (C, H, W); None takes it from the calibration data.
        mean, std: Per-channel normalization (None: ImageNet's).
        criterion: Registry name of the channel criterion (None: ``reconstruction`` with at least
            64 calibration images, else ``l1``; see ``criterion_for``).
        labels: Let criteria use the calibration data's class-folder labels.
        model_output: What the model returns: "logits" (class scores, the default) or "features" (an
            embedding or feature maps, e.g. a self-supervised backbone): criteria then score against the model's own
            output vector, and the allocation and the recovery's held-out check measure the relative
            squared error of the output instead of a KL divergence between class distributions.
        output_key: For a model returning a dict or a tuple: the key (or position) of the output to
            compress against, e.g. ``out`` for torchvision's segmentation models (None: the only tensor
            entry; several are an error).
        recovery: Ordered recovery recipe; None: the default recipe; () or ("none",): none.
        allocation: How widths are chosen: "global" ranking, "uniform", "sensitivity"
            (measured recoverability), "criterion" (widths proposed by the criterion).
        remove_branches: Remove residual branches the width search leaves with one channel, keeping
            their mean contribution as a constant (``graph.branches``): fewer layers, faster at batch 1,
            and on ResNet-56 0.3 points lower at 40% FLOPs on average (README). None: remove them under
            latency budgets (the search then times candidates without them), keep them under FLOPs
            budgets; see ``removes_branches``.
        ignore: Module-name globs never pruned.
        min_channels: Per-group floor of kept channels (None: sensible default).
        align: Round every group's width to the device's channel alignment; False: any width (None:
            every group on GPU targets, the groups of 32 or more channels on a CPU).
        device: ``cpu``, ``cuda`` or a profile name / alias (e.g. ``jetson``).
        fp16: Time CUDA latency in half precision.
        batch_size: Batch size of the latency measurement.
        warmup, iters: Latency warm-up and timed iterations.
        latency: Measure latency at all.
        max_accuracy_drop: Fail with exit 3 when accuracy drops more (points).
        force: Replace a non-empty ``out``.
        seed: Seed of the calibration subset and randomized criteria.
        progress: Show progress bars.
    """

    model: str
    budget: str
    out: Path
    weights: Path | None = None
    trust_pickle: bool = False
    calib: Path | None = None
    calib_size: int | None = None
    synthesize: int | None = None
    augment: bool | None = None
    eval: Path | None = None
    eval_size: int | None = None
    eval_before_recovery: bool = False
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    criterion: str | None = None
    labels: bool = False
    model_output: str | None = None
    output_key: str | None = None
    recovery: tuple[str, ...] | None = None
    allocation: str | None = None
    remove_branches: bool | None = None
    ignore: tuple[str, ...] = field(default_factory=tuple)
    min_channels: int | None = None
    align: bool | None = None
    device: str = "cpu"
    fp16: bool = False
    batch_size: int = 1
    warmup: int = 10
    iters: int = 50
    latency: bool = True
    max_accuracy_drop: float | None = None
    force: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.calib_size is not None and self.calib_size < 1:
            raise UsageError(f"--calib-size {self.calib_size} must be at least 1; e.g. 1024")
        if self.synthesize is not None and self.synthesize < 0:
            raise UsageError(f"--synthesize {self.synthesize} must be 0 (none) or more images; e.g. 128")
        if self.synthesize and self.calib is not None:
            raise UsageError(f"--synthesize {self.synthesize} replaces --calib; pass one of them")
        if self.eval_size is not None and self.eval_size < 1:
            raise UsageError(f"--eval-size {self.eval_size} must be at least 1")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if self.iters < 1 or self.warmup < 0:
            raise UsageError(f"--iters {self.iters} / --warmup {self.warmup} must be >= 1 / >= 0")
        if self.min_channels is not None and self.min_channels < 1:
            raise UsageError(f"--min-channels {self.min_channels} must be at least 1")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation {self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        if self.model_output is not None and self.model_output not in MODEL_OUTPUTS:
            raise UsageError(f"--model-output {self.model_output!r} is not one of {', '.join(MODEL_OUTPUTS)}")
        if self.output_key is not None and not self.output_key.strip():
            raise UsageError("--output-key is empty; pass a dict key (e.g. out) or a tuple position (e.g. 0)")
        if self.model_output == "features":
            for given, option in ((self.eval, "--eval"), (self.labels, "--labels"),
                                  (self.max_accuracy_drop is not None, "--max-accuracy-drop")):
                if given:
                    raise UsageError(f"{option} needs class outputs; a model with --model-output features has no "
                                     "classes: drop the option")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UsageError(f"--max-accuracy-drop {self.max_accuracy_drop} must be >= 0 points")

    def criterion_for(self, calibration_images: int) -> str:
        """The criterion: ``reconstruction`` with at least 64 calibration images (it measured
        ahead of ``l1`` on three networks), else ``l1`` (free, and ahead with 32 images)."""
        if self.criterion is not None:
            return self.criterion
        return DATA_CRITERION if calibration_images >= DATA_CRITERION_MIN_IMAGES else DEFAULT_CRITERION

    def allocation_for(self, has_calibration: bool) -> str:
        """The width allocation: measured sensitivity when there is data (it measured best), else global."""
        return self.allocation or ("sensitivity" if has_calibration else "global")

    def removes_branches(self, budget_kind: str) -> bool:
        """Whether one-channel residual branches are removed: as told, else under latency budgets only
        (ResNet-56 at 1.5x kept 3.4 points more with them removed; at 40% FLOPs 0.3 points less)."""
        if self.remove_branches is not None:
            return self.remove_branches
        return budget_kind != "flops"

    @property
    def output_kind(self) -> str:
        """``"logits"`` or ``"features"`` (``model_output`` with its default)."""
        return self.model_output or "logits"

    @property
    def recovery_recipe(self) -> tuple[str, ...] | None:
        """The recipe with ``none`` removed; None means the default recipe."""
        if self.recovery is None:
            return None
        return tuple(r for r in self.recovery if r != "none")
