"""Models that output features: ResNet-56 without its classifier, compressed against its own output.

A self-supervised backbone is deployed without classes: its output is an embedding, and whatever head
reads it is trained elsewhere. This benchmark stands one in with the trained ResNet-56 of ../shared cut
before its classifier (``bench/cifar_models.py:resnet56_features``, 64 pooled features), compresses it
with ``--model-output features`` and, for comparison, as if its output were class scores (the default
``logits``: the criteria's targets are then the largest feature's index, and the allocation and the
recovery's check compare softmax distributions over the features), and measures the pruned backbone's
features on all 5,000 val images against the original's: the accuracy of the original classifier read
on them (a frozen linear head, which the run never saw), their cosine similarity and their squared
error relative to the original features' energy. Defaults otherwise: 1,024 calibration images, the
data-driven criterion, sensitivity allocation, recovery ``lsq,block``; no labels anywhere.

Writes bench/results/features.md. Run: python bench/features.py [--budgets 50,40] [--criteria reconstruction,taylor]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import CIFAR_MEAN, CIFAR_STD, MODELS, REPO, TRAIN, VAL, require_shared, write_table

WEIGHTS = MODELS / "resnet56-cifar10-jpeg.pt"


@torch.no_grad()
def features_of(model: torch.nn.Module, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """``model``'s outputs over ``images`` (a module in eval mode, or a ``torch.export`` program's module)."""
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="50,40", help="FLOPs budgets in percent, comma-separated")
    parser.add_argument("--criteria", default="default,taylor",
                        help="criteria, comma-separated ('default': the pipeline's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "features.md")
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(2)
    from compressor.config import CompressConfig
    from compressor.data import load_images
    from compressor.pipeline import run

    spec = f"{REPO / 'bench' / 'cifar_models.py'}:resnet56_features({str(WEIGHTS)!r})"
    val = load_images(VAL, input_shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, labelled=True)
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
    head = torch.nn.Linear(64, 10)
    head.load_state_dict({"weight": state["linear.weight"].float(), "bias": state["linear.bias"].float()})
    import importlib.util

    factory = importlib.util.spec_from_file_location("cifar_models", REPO / "bench" / "cifar_models.py")
    cifar_models = importlib.util.module_from_spec(factory)
    factory.loader.exec_module(cifar_models)
    reference = features_of(cifar_models.resnet56_features(str(WEIGHTS)).eval(), val.images)
    with torch.no_grad():
        original_acc = float((head(reference).argmax(1) == val.labels).float().mean())
    print(f"original: {original_acc:.2%} with its classifier on the 64 features")
    rows = []
    for budget in [f"{b}%flops" for b in args.budgets.split(",")]:
        for criterion in args.criteria.split(","):
            for mode in ("features", "logits"):
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "run"
                    config = CompressConfig(
                        model=spec, budget=budget, out=out, calib=TRAIN, mean=CIFAR_MEAN, std=CIFAR_STD,
                        progress=False, latency=False, model_output=mode,
                        criterion=None if criterion == "default" else criterion,
                    )
                    start = time.perf_counter()
                    report = run(config).data
                    seconds = time.perf_counter() - start
                    pruned = torch.export.load(out / "model.pt2").module()
                    got = features_of(pruned, val.images)
                with torch.no_grad():
                    acc = float((head(got).argmax(1) == val.labels).float().mean())
                cosine = float(torch.nn.functional.cosine_similarity(got, reference, dim=1).mean())
                error = float((got - reference).pow(2).sum() / reference.pow(2).sum())
                rows.append([budget, report["criterion"], f"`{mode}`", f"{original_acc:.2%} -> {acc:.2%}",
                             f"{cosine:.4f}", f"{error:.4f}", f"{report['flops']['ratio']:.1%}", f"{seconds:.1f}"])
                print(" | ".join(rows[-1]))
    notes = [
        "The README's reference data and ResNet-56 cut before its classifier (`bench/cifar_models.py:"
        "resnet56_features`), compressed by `compressor.pipeline.run` with `--model-output features` or the default "
        "`logits`; 1,024 calibration images, no labels, no latency. Columns: accuracy of the original classifier "
        "read on the pruned backbone's features (all 5,000 val images), their mean cosine similarity to the "
        "original features and their squared error relative to the original features' energy.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads. `python bench/features.py "
        f"--budgets {args.budgets} --criteria {args.criteria}`.",
    ]
    header = ["budget", "criterion", "--model-output", "top-1 with the original head", "cosine", "relative error",
              "FLOPs kept", "run s"]
    write_table(args.out, "resnet56 cut before its classifier: compressed against its own output", header, rows,
                notes)


if __name__ == "__main__":
    main()
