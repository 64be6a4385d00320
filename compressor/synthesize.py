"""Calibration images synthesized from the model itself, for pruning without data (``--synthesize``).

A trained network's BatchNorm layers remember its training data: each ``BatchNorm2d`` holds the
running mean and variance of its input. Following ZeroQ (Cai et al., CVPR 2020) and DeepInversion
(Yin et al., CVPR 2020), a batch of Gaussian noise images is optimized, the network frozen in eval
mode, so that at every BatchNorm the batch's per-channel mean and standard deviation match the
running ones; a small cross-entropy term pulls image ``i`` toward class ``i mod K`` (DeepInversion's
class-conditional term), so the set covers the model's classes evenly. The images then serve as
calibration data for the usual criterion, width allocation and recovery (no labels are used).

Without ``--calib`` this is the default for a model with trained BatchNorm layers, unless the work
(forward MACs x images x steps) exceeds what a CPU does in a few minutes; then the pipeline falls
back to pruning by the weights alone and merging (``datafree``) and says how to force it.

Measured (seventeenth session; ResNet-56 of ``../shared/models``, 88.80% on the 5,000 val images,
2-core CPU with native bfloat16). A prototype (one batch of 128 images, ``torch.optim.Adam``): 200
steps took 120 s; the images were predicted 12-13 per class; as calibration data (criterion
``reconstruction``, sensitivity allocation) ``lsq`` gave 80.86% / 76.30% at 50% / 40% FLOPs and
``lsq,block`` 81.40% / 76.86%. Whole ``compress`` runs without ``--calib`` (``bench/whole_run.py
--synthesize 128``, seeds 0 / 1): 82.08 / 82.12% at 50% and 79.54 / 79.04% at 40% FLOPs in 153-159 s,
the 128 images optimized as one batch; in two batches of 64 (a 2 GB activation budget) 81.84 /
80.94% and 77.10 / 76.70%. ``--synthesize 0`` (``l1``, one global ranking, ``datafree`` merging)
gave 10.42% / 10.00% in 20 s. Not adopted: DeepInversion's random jitter (shifts of up to 2 pixels)
and horizontal flips of the images at every step, 82.06% / 76.48% (seed 0) against 82.08% / 79.54%;
256 images for 100 steps (the same work, two batches of 128), 81.22% / 78.54%. Since the eighteenth
session the recovery also runs on mirrored and shifted copies of the images (``compressor.augment``,
as for few real images): 83.32% / 81.70% (seed 0). Fed to every stage, the copies had given 84.84 /
84.22% and 81.16 / 80.94% but lost about 2 points on ResNet-20 and ``vgg_cifar``; with them there,
100 steps instead of 200 gave 85.10% / 79.78% (seed 0).

Not adopted either (twentieth session): DeepInversion's smoothness prior, the mean squared difference of
neighbouring pixels added to the loss. Without it the images stay as rough as the noise they start from (that
measure 3.48 on 64 images after 200 steps, against 0.35 for real calibration images; weight 0.1 brought it to
0.30, the BatchNorm mismatch ending at 0.015 instead of 0.009). Whole runs (``bench/whole_run.py --synthesize
128``, seed 0, copies for the recovery): weight 0.1 83.60% / 81.30%, weight 0.02 83.70% / 81.06%, against
83.38% / 81.68% without: level on average (-0.08 and -0.15 points). A tenfold weight on the first
BatchNorm's mismatch (DeepInversion's first-layer multiplier): 83.90% / 80.78% (seed 0). 100 steps instead of
200 (half the synthesis time: 60-67 s against 114-133 s): 82.78% / 78.90% (seed 0) and 84.06% / 80.04% (seed
1), against 83.38% / 81.68% and 84.10% / 81.46% with 200 (``bench/results/whole_run.md``, first table).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compressor.recovery.blockwise import CosineAdam
from compressor.recovery.common import bf16_supported, leaf_output_bytes

DEFAULT_IMAGES = 128
STEPS = 200
LEARNING_RATE = 0.1  # Adam on the pixels (normalized units), cosine decay to zero
CLASS_WEIGHT = 0.1  # weight of the cross-entropy toward each image's assigned class
# Default synthesis only below this much work (forward MACs x images x steps) on a CPU: ResNet-56 at
# 32x32 (125 M MACs) with 128 images and 200 steps is 3.2e12, about two minutes on 2 cores.
CPU_WORK_LIMIT = 8e12
CUDA_WORK_LIMIT = 1e15
ACTIVATION_BUDGET = 4e9  # bytes of activations and gradients per batch: ResNet-56's 128 images in one (docstring)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm2d with running statistics to match."""
    return any(isinstance(m, nn.BatchNorm2d) and m.running_mean is not None for m in model.modules())


def _initial_statistics(model: nn.Module) -> bool:
    """Whether every BatchNorm2d still has its initial running statistics (mean 0, variance 1)."""
    return all(bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None)


def default_count(model: nn.Module, macs: float, device: str | torch.device) -> tuple[int, str]:
    """(images to synthesize by default without --calib, why none when 0)."""
    if not has_batchnorm(model):
        return 0, "the model has no BatchNorm2d layers whose statistics could stand in for data"
    if _initial_statistics(model):
        return 0, "its BatchNorm statistics are still the initial ones, as in an untrained model"
    limit = CUDA_WORK_LIMIT if torch.device(device).type == "cuda" else CPU_WORK_LIMIT
    work = macs * DEFAULT_IMAGES * STEPS
    if work > limit:
        return 0, (f"synthesizing {DEFAULT_IMAGES} calibration images would take {work / limit:.0f}x the few "
                   f"minutes allowed on {torch.device(device).type} by default")
    return DEFAULT_IMAGES, ""


def _batch_size(model: nn.Module, shape: tuple[int, ...], count: int, device: str,
                dtype: torch.dtype = torch.float32) -> int:
    """How many images one optimized batch holds within ACTIVATION_BUDGET."""
    x1 = torch.zeros(1, *shape, device=device, dtype=dtype)
    per_image = max(1, sum(leaf_output_bytes(model, x1))) * 3  # activations kept for the backward, their gradients
    return max(1, min(count, int(ACTIVATION_BUDGET // per_image)))


def synthesize(model: nn.Module, shape: tuple[int, int, int], count: int, *, classes: int, seed: int = 0,
               device: str = "cpu", steps: int = STEPS, log: Callable[[str], None] | None = None) -> torch.Tensor:
    """``count`` images of ``shape`` (normalized, as the model takes them) synthesized from its BatchNorm statistics.

    The model is left as it was (eval mode, parameters and their ``requires_grad`` flags unchanged).
    ``classes``: the model's class count, for the class-conditional term; 0 drops that term (a model that
    outputs features).

    Returns:
        A float32 ``count x C x H x W`` tensor on the CPU.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    was_training = model.training
    model.eval()
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gaps: list[torch.Tensor] = []

    def hook(module, inputs, _out):
        x = inputs[0].float()
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        target_std = (module.running_var.float() + module.eps).sqrt()
        gaps.append(((mean - module.running_mean.float()) ** 2).sum()
                    + (((var + module.eps).sqrt() - target_std) ** 2).sum())

    handles = [m.register_forward_hook(hook) for m in norms]
    first_param = next(model.parameters(), None)
    dtype = first_param.dtype if first_param is not None and first_param.is_floating_point() else torch.float32
    # bfloat16 autocast where the CPU has it, unless grouped convolutions (depthwise ones are slower in it:
    # 10 steps of 64 images on the CIFAR MobileNetV2 took 5.0-5.2 s against 4.4-4.6 s in float32, where
    # ResNet-56 took 3.1 s against 4.0 s)
    low = (bf16_supported(device) and (first_param is None or first_param.dtype == torch.float32)
           and not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules()))
    gen = torch.Generator().manual_seed(seed)
    parts = -(-count // _batch_size(model, shape, count, device, dtype))
    sizes = [count // parts + (i < count % parts) for i in range(parts)]  # even: each matches the statistics alone
    start = time.perf_counter()
    out = []
    try:
        for first, n in zip(itertools.accumulate([0, *sizes[:-1]]), sizes, strict=True):
            x = torch.randn(n, *shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
            labels = (torch.arange(first, first + n) % classes).to(device) if classes > 0 else None
            opt = CosineAdam([x], LEARNING_RATE, steps)  # torch.optim would import torch._dynamo (2 s)
            for step in range(steps):
                gaps.clear()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
                    logits = model(x)
                mismatch = torch.stack(gaps).sum() / max(1, len(gaps))
                loss = mismatch
                if labels is not None:
                    loss = loss + CLASS_WEIGHT * F.cross_entropy(logits.float(), labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if log is not None and (step + 1) % 50 == 0:
                    log(f"synthesize: images {first + 1}-{first + n} of {count}, step {step + 1}/{steps}, "
                        f"BatchNorm mismatch {float(mismatch.detach()):.4f} ({time.perf_counter() - start:.0f} s)")
            out.append(x.detach().float().cpu())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.cat(out).contiguous()
