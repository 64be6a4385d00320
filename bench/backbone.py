"""Backbone benchmark: ResNet-56 (../shared) at 50% and 40% FLOPs, recovery none vs bn vs default.

Writes bench/results/backbone.md. Run: python bench/backbone.py
"""

from __future__ import annotations

import platform

import torch
from common import REPO, require_shared, run_cifar, write_table


def main() -> None:
    require_shared()
    rows = []
    for budget in ("50%flops", "40%flops"):
        for recovery in (("none",), ("bn",), None):
            report, wall = run_cifar("resnet56-cifar10-jpeg.pt", budget, recovery=recovery)
            acc = report["accuracy"]
            lat = report["latency"]
            rows.append([
                budget, "+".join(report["recovery"]) or "none", f"{acc['original']:.2%}",
                f"{acc['before_recovery']:.2%}",
                f"{acc['pruned']:.2%}", f"{report['flops']['ratio']:.1%}", f"{report['params']['ratio']:.1%}",
                f"{lat['original_ms']['p50']:.2f} -> {lat['pruned_ms']['p50']:.2f} ({lat['speedup']:.2f}x)",
                f"{wall:.1f}",
            ])
    notes = [
        "Model: `../shared/models/resnet56-cifar10-jpeg.pt`; criterion l1, sensitivity width allocation (the default "
        "with calibration data); 1,024 calibration "
        "images from train.tar.gz (seed 0); accuracy on all 5,000 val.tar.gz images.",
        f"Latency: onnxruntime CPU, batch 1, p50 over 30 iterations, on this machine ({torch.get_num_threads()} "
        f"threads, {platform.processor() or platform.machine()}). Wall time: the whole run, including evaluation "
        "of three models on 5,000 images and both latency measurements.",
    ]
    write_table(REPO / "bench" / "results" / "backbone.md", "ResNet-56: backbone pipeline",
                ["budget", "recovery", "original", "pruned (no recovery)", "after recovery", "FLOPs kept",
                 "params kept", "latency ms p50", "wall s"], rows, notes)


if __name__ == "__main__":
    main()
