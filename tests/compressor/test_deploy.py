"""The target's latency timer: the width search must time models as the report's measurement does."""

from pathlib import Path

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
