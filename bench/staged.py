"""Staged pruning benchmark: reach the budget in one step or through intermediate FLOPs budgets.

A question the recovery benchmark leaves open: does pruning in stages, each one re-scoring,
re-allocating (measured sensitivity) and recovering (``lsq``) the partly pruned network, keep
more accuracy than one step to the budget? Every stage refits against the *original* network
(kept channel indices composed across the stages), so errors are corrected against the same
reference throughout. Criterion ``reconstruction``, 1,024 calibration images (seed 0, strided
subset), as the pipeline's defaults; the one-step row is the default pipeline.

Models as in bench/recovery.py (ResNet-56 and ResNet-20 from ../shared; vgg_cifar, resnet18 and
mobilenet_v2 trained by bench/train_cifar.py). Writes bench/results/staged.md.

Run (the committed table):
    python bench/staged.py --model resnet56
    for m in vgg_cifar resnet18 mobilenet_v2; do python bench/staged.py --model $m --append; done
    python bench/staged.py --model resnet20 --val 2000 --append
    python bench/staged.py --model resnet56 --finish block --append   # `block` once, after the last stage
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import REPO, require_shared, write_table
from recovery import accuracy, load_case, sys_path_models

BUDGETS = (0.5, 0.4)
SCHEDULES = ("", "0.7", "0.8,0.6")  # intermediate FLOPs fractions before the budget ("" = one step)
CALIB = 1024


def compose_kept(first: dict, second: dict) -> dict:
    """Kept indices of two successive prunings, in the first (original) model's index space."""
    out = {}
    for name in set(first) | set(second):
        a_rec, b_rec = first.get(name, {}), second.get(name, {})
        rec = {}
        for key in ("in", "out"):
            a, b = a_rec.get(key), b_rec.get(key)
            if a is not None and b is not None:
                rec[key] = [a[i] for i in b]
            elif a is not None or b is not None:
                rec[key] = list(a if a is not None else b)
        out[name] = rec
    return out


def prune_in_stages(original, calib, fractions: list[float], finish: tuple[str, ...] = ()):
    """(pruned and recovered model, FLOPs kept, seconds) after pruning to each fraction of the MACs in turn.

    ``finish``: recovery methods run once after the last stage's ``lsq`` (against the original).
    """
    from compressor import budget as budget_mod
    from compressor import graph as graph_mod
    from compressor.criteria import ScoringContext, get_criterion
    from compressor.recovery import RecoveryContext
    from compressor.recovery.recipe import run_recipe
    from compressor.sensitivity import allocate_widths

    start = time.perf_counter()
    x1 = calib[:1]
    original_graph = graph_mod.build_graph(original, x1)
    macs0 = graph_mod.count_macs_params(original_graph.model, x1)[0]
    current, kept = original_graph.model, None
    for step, fraction in enumerate(fractions):
        graph = graph_mod.build_graph(current, x1) if kept is not None else original_graph
        scores = get_criterion("reconstruction").score(ScoringContext(model=graph.model, groups=graph.groups,
                                                                      calib=calib))
        full = graph_mod.estimate_macs(graph, {g.id: g.size for g in graph.groups if g.prunable})
        now = graph_mod.count_macs_params(graph.model, x1)[0]
        counts = allocate_widths(graph, scores, calib, full * fraction * macs0 / now)
        plan = budget_mod.plan_from_counts(graph.groups, scores, counts)
        pruned = graph_mod.apply_plan(graph, plan)
        kept = pruned.kept if kept is None else compose_kept(kept, pruned.kept)
        ctx = RecoveryContext(original=original_graph.model, pruned=pruned.model, groups=original_graph.groups,
                              plan=plan, kept=kept, calib=calib, batch_size=128)
        run_recipe(["lsq", *(finish if step == len(fractions) - 1 else ())], ctx, measure=False)
        current = pruned.model.eval()
    flops = graph_mod.count_macs_params(current, x1)[0] / macs0
    return current, flops, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet56",
                        choices=("resnet56", "resnet20", "resnet18", "mobilenet_v2", "vgg_cifar"))
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "staged.md"))
    parser.add_argument("--append", action="store_true", help="append the table to --out instead of replacing it")
    parser.add_argument("--finish", default="", help="recovery methods after the last stage's lsq, e.g. block")
    args = parser.parse_args()
    finish = tuple(m for m in args.finish.split(",") if m)
    from compressor.recovery import list_recoveries

    if unknown := [m for m in finish if m not in list_recoveries()]:
        parser.error(f"--finish {','.join(unknown)}: not a recovery method; choose from {', '.join(list_recoveries())}")
    require_shared()
    torch.set_num_threads(args.threads)
    sys_path_models()
    from shared_resnet import load

    from compressor.data import load_images

    model, calib, val, model_text = load_case(args.model, CALIB, load, load_images)
    pick = torch.linspace(0, len(val.images) - 1, min(args.val, len(val.images))).round().long()
    vx, vy = val.images[pick], val.labels[pick]
    base = accuracy(model.eval(), vx, vy)
    rows = []
    for schedule in SCHEDULES:
        cells = []
        for ratio in BUDGETS:
            fractions = [float(v) for v in schedule.split(",") if v] + [ratio]
            pruned, flops, seconds = prune_in_stages(model, calib, fractions, finish)
            acc = accuracy(pruned, vx, vy)
            print(json.dumps({"model": args.model, "stages": fractions, "finish": finish, "accuracy": acc,
                              "flops_kept": flops, "seconds": seconds}), flush=True)
            cells += [f"{acc:.2%} ({100 * (acc - base):+.2f})", f"{flops:.1%}", f"{seconds:.0f}"]
        if schedule:
            label = " -> ".join(f"{float(v):.0%}" for v in schedule.split(","))
        else:
            label = "one step" + ("" if finish else " (default)")
        rows.append([label + (" -> budget" if schedule else ""), *cells])
    header = ["stages"] + [f"{h} {int(100 * r)}%" for r in BUDGETS for h in ("accuracy", "FLOPs kept", "s")]
    notes = [
        f"Model: {model_text}, original accuracy {base:.2%} on {len(vx)} held-out images. Criterion "
        f"`reconstruction`, sensitivity allocation and `lsq` at every stage"
        + (f", then {' + '.join(f'`{m}`' for m in finish)} once after the last" if finish else "")
        + f", {CALIB} calibration images, no labels. "
        "s: wall time of scoring, allocation and recovery over all stages "
        f"({args.threads} threads, shared 2-core machine).",
    ]
    title = f"{args.model}: pruning in stages" + (f", then {'+'.join(finish)}" if finish else "")
    write_table(Path(args.out), title, header, rows, notes, append=args.append)


if __name__ == "__main__":
    main()
