"""Depth probe: what skipping whole residual blocks of ResNet-56 costs, before and after a least-squares refit.

The pipeline prunes channels only. This benchmark measures whether removing blocks would be a
cheaper way to the same FLOPs. Every block whose shortcut is an identity (24 of ResNet-56's 27;
each is 1/27 of the convolutions' MACs) is replaced by its shortcut alone, one at a time, and the
network's accuracy and KL divergence from the original (on the calibration images) are measured
without any recovery. Then a few sets of the cheapest blocks are skipped together and every later
conv/linear layer is refit by least squares to the original's outputs (``refit_layers``, the
``lsq`` recovery's solve; its hook path, since the skipped network's graph differs from the
original's).

Writes bench/results/depth.md. Run: python bench/depth.py [--val 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from common import CIFAR_MEAN, CIFAR_STD, MODELS, REPO, TRAIN, VAL, require_shared, write_table
from torch import nn

CALIB = 1024
SETS = (("layer3.8",), ("layer2.7",), ("layer1.6",), ("layer2.7", "layer1.6"),
        ("layer2.7", "layer2.6", "layer2.5", "layer1.6", "layer1.8"))


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def skipped(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` whose named blocks (``layerS.J``) are replaced by the identity."""
    out = copy.deepcopy(model)
    for name in names:
        stage, index = name.split(".")
        getattr(out, stage)[int(index)] = nn.Identity()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    from recovery import sys_path_models

    sys_path_models()
    from shared_resnet import load

    from compressor.data import load_images
    from compressor.graph import count_macs_params
    from compressor.recovery.lsq import refit_layers

    calib = load_images(TRAIN, limit=CALIB, seed=0, mean=CIFAR_MEAN, std=CIFAR_STD).images
    val = load_images(VAL, limit=args.val, seed=0, mean=CIFAR_MEAN, std=CIFAR_STD, labelled=True)
    original = load(str(MODELS / "resnet56-cifar10-jpeg.pt"))
    ref = logits(original, calib).log_softmax(1)

    def measure(model: nn.Module) -> tuple[float, float]:
        kl = F.kl_div(logits(model, calib).log_softmax(1), ref, log_target=True, reduction="batchmean")
        return float((logits(model, val.images).argmax(1) == val.labels).float().mean()), float(kl)

    base, _ = measure(original)
    macs0 = count_macs_params(original, calib[:1])[0]
    order = [f"layer{s}.{j}" for s in (1, 2, 3) for j in range(len(getattr(original, f"layer{s}")))]
    singles = []
    for name in order:
        if not isinstance(original.get_submodule(name).shortcut, nn.Identity):
            continue
        acc, kl = measure(skipped(original, (name,)))
        singles.append([name, f"{acc:.2%} ({100 * (acc - base):+.2f})", f"{kl:.3f}"])
        print(singles[-1], flush=True)
    singles.sort(key=lambda row: float(row[2]))

    combos = []
    for names in SETS:
        model = skipped(original, names)
        acc0, kl0 = measure(model)
        first = min(order.index(n) for n in names)
        following = [n for n in order[first + 1 :] if n not in names]
        start = f"{following[0]}.conv1" if following else "linear"
        width = model.get_submodule(start).weight.shape[1]
        t0 = time.perf_counter()
        refit_layers(original, model, {start: {"in": list(range(width))}}, calib)
        seconds = time.perf_counter() - t0
        acc1, kl1 = measure(model)
        removed = 1 - count_macs_params(model, calib[:1])[0] / macs0
        combos.append([", ".join(names), f"{removed:.1%}", f"{acc0:.2%} ({100 * (acc0 - base):+.2f})",
                       f"{kl0:.3f}", f"{acc1:.2%} ({100 * (acc1 - base):+.2f})", f"{kl1:.3f}", f"{seconds:.1f}"])
        print(combos[-1], flush=True)

    out = REPO / "bench" / "results" / "depth.md"
    notes = [
        f"ResNet-56 (`../shared/models/resnet56-cifar10-jpeg.pt`), original {base:.2%} on {len(val.images):,} val "
        f"images (seeded subset); KL: divergence of the softmax from the original's on the {CALIB:,} calibration "
        "images. Each skippable block holds 3.8% of the network's MACs. The first blocks of stages 2 "
        "and 3 change the width and are not skippable. Rows sorted by KL.",
    ]
    write_table(out, "ResNet-56: skipping one residual block, no recovery",
                ["block", "top-1 (change)", "KL"], singles, notes)
    write_table(out, "ResNet-56: skipping blocks, then a least-squares refit of every later layer",
                ["blocks", "MACs removed", "top-1, no recovery", "KL", "top-1 after refit", "KL after",
                 "refit s"], combos,
                [f"`refit_layers` on {CALIB:,} calibration images, {args.threads} torch threads."], append=True)


if __name__ == "__main__":
    main()
