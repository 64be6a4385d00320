"""Helpers shared by the benchmark scripts: paths to ../shared and running the pipeline."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from compressor.allocator import keep_large_allocations

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS = SHARED / "models"
TRAIN = SHARED / "data" / "cifar10-jpeg" / "train.tar.gz"
VAL = SHARED / "data" / "cifar10-jpeg" / "val.tar.gz"
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


keep_large_allocations()  # benchmarks are processes of their own, like `compress`: same allocator setting


def require_shared() -> None:
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: the benchmarks need the reference data in ../shared beside the repo")


def run_cifar(weights: str, budget: str, depth: int = 56, **overrides) -> tuple[dict, float]:
    """Compress a CIFAR ResNet from ../shared; return (report dict, wall seconds)."""
    from compressor.config import CompressConfig
    from compressor.pipeline import run

    with tempfile.TemporaryDirectory() as tmp:
        settings = dict(
            model=f"{REPO / 'bench' / 'cifar_models.py'}:resnet{depth}",
            weights=MODELS / weights, budget=budget, out=Path(tmp) / "run", calib=TRAIN, eval=VAL,
            mean=CIFAR_MEAN, std=CIFAR_STD, progress=False, iters=30, warmup=5, eval_before_recovery=True,
        )
        settings.update(overrides)
        start = time.perf_counter()
        report = run(CompressConfig(**settings))
        return report.data, time.perf_counter() - start


def write_table(path: Path, title: str, header: list[str], rows: list[list[str]], notes: list[str],
                append: bool = False) -> None:
    """Write a Markdown table under ``title`` and ``notes``; ``append`` adds it after what ``path`` holds."""
    lines = [f"# {title}", ""] + notes + ["", "| " + " | ".join(header) + " |",
                                           "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text() + "\n" if (append and path.exists()) else ""
    path.write_text(previous + text)
    print(text)
