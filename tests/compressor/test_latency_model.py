"""Roofline estimate: positive, lower for pruned models, scales with the profile's peak."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from compressor.latency_model import estimate_latency, estimate_latency_ms, measure_candidates
from compressor.profiles import load_profile


def net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 10)).eval()


X = torch.randn(8, 3, 32, 32)


@pytest.mark.parametrize("name", ["jetson-orin-nano", "t4", "jetson-nano", "cpu"])
def test_positive_with_breakdown(name):
    profile = load_profile(name)
    est = estimate_latency(net(32), X, profile)
    assert est.estimate and est.total_ms > 0
    assert [layer.kind for layer in est.layers] == ["Conv2d", "Conv2d", "Linear"]
    assert est.total_ms == pytest.approx(sum(row["ms"] for row in est.table()))
    assert estimate_latency_ms(net(32), X, profile) == pytest.approx(est.total_ms)


def test_decreases_when_pruned():
    profile = load_profile("jetson")
    assert estimate_latency_ms(net(16), X, profile) < estimate_latency_ms(net(64), X, profile)


def test_scales_with_peak():
    profile = load_profile("t4")
    big = torch.randn(8, 3, 32, 32)
    fast = dataclasses.replace(profile, peak_fp16_tflops=profile.peak_fp16_tflops * 10,
                               memory_bandwidth_gbs=profile.memory_bandwidth_gbs * 10)
    assert estimate_latency_ms(net(64), big, fast) < estimate_latency_ms(net(64), big, profile)
    slow = dataclasses.replace(profile, peak_fp16_tflops=profile.peak_fp16_tflops / 100)
    assert estimate_latency_ms(net(64), big, slow) > estimate_latency_ms(net(64), big, profile)


def test_int8_not_slower_than_fp16_and_fallback():
    orin = load_profile("orin")
    assert estimate_latency_ms(net(64), X, orin, "int8") <= estimate_latency_ms(net(64), X, orin, "fp16")
    assert estimate_latency(net(8), X, load_profile("nano"), "int8").precision == "fp16"


def test_fx_graphmodule_and_state():
    model = net(8).train()
    gm = torch.fx.symbolic_trace(model)
    gm.train()
    assert estimate_latency_ms(gm, X, load_profile("a100")) > 0
    assert gm.training


def test_measure_candidates():
    rows = measure_candidates(net, [4, 8], torch.randn(1, 3, 16, 16), warmup=1, iters=3)
    assert [r["candidate"] for r in rows] == [4, 8]
    assert all(0 < r["p50"] <= r["p90"] <= r["p99"] for r in rows)
