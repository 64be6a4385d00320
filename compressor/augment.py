"""More calibration images from few: mirrored and shifted copies of them (``--augment``).

Every stage that fits something to the calibration images (the criterion's statistics, the width
allocation's probes and refits, ``lsq`` and ``block``) does better with more of them: ResNet-56
kept 2-3 points more at 50% / 40% FLOPs with 256 real images than with 64 (README, recovery
table). A set of fewer than AUGMENT_BELOW real images therefore grows to MAX_FACTOR times its size (at
most AUGMENT_TO) with copies of its images, each mirrored left to right with probability 1/2 and shifted by
up to an eighth of its size (the border reflected), as image classifiers are trained.

Copies keep the index of the image they come from (``sources``), so that held-out checks hold out
whole source images and never grade a fit on copies of the images it was fitted to.

Measured (eighteenth session, ``bench/results/augment.md``: ``bench/recovery.py``, criterion
``reconstruction``, default allocation and recovery, seed 0). With 64 images, 512 after the copies,
at 50% / 40% FLOPs: ResNet-56 82.58 / 79.82% -> 84.44 / 81.86%, ``vgg_cifar`` 77.10 / 74.48% ->
77.26 / 75.30%, the CIFAR MobileNetV2 75.66 / 73.22% -> 75.44 / 74.06%, ResNet-20 (PNG-trained)
72.60 / 67.20% -> 72.75 / 67.90%, the DigitsNet 99.11 / 99.11% -> 99.11 / 98.89%: +0.61 points on
average. With 256 images brought up to 1,024 the cells moved by -0.75 to +1.80 points, +0.14 on
average, for 3-12 s more recovery: hence AUGMENT_BELOW. Synthesized images (``compressor.synthesize``) get
copies only when asked for (``--augment``): 128 of them brought up to 1,024 gave ResNet-56 84.84 /
84.22% against 82.08 / 82.12% at 50% FLOPs (whole runs, seeds 0 / 1) and 81.16 / 80.94% against 79.54 /
79.04% at 40%, but ResNet-20 (PNG-trained) 67.04 / 60.80% against 69.46 / 63.22% and ``vgg_cifar``
73.08 / 70.56% against 74.90 / 72.22% at 50% / 40% (seed 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENT_BELOW = 256  # sets this large or larger are used as they are (copies measured level with them)
AUGMENT_TO = 1024  # the default calibration size: smaller sets grow up to it
MAX_FACTOR = 8  # at most this many images (the image itself included) from each source image


def augmented_count(n: int, forced: bool = False) -> int:
    """How many images the pipeline makes of ``n``: MAX_FACTOR x n up to AUGMENT_TO, but n itself from
    AUGMENT_BELOW on unless ``forced`` (``--augment``)."""
    if n >= AUGMENT_BELOW and not forced:
        return n
    return max(n, min(AUGMENT_TO, MAX_FACTOR * n))


def shift_of(height: int, width: int) -> int:
    """Largest shift in pixels: an eighth of the shorter side (4 for 32x32), at least 1, less than both sides."""
    return max(1, min(min(height, width) // 8, height - 1, width - 1))


def expand(images: torch.Tensor, count: int, seed: int = 0,
           labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``images`` followed by ``count - len(images)`` flipped and shifted copies of them.

    Copy ``j`` (0-based after the originals) comes from image ``j mod len(images)``: each image is
    copied in turn, so every source image has the same number of copies, give or take one.

    Args:
        images: N x C x H x W calibration images (normalized; the reflection keeps their statistics).
        count: Images wanted in all; ``count <= N`` returns the images unchanged.
        seed: Seed of the flips and shifts.
        labels: Optional N labels, repeated for the copies (a flip or shift keeps an image's class).

    Returns:
        (images, sources, labels): the expanded set, the index of each image's source image, and the
        labels of the expanded set (None without ``labels``).
    """
    n = len(images)
    sources = torch.arange(max(n, count)) % max(1, n)
    if count <= n or n == 0:
        return images, torch.arange(n), labels
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
    out_labels = labels[sources] if labels is not None else None
    return torch.cat([images, copies]).contiguous(), sources, out_labels
