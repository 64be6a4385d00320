"""The target's latency timer: the width search must time models as the report's measurement does."""

from pathlib import Path

import pytest
import torch
from torch import nn

from compressor import deploy
from compressor.config import CompressConfig
from export import latency


def test_search_times_onnxruntime_as_the_report_does(monkeypatch):
    seen = {}

    def fake_measure(model, example, **kwargs):
        seen.update(kwargs)
        return latency.LatencyResult("onnxruntime", "cpu", 1, 0, 1, "fp32", *[1.0] * 6)

    monkeypatch.setattr(latency, "measure", fake_measure)
    config = CompressConfig(model="x.py:Net", budget="2x", out=Path("unused"))
    timer = deploy._latency_timer(config, deploy.resolve_target("cpu", None), torch.randn(1, 3, 8, 8))
    assert timer(nn.Conv2d(3, 4, 3)) == 1.0
    assert seen["backend"] == "onnxruntime" == deploy.primary_backend(deploy.resolve_target("cpu", None))
    # compare_latency (the report) times onnxruntime sessions without busy-waiting threads; so must the search
    assert seen["spinning"] is False


def test_cpu_alignment_default_rounds_the_wide_groups_only():
    default, every, none = (deploy.resolve_target("cpu", align) for align in (None, True, False))
    assert (default.alignment, default.align_min_channels) == (deploy.CPU_ALIGNMENT, deploy.CPU_ALIGN_MIN_CHANNELS)
    assert (every.alignment, every.align_min_channels) == (8, 0)
    assert none.alignment == 1
    gpu = deploy.resolve_target("jetson", None)
    assert gpu.alignment > 1 and gpu.align_min_channels == 0  # GPU profiles: every group, as before


@pytest.mark.parametrize("max_share", [None, 0.03])
def test_cpu_default_leaves_coarse_alignment_steps_free(monkeypatch, max_share):
    """A group stays aligned only where 8 channels cost at most CPU_ALIGN_MAX_STEP_SHARE of the MACs."""
    import torchvision

    from compressor import graph as G

    if max_share is not None:
        monkeypatch.setattr(deploy, "CPU_ALIGN_MAX_STEP_SHARE", max_share)
    model = torchvision.models.resnet18(num_classes=10).eval()
    target = deploy.resolve_target("cpu", None)
    graph = G.build_graph(model, torch.randn(1, 3, 64, 64), round_to=target.alignment,
                          round_min_channels=target.align_min_channels)
    released = deploy.relax_coarse_alignment(graph, target)
    full = {g.id: g.size for g in graph.groups}
    total = G.estimate_macs(graph, full)
    for g in graph.groups:
        if g.size < target.align_min_channels:
            continue
        share = -G.estimate_macs_change(graph, full, g.id, g.size - 8) / total
        assert (g.root in released) == (share > deploy.CPU_ALIGN_MAX_STEP_SHARE)
        assert g.multiple == (1 if g.root in released else 8)
    # the stem's 64-channel residual group: 8 channels move 4.4% of the MACs; every other group under 1.6%
    assert released == ([] if max_share is None else ["conv1"])
    every = deploy.resolve_target("cpu", True)  # --align: every group, however coarse
    graph = G.build_graph(model, torch.randn(1, 3, 64, 64), round_to=8)
    assert deploy.relax_coarse_alignment(graph, every) == []


def test_speedup_budget_times_each_candidate_against_the_original(monkeypatch, tmp_path):
    """A drifting machine: the original took 3.2 ms at the search's start, 2.5 ms beside the candidate."""
    calls = []

    def fake_compare(original, pruned, example, **kwargs):
        calls.append((original, pruned, kwargs))
        return {"original_ms": {"p50": 2.5}, "pruned_ms": {"p50": 2.0}, "speedup": 1.25}

    monkeypatch.setattr(latency, "compare_latency", fake_compare)
    config = CompressConfig(model="x.py:Net", budget="1.5x", out=Path("unused"), iters=7)
    target = deploy.resolve_target("cpu", None)
    original, candidate = tmp_path / "original.onnx", nn.Conv2d(3, 2, 3)
    original.write_bytes(b"")  # the pipeline's export of the original, timed as it is
    notes = []
    timer = deploy._paired_timer(config, target, torch.randn(1, 3, 8, 8), original, 3.2, notes.append)
    ms = timer(candidate)
    # in the first measurement's units, so that the search compares it with 3.2 / 1.5 ms: 1.25x misses 1.5x
    assert ms == pytest.approx(3.2 / 1.25) and ms > 3.2 / 1.5
    reference, timed, kwargs = calls[0]
    assert timed is candidate and kwargs["backend"] == "onnxruntime" and kwargs["iters"] == 7
    assert Path(reference) == tmp_path / "original.onnx" and Path(reference).is_file()  # the existing export
    timer(candidate)
    assert calls[1][0] == reference and "1.25x" in notes[0]
