"""``compress demo``: a small CNN trained once on scikit-learn's digits, then compressed.

Needs no downloads: the digits (8x8 grayscale, 1,797 images) ship inside scikit-learn. The
trained weights and the images (as PNG class folders) are cached under ``--cache``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

MEAN = (0.3,)
STD = (0.4,)


class DigitsNet(nn.Module):
    """A VGG-style network for 1 x 16 x 16 digits (upsampled from 8 x 8)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128),
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _write_pngs(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    from PIL import Image

    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / str(label)
        target.mkdir(parents=True, exist_ok=True)
        pixels = (img * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((16, 16), Image.BILINEAR).save(target / f"{i:04d}.png")


def prepare(cache: Path, epochs: int = 20, seed: int = 0, log=print) -> dict[str, Path]:
    """Train the demo network once and write its data; return the paths ``compress`` needs."""
    from sklearn.datasets import load_digits

    cache = Path(cache)
    weights = cache / "digits_net.pt"
    train_dir, val_dir = cache / "train", cache / "val"
    if not (weights.exists() and train_dir.is_dir() and val_dir.is_dir()):
        digits = load_digits()
        order = np.random.default_rng(seed).permutation(len(digits.images))
        cut = int(0.75 * len(order))
        tmp = cache.with_name(cache.name + ".partial")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        _write_pngs(digits.images[order[:cut]], digits.target[order[:cut]], tmp / "train")
        _write_pngs(digits.images[order[cut:]], digits.target[order[cut:]], tmp / "val")
        log(f"training the demo network on {cut} digits (once; cached in {cache})")
        model = _train(tmp / "train", epochs, seed)
        torch.save(model.state_dict(), tmp / "digits_net.pt")
        shutil.rmtree(cache, ignore_errors=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(cache)
    return {"model": Path(__file__).with_suffix(".py"), "weights": weights, "calib": train_dir, "eval": val_dir}


def _train(train_dir: Path, epochs: int, seed: int) -> nn.Module:
    from compressor.data import load_images

    data = load_images(train_dir, mean=MEAN, std=STD, labelled=True)
    torch.manual_seed(seed)
    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(data.images) + 63) // 64))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.images))
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
