"""Train torchvision architectures on the CIFAR-10 JPEGs of ../shared, for the recovery benchmark.

The recovery recipe must hold on architectures other than the CIFAR ResNets it was developed on.
This script trains torchvision's own ``resnet18`` (a torchvision residual network, 1x1-conv
shortcuts) and ``mobilenet_v2`` (inverted residuals, depthwise convolutions), unchanged apart from
``num_classes=10``, on the 45,000 images of ``train.tar.gz`` with random crops and flips, and saves
their state_dicts outside the repository (``~/.cache/cnn-compressor/cifar/ARCH.pt``). Their stems
are ImageNet's (stride 4 for resnet18, 2 for mobilenet_v2, on 32x32 images), which keeps training
affordable on a CPU at the price of accuracy; the benchmark measures the change from each network's
own accuracy, so a modest starting point serves. ``vgg_cifar`` (``bench/cifar_models.py``) is a
plain VGG-style network at CIFAR resolution: eight conv-BN-ReLU layers, max pooling, two linear layers.
``cifar_mobilenet_v2_half`` is the MobileNetV2 of ``bench/cifar_shapes.py`` (CIFAR stem, as community
repositories write it) at half width: inverted residuals trained at full resolution.

Run: python bench/train_cifar.py --arch resnet18 && python bench/train_cifar.py --arch mobilenet_v2
     python bench/train_cifar.py --arch vgg_cifar
     python bench/train_cifar.py --arch cifar_mobilenet_v2_half --epochs 6
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import CIFAR_MEAN, CIFAR_STD, TRAIN, VAL, require_shared

CACHE = Path.home() / ".cache" / "cnn-compressor" / "cifar"
ARCHS = ("resnet18", "mobilenet_v2", "vgg_cifar", "cifar_mobilenet_v2_half")


def build(arch: str) -> torch.nn.Module:
    """The architecture ``arch`` with 10 outputs, randomly initialised (torchvision's, or ours for vgg_cifar)."""
    if arch == "vgg_cifar":
        from cifar_models import vgg_cifar

        return vgg_cifar()
    if arch == "cifar_mobilenet_v2_half":  # CIFAR stem (stride 1), half width: 24 M multiply-accumulates
        from cifar_shapes import build as build_shape

        return build_shape("cifar_mobilenet_v2", width=0.5)
    import torchvision.models as tvm

    return tvm.get_model(arch, weights=None, num_classes=10)


def weights_path(arch: str) -> Path:
    return CACHE / f"{arch}.pt"


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crops and horizontal flips, one draw per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, images.shape[1], h, w)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, images.shape[1], h, w)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None],
                 rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--limit", type=int, default=None, help="train on a subset (a quick check; saves nothing)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from compressor.data import load_images
    from compressor.evaluate import predict

    start = time.perf_counter()
    train = load_images(TRAIN, labelled=True, limit=args.limit, mean=CIFAR_MEAN, std=CIFAR_STD, what="training")
    val = load_images(VAL, labelled=True, mean=CIFAR_MEAN, std=CIFAR_STD, what="evaluation")
    print(f"{len(train.images)} training and {len(val.images)} val images read in {time.perf_counter() - start:.1f} s",
          flush=True)
    model = build(args.arch).to(memory_format=torch.channels_last)  # about 20% faster on a CPU
    steps_per_epoch = math.ceil(len(train.images) / args.batch)
    if steps_per_epoch * args.epochs < 8:  # the one-cycle schedule needs a few steps per phase
        raise SystemExit(f"only {steps_per_epoch * args.epochs} training steps; raise --limit or --epochs")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                   steps_per_epoch=steps_per_epoch, pct_start=0.25)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train.images), generator=generator)
        seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
        for step in range(steps_per_epoch):
            idx = order[step * args.batch:(step + 1) * args.batch]
            x = augment(train.images[idx], generator).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
        acc = float((predict(model, val.images, batch_size=500).argmax(1) == val.labels).float().mean())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.3f}, val {acc:.2%}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    if args.limit is not None:  # a quick check must not replace the benchmark's weights
        print(f"not saved (trained on a --limit subset; val {acc:.2%})")
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights_path(args.arch))
    print(f"saved {weights_path(args.arch)} (val {acc:.2%})")


if __name__ == "__main__":
    main()
