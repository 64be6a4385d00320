"""Criteria benchmark: every registered criterion on the CIFAR ResNets of ../shared.

For each model, FLOPs budget, calibration size and criterion, one pipeline run with the default
recovery recipe gives both accuracies (before recovery = recovery "none", after = "default");
the scoring wall time is the pipeline's "score" stage. Results are appended to
bench/results/criteria.jsonl as they come (so a long run can be cut short) and
bench/results/criteria.md is rewritten after every run. Each row records the recipe; rows of an
earlier default (``criteria-lsq.jsonl`` / ``.md``: ``lsq`` alone) are kept as history, not mixed in.

Run: python bench/criteria.py [--eval-size N] [--models resnet56,resnet20] [--calib 1024,32]
     [--budgets 50%flops,40%flops] [--criteria l1,taylor,...] [--fresh | --redo]
Data-driven criteria need calibration images; data-free ones (l1, l2, fpgm, bn_scale, random)
score identically at both calibration sizes, only the recovery sees the difference.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from common import REPO, require_shared, run_cifar

from compressor.augment import augmented_count
from compressor.criteria import get_criterion, list_criteria
from compressor.recovery.recipe import DEFAULT_RECIPE
from compressor.sensitivity import PROBE_RATIOS

MODELS = {
    "resnet56": ("resnet56-cifar10-jpeg.pt", 56),
    "resnet20": ("resnet20-cifar10-png.th", 20),
}
RESULTS = REPO / "bench" / "results"
JSONL = RESULTS / "criteria.jsonl"
MD = RESULTS / "criteria.md"


def weights_file(model: str) -> str:
    """The checkpoint for ``model``; the PNG ones are re-saved once as plain state_dicts in /tmp.

    ``resnet20-cifar10-png.th`` is a 'module.'-prefixed state_dict without BatchNorm
    ``num_batches_tracked`` entries, which the pipeline's strict loader rejects; the conversion
    goes through ../shared/models/cifar_resnet.py's own ``load`` and never writes into the repo.
    """
    name, depth = MODELS[model]
    if not name.endswith(".th"):
        return name
    import tempfile
    from pathlib import Path

    from cifar_models import _module
    from common import MODELS as MODEL_DIR

    out = Path(tempfile.gettempdir()) / (Path(name).stem + ".state_dict.pt")
    if not out.exists():
        torch.save(_module.load(str(MODEL_DIR / name), depth=depth).state_dict(), out)
    return str(out)


RECIPE = "+".join(DEFAULT_RECIPE)


def key(r: dict) -> tuple:
    return (r["model"], r["budget"], r["calib"], r["criterion"])


def settings(criterion: str, calib: int) -> dict:
    """What a row's numbers depend on besides its key: the default recipe, the probe widths of the
    sensitivity allocation (``NAME@sensitivity``), and how many images the recovery fits on when the
    pipeline adds copies of a small calibration set (``compressor.augment``)."""
    out: dict = {"recipe": RECIPE}
    if criterion.partition("@")[2] == "sensitivity":
        out["probe_ratios"] = list(PROBE_RATIOS)
    if augmented_count(calib) != calib:
        out["recovery_images"] = augmented_count(calib)
    return out


def load_rows() -> dict[tuple, dict]:
    """Earlier rows measured with today's settings (later rows replace earlier ones); others are set aside."""
    rows: dict[tuple, dict] = {}
    stale: set[tuple] = set()
    if JSONL.exists():
        for line in JSONL.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if any(r.get(k) != v for k, v in settings(r["criterion"], r["calib"]).items()):
                    stale.add(key(r))
                    continue
                rows[key(r)] = r
    if stale - rows.keys():
        print(f"{len(stale - rows.keys())} row(s) in {JSONL.name} were measured with another recovery recipe, other "
              "probe widths or another number of recovery images than today's; measuring again")
    return rows


def thread_note(rows: dict[tuple, dict]) -> str:
    """Torch threads per run: rows written before the count was recorded ran with 1."""
    by_count: dict[int, list[str]] = {}
    for r in rows.values():
        by_count.setdefault(r.get("threads", 1), []).append(r["criterion"])
    if len(by_count) <= 1:
        return f"{next(iter(by_count), 1)} torch thread(s) per run"
    usual = max(by_count, key=lambda c: len(by_count[c]))
    others = "; ".join(f"{c} for {', '.join(sorted(set(names)))}" for c, names in sorted(by_count.items())
                       if c != usual)
    return f"{usual} torch thread(s) per run ({others})"


def write_markdown(rows: dict[tuple, dict], eval_size: int | None) -> None:
    lines = [
        "# Channel criteria on CIFAR ResNets",
        "",
        "One `compressor.pipeline.run` per row: global width ranking (`--allocation global`), FLOPs budget, "
        "recovery `none` (accuracy before recovery) and the default recipe (after recovery: "
        f"`{RECIPE}`) "
        "from the same run. Calibration images: a seeded random subset (seed 0) of `train.tar.gz`; accuracy "
        f"on {'all 5,000' if eval_size is None else f'{eval_size:,} (seeded subset) of the'} `val.tar.gz` images. "
        "Score s = wall time of the scoring stage alone. `snpfi@criterion` lets SNPFI set the layer widths "
        "(`--allocation criterion`, its utilization-strength keep ratios scaled to the budget); "
        "`NAME@sensitivity` uses the measured-sensitivity allocation, the pipeline's default with calibration data "
        f"(probe widths {', '.join(map(str, PROBE_RATIOS))}).",
        f"Machine: {platform.processor() or platform.machine()}, {thread_note(rows)}, "
        "CPU shared with other jobs, so times are indicative only.",
        "",
    ]
    models = sorted({r["model"] for r in rows.values()}, key=lambda m: list(MODELS).index(m))
    for model in models:
        for budget in ("50%flops", "40%flops"):
            sub = [r for r in rows.values() if r["model"] == model and r["budget"] == budget]
            if not sub:
                continue
            orig = sub[0].get("original")
            calibs = sorted({r["calib"] for r in sub}, reverse=True)
            lines += [f"## {model} ({MODELS[model][0]}), {budget}" + (f", original {orig:.2%}" if orig else ""), ""]
            header = ["criterion"]
            for c in calibs:
                header += [f"none, {c} img", f"default, {c} img", f"score s, {c} img"]
            lines += ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
            by_crit = sorted({r["criterion"] for r in sub})
            for crit in by_crit:
                cells = [crit]
                for c in calibs:
                    r = next((r for r in sub if r["criterion"] == crit and r["calib"] == c), None)
                    if r is None:
                        cells += ["-", "-", "-"]
                    elif "error" in r:
                        cells += ["error", r["error"][:60], "-"]
                    else:
                        cells += [f"{r['none']:.2%}", f"{r['default']:.2%}", f"{r['score_s']:.1f}"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    MD.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="resnet56,resnet20")
    p.add_argument("--budgets", default="50%flops,40%flops")
    p.add_argument("--calib", default="1024,32")
    p.add_argument("--criteria", default=",".join(list_criteria() + ["snpfi@criterion"]),
                   help="names; NAME@ALLOCATION runs NAME with that --allocation (default: global)")
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="forget earlier results in criteria.jsonl")
    p.add_argument("--redo", action="store_true",
                   help="measure the listed rows again even when criteria.jsonl has them (the new rows replace them)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.fresh and JSONL.exists():
        JSONL.unlink()
    rows = load_rows()
    for model in args.models.split(","):
        weights, depth = weights_file(model), MODELS[model][1]
        for calib in (int(c) for c in args.calib.split(",")):
            for budget in args.budgets.split(","):
                for crit in args.criteria.split(","):
                    row = {"model": model, "budget": budget, "calib": calib, "criterion": crit, **settings(crit, calib),
                           "threads": args.threads}
                    if key(row) in rows and not args.redo:
                        continue
                    name, _, allocation = crit.partition("@")  # e.g. snpfi@criterion: the criterion's widths
                    get_criterion(name)  # unknown names fail before any work
                    start = time.perf_counter()
                    try:
                        report, wall = run_cifar(
                            weights, budget, depth=depth, criterion=name, calib_size=calib, recovery=None,
                            latency=False, eval_size=args.eval_size, allocation=allocation or "global",
                        )
                        acc = report["accuracy"]
                        row.update(
                            original=acc["original"], none=acc["before_recovery"], default=acc["pruned"],
                            flops_ratio=report["flops"]["ratio"], score_s=report["timings_s"].get("score", 0.0),
                            wall_s=wall,
                        )
                    except Exception as exc:  # keep going; the table shows the error
                        row.update(error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - start)
                    print(json.dumps(row), flush=True)
                    with JSONL.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    rows[key(row)] = row
                    write_markdown(rows, args.eval_size)


if __name__ == "__main__":
    main()
