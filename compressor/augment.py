"""More calibration images from few: mirrored and shifted copies of them for the recovery (``--augment``).

``lsq`` and ``block`` fit the pruned network to the original's activations on the calibration images,
and fit better with more of them: ResNet-56 kept 2-3 points more at 50% / 40% FLOPs with 256 real
images than with 64 (README, recovery table). With fewer than AUGMENT_BELOW images, real or
synthesized (``compressor.synthesize``), the recovery therefore runs on the images plus copies of
them, MAX_FACTOR times their number at most AUGMENT_TO, each copy mirrored left to right with
probability 1/2 and shifted by up to a quarter of its size (the border reflected), as image
classifiers are trained. The criterion and the width allocation keep the images alone.

Copies keep the index of the image they come from (``sources``), so that held-out checks hold out
whole source images and never grade a fit on copies of the images it was fitted to.

Measured (eighteenth session, whole ``compress`` runs, seed 0, 5,000 val images; README "Few
calibration images"). Images alone -> copies for the recovery, 50% / 40% FLOPs: ResNet-56 with 64
images 81.52 / 79.46% -> 83.92 / 80.96%, with 32 images 80.54 / 73.32% -> 82.92 / 75.32%; ResNet-20
(PNG-trained) with 64 74.20 / 66.50% -> 74.94 / 67.60%, with 32 68.02 / 61.32% -> 70.86 / 63.90%.
A first version also fed the copies to the criterion and the allocation: +0.17 points on average
over the same cells, and ResNet-20 with 32 images lost 7.3 points at 40% (its probe refits were
fitted on copies of the probe images). With 256 images that version was level with the images alone
(+0.14 points on average over eight cells of four networks, ``bench/results/augment.md``), and the
first threshold was 256. Copies for the recovery only were then measured with more images (nineteenth
session, ``bench/recovery.py --augment``, strided subsets, five networks at 50% / 40%): 256 images
(256 -> 1,024) +0.44 points on average over ten cells (-0.24 to +1.65), 512 images (512 -> 1,024)
+0.11 (-0.22 to +0.70). Whole runs with 256 images, seeds 0 and 1: ResNet-56 -0.15 points on average
over four cells, ResNet-20 +1.69. Hence AUGMENT_BELOW = 512.

The shifts (nineteenth session, 64 images brought to 512, 50% / 40% FLOPs): up to a quarter of the
image against an eighth, ``bench/recovery.py --augment``, ResNet-56 +0.10 / +0.34, ResNet-20 -0.35 /
+0.80 (2,000 val), ``vgg_cifar`` +0.10 / +0.36, ``cifar_mobilenet_v2_half`` +0.28 / +0.48, DigitsNet
0.00 / -0.45 (two of its 450 images): +0.17 points on average. Whole runs (seeds 0 and 1): ResNet-56
84.48 / 81.88% and 84.24 / 81.50% against 83.92 / 80.96% and 83.64 / 80.88%; ResNet-20 (seed 0)
74.98 / 67.26% against 74.94 / 67.60%. Up to a sixteenth lost 0.54 points on average on the two
ResNets (bench). With 128 synthesized images, ResNet-56 (seed 0): 83.38 / 81.68% against 83.32 / 81.70%.
Hence SHIFT_DIVISOR = 4 (an eighth before; every other figure here ran with an eighth).

128 synthesized images: ResNet-56 82.08 / 79.54% -> 83.32 / 81.70%, ResNet-20 69.46 / 63.22% -> 70.40 /
62.80%, ``vgg_cifar`` 74.90 / 72.22% -> 75.30 / 73.28% (the first version: 84.84 / 81.16%, 67.04 / 60.80%,
73.08 / 70.56%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENT_BELOW = 512  # sets this large or larger are used as they are (copies measured level with them)
AUGMENT_TO = 1024  # the default calibration size: smaller sets grow up to it
MAX_FACTOR = 8  # at most this many images (the image itself included) from each source image
SHIFT_DIVISOR = 4  # shifts reach 1/SHIFT_DIVISOR of the shorter side (module docstring: 4 measured above 8 and 16)


def augmented_count(n: int, forced: bool = False) -> int:
    """How many images the pipeline makes of ``n``: MAX_FACTOR x n up to AUGMENT_TO, but n itself from
    AUGMENT_BELOW on unless ``forced`` (``--augment``)."""
    if n >= AUGMENT_BELOW and not forced:
        return n
    return max(n, min(AUGMENT_TO, MAX_FACTOR * n))


def shift_of(height: int, width: int) -> int:
    """Largest shift in pixels: a quarter of the shorter side (8 for 32x32), at least 1 but less than both
    sides (0 for an image one pixel high or wide: reflection needs a neighbour)."""
    return min(max(1, min(height, width) // SHIFT_DIVISOR), height - 1, width - 1)


def expand(images: torch.Tensor, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` followed by ``count - len(images)`` flipped and shifted copies of them.

    Copy ``j`` (0-based after the originals) comes from image ``j mod len(images)``: each image is
    copied in turn, so every source image has the same number of copies, give or take one.

    Args:
        images: N x C x H x W calibration images (normalized; the reflection keeps their statistics).
        count: Images wanted in all; ``count <= N`` returns the images unchanged.
        seed: Seed of the flips and shifts.

    Returns:
        (images, sources): the expanded set and the index of each image's source image (labels of the
        expanded set, should a caller have them: ``labels[sources]``).
    """
    n = len(images)
    if count <= n or n == 0:
        return images, torch.arange(n)
    sources = torch.arange(count) % n
    extra = sources[n:]
    gen = torch.Generator().manual_seed(seed)
    height, width = images.shape[-2:]
    pad = shift_of(height, width)
    copies = images[extra].clone()
    flip = torch.rand(len(extra), generator=gen) < 0.5
    copies[flip] = copies[flip].flip(-1)
    padded = F.pad(copies, (pad, pad, pad, pad), mode="reflect")
    top = torch.randint(0, 2 * pad + 1, (len(extra),), generator=gen).tolist()
    left = torch.randint(0, 2 * pad + 1, (len(extra),), generator=gen).tolist()
    for i, (dy, dx) in enumerate(zip(top, left, strict=True)):
        copies[i] = padded[i, :, dy : dy + height, dx : dx + width]
    return torch.cat([images, copies]).contiguous(), sources
