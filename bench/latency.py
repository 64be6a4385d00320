"""Latency benchmark: torchvision resnet50 and mobilenet_v2 at 50% and 40% FLOPs, aligned vs unaligned.

Measured speed-up next to the FLOPs reduction. On this CPU: onnxruntime, batch 1. With a CUDA GPU
(``--device cuda``): torch fp16, channels_last, CUDA graphs, batch 1 and 64.
Writes bench/results/latency-<device>.md. Run: python bench/latency.py [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, write_table

from compressor import graph as graph_mod
from compressor.criteria import ScoringContext, get_criterion
from compressor.widths import flops_widths, make_plan
from export.latency import compare_latency


def prune(name: str, ratio: float, alignment: int, shape=(3, 224, 224)):
    from compressor.model_io import load_model

    model = load_model(f"torchvision:{name}")
    example = torch.randn(1, *shape)
    graph = graph_mod.build_graph(model, example, round_to=alignment)
    scores = get_criterion("l1").score(ScoringContext(model=graph.model, groups=graph.groups, calib=None))
    counts = flops_widths("global", graph, scores, ratio)
    pruned = graph_mod.apply_plan(graph, make_plan(graph, scores, counts)).model
    macs0, _ = graph_mod.count_macs_params(graph.model, example)
    macs1, _ = graph_mod.count_macs_params(pruned, example)
    return graph.model, pruned, macs1 / macs0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    batches = (1, 64) if cuda else (1,)
    rows = []
    for name in ("resnet50", "mobilenet_v2"):
        for ratio in (0.5, 0.4):
            for alignment in (1, 8):
                original, pruned, kept = prune(name, ratio, alignment)
                for batch in batches:
                    start = time.perf_counter()
                    x = torch.randn(batch, 3, 224, 224)
                    with tempfile.TemporaryDirectory() as tmp:
                        if cuda:
                            result = compare_latency(original, pruned, x, device=args.device, backend="torch",
                                                     fp16=True, channels_last=True, cuda_graphs=True,
                                                     warmup=10, iters=args.iters)
                        else:
                            result = compare_latency(original, pruned, x, device="cpu", backend="onnxruntime",
                                                     warmup=5, iters=args.iters, workdir=Path(tmp))
                    reduction = 1.0 / kept
                    rows.append([
                        name, f"{ratio:.0%}", "8" if alignment == 8 else "none", str(batch), f"{kept:.1%}",
                        f"{result['original_ms']['p50']:.2f}", f"{result['pruned_ms']['p50']:.2f}",
                        f"{result['speedup']:.2f}x", f"{reduction:.2f}x", f"{result['speedup'] / reduction:.2f}",
                        f"{time.perf_counter() - start:.0f}",
                    ])
                    print(rows[-1], flush=True)
    backend = "torch CUDA fp16, channels_last, CUDA graphs" if cuda else "onnxruntime CPU"
    notes = [
        f"Backend: {backend}; p50 over {args.iters} iterations after warm-up; original and pruned timed "
        "alternately with identical settings. Random weights (latency does not depend on them); criterion l1, "
        "global width ranking; FLOPs counted exactly on the pruned model.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads"
        + (f", {torch.cuda.get_device_name()}" if cuda else "") + ".",
        "efficiency = measured speed-up / FLOPs reduction (goal on the GPU at batch 64: >= 0.8).",
    ]
    write_table(REPO / "bench" / "results" / f"latency-{'gpu' if cuda else 'cpu'}.md",
                f"Latency vs FLOPs ({'GPU' if cuda else 'CPU'})",
                ["model", "budget", "alignment", "batch", "FLOPs kept", "original ms", "pruned ms", "speed-up",
                 "FLOPs reduction", "efficiency", "wall s"], rows, notes)


if __name__ == "__main__":
    main()
