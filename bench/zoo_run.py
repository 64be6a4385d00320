"""Whole ``compress`` runs on a zoo of architectures: does the default pipeline complete on every one?

The graph coverage benchmark prunes each architecture with a random plan; this one runs the whole
default pipeline (criterion, sensitivity allocation, ``lsq`` then ``block``, ONNX export and its
parity check) as a user would, one ``compress`` process per model, on random weights
(``bench/zoo_models.py``: torchvision's zoo, and the CIFAR shapes of ``bench/cifar_shapes.py``) and
calibration images of noise. Accuracy means nothing here; what is
measured is that each run completes within the budget, its soundness and ONNX differences, the
recovery's fidelity on held-out calibration images (KL divergence from the original before ->
after), stage times, wall time and peak memory.

Writes bench/results/zoo_run.md. Run: python bench/zoo_run.py [--models a,b] [--mode default|jetson|datafree]
The CIFAR shapes (bench/cifar_shapes.py): --models cifar_vgg16,cifar_resnet18,... --size 32 --images 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, write_table
from zoo_models import ARCHITECTURES, CIFAR_SHAPES

MODES = {
    "default": ["--device", "cpu", "--no-latency"],
    "jetson": ["--device", "jetson"],  # a remote profile: widths aligned, bundle written, latency estimated
    "datafree": ["--device", "cpu", "--no-latency"],  # no --calib: l1 and the data-free recovery
}
STAGES = ("score", "search", "recover", "export")


def run_once(name: str, args, calib: Path, out: Path) -> tuple[int, dict | None, float, float, str]:
    """(exit code, report or None, wall seconds, peak resident GB, last line of output) of one process."""
    cmd = ["compress", f"{REPO / 'bench' / 'zoo_models.py'}:{name}", "--budget", f"{args.budget}%flops",
           "--out", str(out), "--force", *MODES[args.mode]]
    cmd += ["--input-shape", f"3x{args.size}x{args.size}"] if args.mode == "datafree" else ["--calib", str(calib)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    report = json.loads((out / "report.json").read_text()) if code == 0 else None
    return code, report, wall, usage.ru_maxrss / 1e6, (lines[-1] if lines else "")


def row(name: str, code: int, report: dict | None, wall: float, peak: float, last: str) -> list[str]:
    if report is None:
        return [name, f"**failed** (exit {code}): {last[:120]}", "", "", "", "", "", f"{wall:.0f}", f"{peak:.1f}"]
    fid = report.get("recovery_steps", {}).get("fidelity", {})
    kl = (f"{fid['before']['kl']:.3f} -> {fid['after']['kl']:.3f}" if fid.get("before") and fid.get("after") else "-")
    t = report["timings_s"]
    excluded = len(report["soundness"]["excluded_groups"]) - 1  # the classifier's outputs are always excluded
    return [name, "ok", f"{report['flops']['ratio']:.1%}", f"{report['params']['ratio']:.1%}",
            f"{report['soundness']['max_abs_diff']:.1e} / {report['export']['onnx']['max_abs_diff']:.1e}",
            str(max(0, excluded)), kl, " / ".join(f"{t.get(s, 0.0):.0f}" for s in STAGES) + f" ({wall:.0f})",
            f"{peak:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(ARCHITECTURES),
                        help=f"comma-separated names: torchvision's, or the CIFAR shapes ({', '.join(CIFAR_SHAPES)}) "
                             "with --size 32")
    parser.add_argument("--mode", choices=sorted(MODES), default="default")
    parser.add_argument("--budget", type=int, default=50, help="FLOPs budget in percent")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--images", type=int, default=256, help="calibration images (noise)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "zoo_run.md"))
    parser.add_argument("--append", action="store_true", help="append the table to --out instead of replacing it")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.pt"
        torch.save(torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(5)), calib)
        for name in args.models.split(","):
            rows.append(row(name, *run_once(name, args, calib, Path(tmp) / name)))
            print(" | ".join(rows[-1]), flush=True)
    header = ["model", "run", "FLOPs kept", "params kept", "soundness / ONNX max diff", "groups left whole",
              "KL held-out: before -> after recovery", "s: " + " / ".join(STAGES) + " (process wall)", "peak GB"]
    data = "no calibration data (data-free)" if args.mode == "datafree" else f"{args.images} noise images"
    notes = [
        f"`compress bench/zoo_models.py:NAME --budget {args.budget}%flops {' '.join(MODES[args.mode])}` with "
        f"{data} at {args.size}x{args.size}, defaults otherwise, one process per model, "
        f"{args.threads} torch thread(s) each. Random weights: accuracy is meaningless, completion is the point. "
        "`groups left whole`: besides the classifier's outputs.",
    ]
    zoo = "CIFAR shapes" if set(args.models.split(",")) <= set(CIFAR_SHAPES) else "torchvision zoo"
    write_table(Path(args.out), f"Whole runs on the {zoo} ({args.mode}, {args.budget}% FLOPs)", header, rows,
                notes, append=args.append)


if __name__ == "__main__":
    main()
