"""Recovery benchmark: recovery recipes x calibration sizes at 50% / 40% FLOPs.

Composes library calls (graph, criterion (l1 unless --criterion), width allocation, recovery recipes). Models:
ResNet-56 (../shared, accuracy on all 5,000 val.tar.gz images), ResNet-20 (../shared, trained on
PNG images: a domain shift), the VGG-style digits network of ``compress demo`` (trained here,
accuracy on its 450 held-out digits), and torchvision's resnet18 and mobilenet_v2 trained here on
the CIFAR-10 JPEGs by ``bench/train_cifar.py``, and ``vgg_cifar`` (a plain VGG-style CIFAR network,
``bench/cifar_models.py``, trained the same way): architectures the recipe was not developed on.
Writes bench/results/recovery.md.

Run (the tables of bench/results/recovery.md, first part; R=none,bn,bias+bn,lsq,bn+lsq):
    python bench/recovery.py --criterion reconstruction --recipes $R    # ResNet-56, the default criterion
    python bench/recovery.py --criterion l1 --recipes $R --append
    python bench/train_cifar.py --arch vgg_cifar    # likewise resnet18, mobilenet_v2 (weights in ~/.cache)
    python bench/recovery.py --model vgg_cifar --criterion reconstruction --recipes $R --append
    python bench/recovery.py --model vgg_cifar --criterion l1 --recipes lsq --append
    python bench/recovery.py --model resnet20 --criterion reconstruction --calib-sizes 1024 --val 2000 \
        --recipes $R --append
    python bench/recovery.py --model resnet20 --criterion l1 --calib-sizes 1024 --val 2000 --recipes lsq --append
    python bench/recovery.py --model resnet18 --criterion reconstruction --calib-sizes 1024 --recipes $R --append
    python bench/recovery.py --model resnet18 --criterion l1 --calib-sizes 1024 --recipes lsq --append
    python bench/recovery.py --model mobilenet_v2 --criterion reconstruction --calib-sizes 1024 --recipes $R --append
    python bench/recovery.py --model mobilenet_v2 --criterion l1 --calib-sizes 1024 --recipes lsq --append
    python bench/recovery.py --model digits --criterion reconstruction --recipes $R --append
    python bench/recovery.py --calib-sizes 1024 --recipes bn+lsq,bn+lsq+mimic --append   # minutes per cell on a CPU
    # mimic after the default recipe (last tables of the first part); likewise vgg_cifar, resnet18, mobilenet_v2
    python bench/recovery.py --criterion reconstruction --calib-sizes 1024 --recipes lsq,lsq+mimic --append
    # block after the default recipe (the last tables: ResNet-56, and vgg_cifar retrained on a fresh machine)
    python bench/recovery.py --criterion reconstruction --recipes lsq,lsq+block --append
    python bench/recovery.py --model vgg_cifar --criterion reconstruction --recipes lsq,lsq+block --append
    # the default on the torchvision networks (sixth session; weights trained anew, 1 thread beside other jobs)
    python bench/recovery.py --model mobilenet_v2 --criterion reconstruction --calib-sizes 1024 --recipes lsq,lsq+block
    python bench/recovery.py --model resnet18 --criterion reconstruction --calib-sizes 1024 --recipes lsq,lsq+block
    # the allocation's probe widths (seventh session; likewise vgg_cifar, resnet18, mobilenet_v2, resnet20 --val 2000)
    python bench/recovery.py --criterion reconstruction --calib-sizes 1024 --recipes lsq+block --probe-ratios 0.6,0.3
    python bench/recovery.py --criterion reconstruction --recipes lsq,lsq+block    # the default, 80/60/30% probes
    # lsq and block interleaved block by block (eighth session)
    python bench/recovery.py --criterion reconstruction --recipes lsq+block,lsq_block --threads 1
    # mirrored and shifted copies of small calibration sets (eighteenth session; bench/results/augment.md)
    for m in resnet56 vgg_cifar cifar_mobilenet_v2_half digits; do for a in "" --augment; do
        python bench/recovery.py --model $m --criterion reconstruction --calib-sizes 64,256 --recipes lsq+block $a \
            --out bench/results/augment.md --append; done; done    # resnet20 likewise, with --val 2000
    # the threshold (nineteenth session): 256 and 512 images brought to 1,024 (512 also without --augment)
    for m in resnet56 vgg_cifar cifar_mobilenet_v2_half digits; do
        python bench/recovery.py --model $m --criterion reconstruction --calib-sizes 256 --recipes lsq+block \
            --augment --threads 1 --out bench/results/augment.md --append; done    # resnet20 with --val 2000
    # inverted residuals with a CIFAR stem (twelfth session; bench/cifar_shapes.py's MobileNetV2 at half width)
    python bench/train_cifar.py --arch cifar_mobilenet_v2_half --epochs 6
    python bench/recovery.py --model cifar_mobilenet_v2_half --criterion reconstruction --calib-sizes 1024 \
        --recipes none,bn,lsq,lsq+block --append
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import CIFAR_MEAN, CIFAR_STD, MODELS, REPO, TRAIN, VAL, require_shared, write_table

RECIPES = {"none": [], "bn": ["bn"], "bias+bn": ["bias", "bn"], "lsq": ["lsq"], "bn+lsq": ["bn", "lsq"],
           "lsq+mimic": ["lsq", "mimic"], "bn+lsq+mimic": ["bn", "lsq", "mimic"], "lsq+block": ["lsq", "block"],
           "lsq_block": ["lsq_block"], "lsq+block+mimic": ["lsq", "block", "mimic"],
           "lsq+block+block": ["lsq", "block", "block"]}
DEFAULT_ROWS = ("none", "bn", "bias+bn", "lsq", "bn+lsq", "lsq+block")  # mimic: minutes a cell on a CPU
CALIB_SIZES = (64, 256, 1024)
RATIOS = (0.5, 0.4)


def accuracy(model, images, labels) -> float:
    from compressor.evaluate import accuracy as top1

    return top1(model, images, labels)[0]  # in onnxruntime, as `compress --eval` measures it


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet56",
                        choices=("resnet56", "resnet20", "digits", "resnet18", "mobilenet_v2", "vgg_cifar",
                                 "cifar_mobilenet_v2_half"))
    parser.add_argument("--allocation", default="sensitivity", choices=("global", "sensitivity"))
    parser.add_argument("--criterion", default="l1", help="channel criterion (registry name)")
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "recovery.md"))
    parser.add_argument("--calib-sizes", default=",".join(map(str, CALIB_SIZES)))
    parser.add_argument("--recipes", default=",".join(DEFAULT_ROWS),
                        help=f"row labels to run, comma-separated, from: {', '.join(RECIPES)}")
    parser.add_argument("--append", action="store_true", help="append the table to --out instead of replacing it")
    parser.add_argument("--jsonl", default=None, help="also write one JSON line per cell to this file")
    parser.add_argument("--augment", action="store_true",
                        help="recover with mirrored and shifted copies of each calibration subset added, as "
                             "`compress --augment` does (below 512 images by default, forced for 512-1,023: "
                             "compressor.augment)")
    parser.add_argument("--probe-ratios", default=None, type=probe_ratios_arg,
                        help="sensitivity probe widths as fractions in (0, 1), comma-separated, e.g. 0.8,0.6,0.3 "
                             "(default: the library's)")
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    sys_path_models()
    from shared_resnet import load

    from compressor import budget as budget_mod
    from compressor import graph as graph_mod
    from compressor.augment import augmented_count, expand
    from compressor.criteria import ScoringContext, get_criterion
    from compressor.data import load_images
    from compressor.recovery import RecoveryContext
    from compressor.recovery.recipe import DEFAULT_RECIPE, run_recipe
    from compressor.sensitivity import PROBE_RATIOS, allocate_widths

    sizes = tuple(int(v) for v in args.calib_sizes.split(","))
    probe_ratios = args.probe_ratios or PROBE_RATIOS
    wanted = set(args.recipes.split(","))
    recipes = {}
    for label, names in RECIPES.items():
        if label not in wanted:
            continue
        recipes[label + (" (default)" if names == list(DEFAULT_RECIPE) else "")] = names
    if list(DEFAULT_RECIPE) not in RECIPES.values():
        recipes["default (" + "+".join(DEFAULT_RECIPE) + ")"] = list(DEFAULT_RECIPE)
    model, calib_all, val, model_text = load_case(args.model, max(sizes), load, load_images)
    # a strided subset: the loader returns images grouped by class
    pick = torch.linspace(0, len(val.images) - 1, min(args.val, len(val.images))).round().long()
    vx, vy = val.images[pick], val.labels[pick]
    graph = graph_mod.build_graph(model, calib_all[:1])
    base_acc = accuracy(graph.model, vx, vy)
    print(f"original accuracy {base_acc:.4f}", flush=True)
    results: dict = {}
    log = []
    for n in sizes:
        # a strided subset: the loader returns images grouped by class
        calib = calib_all[torch.linspace(0, len(calib_all) - 1, n).round().long()]
        recovery_images, sources = calib, None
        if args.augment:  # the copies go to the recovery only, as in the pipeline
            recovery_images, sources = expand(calib, augmented_count(n, forced=True), seed=0)
        scoring = ScoringContext(model=graph.model, groups=graph.groups, calib=calib)
        scores = get_criterion(args.criterion).score(scoring)
        full = graph_mod.estimate_macs(graph, {g.id: g.size for g in graph.groups if g.prunable})
        for ratio in RATIOS:
            t0 = time.perf_counter()
            if args.allocation == "sensitivity":
                counts = allocate_widths(graph, scores, calib, ratio * full, ratios=probe_ratios)
            else:
                counts = budget_mod.search_widths(graph.groups, scores, ratio * full,
                                                  lambda c: graph_mod.estimate_macs(graph, c))
            alloc_s = time.perf_counter() - t0
            plan = budget_mod.plan_from_counts(graph.groups, scores, counts)
            macs = graph_mod.count_macs_params(graph_mod.apply_plan(graph, plan).model, calib[:1])[0]
            macs_full = graph_mod.count_macs_params(graph.model, calib[:1])[0]
            for label, names in recipes.items():
                pruned = graph_mod.apply_plan(graph, plan)
                ctx = RecoveryContext(original=graph.model, pruned=pruned.model, groups=graph.groups, plan=plan,
                                      kept=pruned.kept, calib=recovery_images, sources=sources, batch_size=128)
                t1 = time.perf_counter()
                info = run_recipe(names, ctx, measure=False)
                rec_s = time.perf_counter() - t1
                acc = accuracy(pruned.model, vx, vy)
                results[(label, ratio, n)] = (acc, rec_s, alloc_s)
                entry = {"recipe": label, "ratio": ratio, "calib": n, "augmented_to": len(recovery_images),
                         "flops_kept": macs / macs_full,
                         "accuracy": acc, "recovery_s": rec_s, "allocation_s": alloc_s,
                         "steps": info["steps"], "allocation": args.allocation, "criterion": args.criterion,
                         "probe_ratios": list(probe_ratios)}
                log.append(entry)
                print(json.dumps(entry), flush=True)
    header = ["recipe"] + [f"{int(r * 100)}% / {n}" for r in RATIOS for n in sizes] + [f"recovery s (50%/{max(sizes)})"]
    rows = []
    for label in recipes:
        cells = [f"{results[(label, r, n)][0]:.2%} ({100 * (results[(label, r, n)][0] - base_acc):+.2f})"
                 for r in RATIOS for n in sizes]
        rows.append([label, *cells, f"{results[(label, 0.5, max(sizes))][1]:.1f}"])
    notes = [
        f"Model: {model_text}, original accuracy {base_acc:.2%} on {len(vx)} held-out images; "
        f"criterion {args.criterion}; width allocation: {args.allocation}"
        + (f" (probe widths {', '.join(map(str, probe_ratios))})" if args.allocation == "sensitivity" else "") + ". "
        "Cells: top-1 accuracy after recovery (change vs original, points). "
        "Columns: FLOPs kept / calibration images (seed 0, strided subset of the training images"
        + ("; the recovery's set brought up to min(1,024, 8x) images with mirrored and shifted "
           "copies (--augment)" if args.augment else "") + "). "
        f"FLOPs kept (exact): {flops_text(log)}. No labels are used by any recovery method.",
        f"Recovery s: wall time of the recipe alone at 50% FLOPs with {max(sizes):,} images, {args.threads} "
        f"thread{'s' if args.threads != 1 else ''} on a "
        "shared 2-core machine (other jobs were running, so times are upper bounds).",
    ]
    title = (f"{args.model}: recovery without retraining "
             f"({args.allocation} width allocation, criterion {args.criterion}"
             + (", recovery on copies too" if args.augment else "") + ")")
    write_table(Path(args.out), title, header, rows, notes, append=args.append)
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(e) + "\n" for e in log))


def probe_ratios_arg(text: str) -> tuple[float, ...]:
    """``--probe-ratios``: comma-separated fractions strictly between 0 and 1."""
    try:
        ratios = tuple(float(v) for v in text.split(","))
    except ValueError:
        ratios = ()
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"{text!r}: give fractions between 0 and 1, e.g. 0.8,0.6,0.3")
    return ratios


def load_case(name: str, calib_size: int, load_resnet, load_images):
    """(model, calibration images, labelled evaluation set, description) for ``--model``."""
    if name == "digits":
        from compressor.demo import MEAN, STD, prepare
        from compressor.model_io import load_model

        paths = prepare(Path.home() / ".cache" / "cnn-compressor" / "digits")
        model = load_model(f"{paths['model']}:DigitsNet", paths["weights"])
        calib = load_images(paths["calib"], limit=calib_size, seed=0, mean=MEAN, std=STD).images
        val = load_images(paths["eval"], mean=MEAN, std=STD, labelled=True, what="evaluation")
        return model, calib, val, "`compress demo`'s DigitsNet (VGG-style, sklearn digits 1x16x16, trained here)"
    if name in ("resnet18", "mobilenet_v2", "vgg_cifar", "cifar_mobilenet_v2_half"):
        from train_cifar import build, weights_path

        path = weights_path(name)
        if not path.exists():
            raise SystemExit(f"{path} is missing: train it first with python bench/train_cifar.py --arch {name}")
        model = build(name)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        arch = {"vgg_cifar": "`vgg_cifar` (plain VGG-style, bench/cifar_models.py)",
                "cifar_mobilenet_v2_half": "`cifar_mobilenet_v2_half` (bench/cifar_shapes.py's MobileNetV2, CIFAR "
                                           "stem, half width)"}.get(name, f"torchvision `{name}` (num_classes=10, "
                                                                          "ImageNet stem)")
        text = f"{arch} trained here on the CIFAR-10 JPEGs by bench/train_cifar.py"
    else:
        weights, depth = {"resnet56": ("resnet56-cifar10-jpeg.pt", 56),
                          "resnet20": ("resnet20-cifar10-png.th", 20)}[name]
        model = load_resnet(str(MODELS / weights), depth)
        text = f"`../shared/models/{weights}`"
    calib = load_images(TRAIN, limit=calib_size, seed=0, mean=CIFAR_MEAN, std=CIFAR_STD).images
    val = load_images(VAL, mean=CIFAR_MEAN, std=CIFAR_STD, labelled=True, what="evaluation")
    return model, calib, val, text + " (calibration from train.tar.gz, eval on val.tar.gz)"


def flops_text(log: list[dict]) -> str:
    seen = {}
    for entry in log:
        seen.setdefault(entry["ratio"], entry["flops_kept"])
    return ", ".join(f"{100 * r:.0f}% budget -> {100 * f:.1f}%" for r, f in seen.items())


def sys_path_models() -> None:
    import importlib.util
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

    spec = importlib.util.spec_from_file_location("shared_resnet", MODELS / "cifar_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["shared_resnet"] = module


if __name__ == "__main__":
    main()
