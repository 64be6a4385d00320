"""Graph coverage benchmark: prune the torchvision zoo (random weights) and the option-A CIFAR
ResNet-20 to 50% and 40% of the MACs and check each pruned model.

For each model: build the channel graph at 3x224x224 (CIFAR: 3x32x32), find a *uniform* keep
ratio by bisection on ``estimate_macs`` (every prunable group keeps ceil(ratio * size) channels,
rounded to its multiple), keep the channels with the largest L1 norm of the root's weights,
prune, and measure exact MACs/params kept, the soundness max diff (pruned vs masked original on
2 random inputs), the ONNX Runtime max diff and the wall time.

    python bench/graph_coverage.py            # writes bench/results/graph_coverage.md
    python bench/graph_coverage.py resnet18   # a subset (printed, table still written)
"""

from __future__ import annotations

import io
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import SHARED, write_table  # noqa: E402

from compressor import graph as G  # noqa: E402

MODELS = {
    "resnet18": {}, "resnet50": {}, "wide_resnet50_2": {}, "resnext50_32x4d": {}, "vgg11_bn": {},
    "mobilenet_v2": {}, "mobilenet_v3_small": {}, "mobilenet_v3_large": {}, "efficientnet_b0": {},
    "regnet_y_400mf": {}, "densenet121": {}, "shufflenet_v2_x1_0": {}, "squeezenet1_1": {},
    "googlenet": {"aux_logits": False, "init_weights": True}, "mnasnet1_0": {}, "convnext_tiny": {},
    "cifar_resnet20": None,
}
TARGETS = (0.5, 0.4)


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def load(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "cifar_resnet20":
        import importlib.util

        spec = importlib.util.spec_from_file_location("shared_cifar_resnet", SHARED / "models" / "cifar_resnet.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return randomize_bn(module.CifarResNet(20)), (3, 32, 32)
    import torchvision

    return randomize_bn(getattr(torchvision.models, name)(**MODELS[name])), (3, 224, 224)


def counts_at(graph: G.ChannelGraph, ratio: float) -> dict[int, int]:
    out = {}
    for g in graph.groups:
        if g.prunable:
            m = max(1, g.multiple)
            k = max(g.min_channels, -(-int(round(ratio * g.size * 1000)) // 1000))
            out[g.id] = min(g.size, -(-k // m) * m)
    return out


def uniform_counts(graph: G.ChannelGraph, target: float) -> dict[int, int]:
    """Largest uniform keep ratio whose estimated MACs are at most ``target`` of the full model."""
    full = G.estimate_macs(graph, {})
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if G.estimate_macs(graph, counts_at(graph, mid)) <= target * full:
            lo = mid
        else:
            hi = mid
    return counts_at(graph, lo)


def l1_plan(graph: G.ChannelGraph, counts: dict[int, int]) -> dict[int, torch.Tensor]:
    plan = {}
    for gid, k in counts.items():
        g = graph.groups[gid]
        root = next(m for m in g.members if m.module == g.root and m.kind == "out")
        w = graph.model.get_submodule(g.root).weight.detach()
        score = w.flatten(1).abs().sum(1)[torch.as_tensor(root.indices)]
        part = G.conv_groups(graph, gid)
        if part is None:
            plan[gid] = score.topk(k).indices.sort().values
            continue
        n = int(part.max()) + 1
        chosen = []
        for b in range(n):
            mine = torch.nonzero(part == b).flatten()
            chosen.append(mine[score[mine].topk(k // n).indices])
        plan[gid] = torch.cat(chosen).sort().values
    return plan


def onnx_diff(model: nn.Module, x: torch.Tensor) -> float:
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, opset_version=17, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x)
    return float((torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]) - ref).abs().max())


def run_model(name: str) -> list[list[str]]:
    rows = []
    model, shape = load(name)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    graph = G.build_graph(model, x[:1])
    build_s = time.perf_counter() - start
    macs0, params0 = G.count_macs_params(graph.model, x)
    with torch.no_grad():
        scale = float(graph.model(x).abs().max())
    excluded = graph.excluded
    reasons: dict[str, int] = {}
    for g in excluded:
        reasons[g.reason] = reasons.get(g.reason, 0) + 1
    excl = "; ".join(f"{n}x {r}" for r, n in reasons.items())
    for target in TARGETS:
        t0 = time.perf_counter()
        counts = uniform_counts(graph, target)
        est = G.estimate_macs(graph, counts)
        plan = l1_plan(graph, counts)
        pruned = G.apply_plan(graph, plan)
        macs1, params1 = G.count_macs_params(pruned.model, x)
        diff = G.soundness_diff(graph, plan, pruned.model, x)
        try:
            odiff = f"{onnx_diff(pruned.model, x):.1e}"
        except Exception as exc:  # noqa: BLE001 - reported in the table
            odiff = f"failed: {type(exc).__name__}"
        wall = build_s + time.perf_counter() - t0
        rows.append([
            name, f"{target:.0%}", f"{macs1 / macs0:.1%}", f"{abs(est - macs1) / macs1:.2%}",
            f"{params1 / params0:.1%}",
            f"{diff:.1e} (max out {scale:.1e})", odiff, f"{len(excluded)}/{len(graph.groups)}: {excl}",
            f"{wall:.1f}",
        ])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main(names: list[str]) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = []
    for name in names:
        try:
            rows += run_model(name)
        except Exception as exc:  # noqa: BLE001 - one broken model must not hide the others
            rows.append([name, "-", "-", "-", "-", "-", "-", f"FAILED: {type(exc).__name__}: {exc}"[:200], "-"])
            print(rows[-1], flush=True)
    header = ["model", "target MACs", "MACs kept (exact)", "estimate error", "params kept", "soundness max diff",
              "ONNX max diff", "excluded groups", "wall s"]
    notes = [
        "Random weights (BatchNorm statistics randomized so activations keep their scale), torchvision models "
        "at 1x3x224x224, CIFAR ResNet-20 (option-A shortcuts) at 1x3x32x32.",
        "Uniform keep ratio per prunable group found by bisection on `estimate_macs`; channels kept by L1 norm "
        "of the root's weights. MACs = convolution + linear multiply-accumulates (`count_macs_params`).",
        "Soundness = max |pruned(x) - masked_original(x)| on 2 random inputs (max out = max |original(x)|); "
        "ONNX = max |onnxruntime - PyTorch| of the pruned model (opset 17). Wall = graph build + search + prune + "
        "checks, CPU with 2 threads shared with other jobs.",
        "`model output channels` is the classifier output, always kept whole.",
    ]
    write_table(REPO / "bench" / "results" / "graph_coverage.md", "Graph coverage", header, rows, notes)


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
