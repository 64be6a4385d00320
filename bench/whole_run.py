"""Whole-run benchmark: the README's reference command on ResNet-56, as a user runs it.

Each run is a separate ``compress`` process (Python start-up included), with the defaults: 1,024
calibration images from train.tar.gz, accuracy on all 5,000 val.tar.gz images, latency in
onnxruntime on the CPU. Rows: budget x calibration seed (``--seed`` draws the 1,024 images). A budget is a
percentage of the FLOPs (``50``) or any other ``--budget`` text (``1.5x``, ``3ms``).
Columns: accuracy, FLOPs and parameters kept, batch-1 latency, the run's stages, process wall time
and peak memory (the issue's goal: the whole run within 60 s on a 2-core machine).

Writes bench/results/whole_run.md. Run: python bench/whole_run.py [--budgets 50,40] [--seeds 0,1,2]
The faster recipe's table: python bench/whole_run.py --recovery lsq --append
The other checkpoints of ../shared/models: --weights resnet20-cifar10-png.th (its depth is read from the
name and passed as ``cifar_resnet.py:CifarResNet(depth=20)``, as a user would).
Fewer calibration images: python bench/whole_run.py --calib-size 64 --seeds 0,1 --append (likewise 256).
Without data (no --calib; images synthesized from the BatchNorm statistics, or none with 0):
python bench/whole_run.py --synthesize 128 --append; python bench/whole_run.py --synthesize 0 --seeds 0 --append
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

from common import CIFAR_MEAN, CIFAR_STD, MODELS, REPO, TRAIN, VAL, require_shared, write_table

from compressor.recovery.recipe import DEFAULT_RECIPE

STAGES = ("evaluate", "score", "search", "recover", "export", "latency")


DEFAULT_WEIGHTS = "resnet56-cifar10-jpeg.pt"


def model_spec(weights: str) -> str:
    """``cifar_resnet.py:CifarResNet`` for the depth in the checkpoint's name (the class's default: 56)."""
    found = re.match(r"resnet(\d+)-", weights)
    if found is None:
        raise SystemExit(f"cannot read a depth from {weights!r}; pass one of ../shared/models/resnet*-*.pt[h]")
    depth = int(found[1])
    return f"{MODELS / 'cifar_resnet.py'}:CifarResNet" + ("" if depth == 56 else f"(depth={depth})")


def branch_options(args) -> tuple[str, ...]:
    """The compress options ``--remove-branches`` / ``--keep-branches`` asked for."""
    return tuple(option for option, given in (("--remove-branches", args.remove_branches),
                                              ("--keep-branches", args.keep_branches)) if given)


def budget_text(budget: str) -> str:
    """``50`` -> ``50%flops``; any other budget text as it is."""
    return f"{budget}%flops" if budget.isdigit() else budget


def run_once(budget: str, seed: int, out: Path, recovery: str | None = None,
             weights: str = DEFAULT_WEIGHTS, synthesize: int | None = None,
             calib_size: int | None = None, augment: bool = False, options: tuple[str, ...] = ()
             ) -> tuple[dict, float, float]:
    """(report, process wall seconds, peak resident memory in GB) of one ``compress`` process.

    ``synthesize``: run without ``--calib``, with ``--synthesize N`` (0: pruning by the weights alone).
    ``calib_size``: ``--calib-size`` (None: compress's default, 1,024). ``augment``: pass ``--augment``.
    ``options``: more compress options, passed as they are.
    """
    data = (["--calib", str(TRAIN)] if synthesize is None
            else ["--input-shape", "3x32x32", "--synthesize", str(synthesize)])
    if calib_size is not None and synthesize is None:
        data += ["--calib-size", str(calib_size)]
    if augment:
        data += ["--augment"]
    cmd = [
        "compress", model_spec(weights), "--weights", str(MODELS / weights),
        "--budget", budget_text(budget), *data, "--eval", str(VAL),
        "--mean", ",".join(map(str, CIFAR_MEAN)), "--std", ",".join(map(str, CIFAR_STD)),
        "--device", "cpu", "--seed", str(seed), "--out", str(out), "--force", "--quiet",
    ]
    if recovery is not None:
        cmd += ["--recovery", recovery]
    cmd += list(options)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage (getrusage would give the max)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"compress exited with {code}: {' '.join(cmd)}")
    return json.loads((out / "report.json").read_text()), wall, usage.ru_maxrss / 1e6  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="50,40",
                        help="budgets, comma-separated: FLOPs in percent (50) or compress's text (1.5x, 3ms)")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds, comma-separated")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "whole_run.md"))
    parser.add_argument("--recovery", default=None, help="recovery recipe passed to compress (default: its own)")
    parser.add_argument("--append", action="store_true", help="append the table to --out instead of replacing it")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="checkpoint in ../shared/models")
    parser.add_argument("--synthesize", type=int, default=None,
                        help="no --calib: synthesize N calibration images (0: prune by the weights alone)")
    parser.add_argument("--calib-size", type=int, default=None, help="--calib-size for compress [its default]")
    parser.add_argument("--augment", action="store_true", help="pass --augment (copies of synthesized images too)")
    parser.add_argument("--remove-branches", action="store_true", help="pass --remove-branches")
    parser.add_argument("--keep-branches", action="store_true", help="pass --keep-branches")
    args = parser.parse_args()
    stages = STAGES if args.synthesize is None else ("synthesize", *STAGES)
    require_shared()
    rows, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in (b.strip() for b in args.budgets.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                report, wall, peak_gb = run_once(budget, seed, Path(tmp) / f"run{budget}_{seed}", args.recovery,
                                                   args.weights, args.synthesize, args.calib_size, args.augment,
                                                   branch_options(args))
                acc, lat, t = report["accuracy"], report["latency"], report["timings_s"]
                walls.append(wall)
                rows.append([
                    budget_text(budget), str(seed), f"{acc['original']:.2%} -> {acc['pruned']:.2%}",
                    f"{report['flops']['ratio']:.1%}" + (f" ({len(report['removed_branches'])} branches removed)"
                                                         if report.get("removed_branches") else ""),
                    f"{report['params']['ratio']:.1%}",
                    f"{lat['original_ms']['p50']:.2f} -> {lat['pruned_ms']['p50']:.2f}",
                    " / ".join(f"{t.get(s, 0.0):.1f}" for s in stages), f"{wall:.1f}", f"{peak_gb:.2f}",
                ])
                print(" | ".join(rows[-1]), flush=True)
    header = ["budget", "seed", "top-1 (original -> pruned)", "FLOPs kept", "params kept", "ORT batch-1 p50 ms",
              "stages s: " + " / ".join(stages), "process wall s", "peak GB"]
    extra = f" --recovery {args.recovery}" if args.recovery else ""
    data = "--calib train.tar.gz" + (f" --calib-size {args.calib_size}" if args.calib_size else "")
    if args.calib_size and args.synthesize is None:
        extra += f" --calib-size {args.calib_size}"
    if args.augment:
        extra += " --augment"
    for option in branch_options(args):
        extra += f" {option}"
    if args.synthesize is not None:
        data = f"--input-shape 3x32x32 --synthesize {args.synthesize}"
        extra += f" --synthesize {args.synthesize}, no --calib"
    data += " --augment" if args.augment else ""
    shown_model = model_spec(args.weights).replace(str(MODELS), "../shared/models")
    notes = [
        f"The README's reference command, as a user runs it (`compress '{shown_model}' "
        f"--weights {args.weights} --budget B {data} --eval val.tar.gz ... --device cpu"
        f"{' --recovery ' + args.recovery if args.recovery else ''}"
        f"{''.join(' ' + o for o in branch_options(args))}`), defaults otherwise"
        + ("" if args.synthesize == 0 else " (criterion `reconstruction`, sensitivity allocation"
           + ("" if args.recovery else f", recovery `{','.join(DEFAULT_RECIPE)}`") + ")")
        + "; seed: " + ("the calibration subset's" if args.synthesize is None else "the synthesis's")
        + ", one process per row.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; its speed varies by 10-40% over a day, so read the "
        f"spread. Process wall time {min(walls):.1f}-{max(walls):.1f} s over {len(walls)} runs (goal: 60 s).",
    ]
    title = f"{args.weights}: whole `compress` runs" + (f",{extra}" if extra else "")
    write_table(Path(args.out), title, header, rows, notes, append=args.append)


if __name__ == "__main__":
    main()
