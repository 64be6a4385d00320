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

Writes bench/results/features.md. Run: python bench/features.py [--budgets 50,40] [--criteria default,taylor];
the 64 x 8 x 8 feature maps before the pooling (a dense backbone): python bench/features.py --cut maps --append;
networks bench/train_cifar.py trained: python bench/features.py --model vgg_cifar --append (or cifar_mobilenet_v2_half)
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
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
    parser.add_argument("--model", choices=("resnet56", "vgg_cifar", "cifar_mobilenet_v2_half"), default="resnet56",
                        help="resnet56 of ../shared, or a network bench/train_cifar.py trained (~/.cache)")
    parser.add_argument("--cut", choices=("pooled", "maps"), default="pooled",
                        help="pooled: the 64 pooled features; maps: the 64 x 8 x 8 maps before the pooling")
    parser.add_argument("--append", action="store_true", help="append the table to --out instead of replacing it")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "features.md")
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(2)
    import importlib.util

    from compressor.config import CompressConfig
    from compressor.data import load_images
    from compressor.pipeline import run

    factory = importlib.util.spec_from_file_location("cifar_models", REPO / "bench" / "cifar_models.py")
    cifar_models = importlib.util.module_from_spec(factory)
    factory.loader.exec_module(cifar_models)
    if args.model == "resnet56":
        factory_name = "resnet56_features" if args.cut == "pooled" else "resnet56_feature_maps"
        spec = f"{REPO / 'bench' / 'cifar_models.py'}:{factory_name}({str(WEIGHTS)!r})"
        backbone, head = cifar_models.split_classifier("resnet56", cifar_models.load_trained("resnet56", str(WEIGHTS)))
        if args.cut == "maps":
            backbone = cifar_models.resnet56_feature_maps(str(WEIGHTS))
    else:
        if args.cut != "pooled":
            parser.error("--cut maps is for resnet56")
        factory_name = "trained_backbone"
        trained = Path.home() / ".cache" / "cnn-compressor" / "cifar" / f"{args.model}.pt"
        if not trained.is_file():
            parser.error(f"{trained} is absent: train it first with python bench/train_cifar.py --arch {args.model}")
        spec = f"{REPO / 'bench' / 'cifar_models.py'}:trained_backbone({args.model!r}, {str(trained)!r})"
        backbone, head = cifar_models.split_classifier(args.model, cifar_models.load_trained(args.model, str(trained)))
    head.eval()
    val = load_images(VAL, input_shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, labelled=True)
    reference = features_of(backbone.eval(), val.images)

    def classify(features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(features.mean((2, 3)) if features.dim() == 4 else features).argmax(1)

    original_acc = float((classify(reference) == val.labels).float().mean())
    print(f"original: {original_acc:.2%} with its classifier on the {tuple(reference.shape[1:])} features")
    rows = []
    for budget in [f"{b}%flops" for b in args.budgets.split(",")]:
        for criterion in args.criteria.split(","):
            # the default `logits` refuses a 4-D output: only the features mode can compress the maps
            for mode in ("features", "logits") if args.cut == "pooled" else ("features",):
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
                acc = float((classify(got) == val.labels).float().mean())
                cosine = float(F.cosine_similarity(got.flatten(1), reference.flatten(1), dim=1).mean())
                error = float((got - reference).pow(2).sum() / reference.pow(2).sum())
                rows.append([budget, report["criterion"], f"`{mode}`", f"{original_acc:.2%} -> {acc:.2%}",
                             f"{cosine:.4f}", f"{error:.4f}", f"{report['flops']['ratio']:.1%}", f"{seconds:.1f}"])
                print(" | ".join(rows[-1]))
    where = "classifier" if args.cut == "pooled" else "pooling"
    notes = [
        f"The README's reference data and {args.model} cut before its {where} "
        f"(`bench/cifar_models.py:{factory_name}`), "
        "compressed by `compressor.pipeline.run` with `--model-output features` (and, for the pooled features, the "
        "default `logits`); 1,024 calibration images, no labels, no latency. Columns: accuracy of the original "
        "classifier read on the pruned backbone's features (all 5,000 val images), their mean cosine similarity to the "
        "original features and their squared error relative to the original features' energy.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads. `python bench/features.py "
        f"--model {args.model} --budgets {args.budgets} --criteria {args.criteria} --cut {args.cut}`.",
        *(["Cut before the pooling: the output is 64 x 8 x 8 feature maps; the original classifier reads them "
           "through the original average pooling, and the cosine is over each image's flattened maps."]
          if args.cut == "maps" else []),
    ]
    header = ["budget", "criterion", "--model-output", "top-1 with the original head", "cosine", "relative error",
              "FLOPs kept", "run s"]
    title = f"{args.model} cut before its {where}"
    write_table(args.out, f"{title}: compressed against its own output", header, rows, notes, append=args.append)


if __name__ == "__main__":
    main()
