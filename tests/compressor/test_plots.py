"""PNG plots are written and non-empty, also with missing values."""

from __future__ import annotations

from compressor.plots import plot_layer_widths, plot_tradeoff

PNG = b"\x89PNG"


def _png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000


def test_tradeoff(tmp_path):
    points = [{"flops_ratio": 0.3, "latency_ms": 1.0, "accuracy": 0.7},
              {"flops_ratio": 0.6, "latency_ms": 1.6, "accuracy": 0.85},
              {"flops_ratio": 0.5, "latency_ms": 1.3, "accuracy": 0.8}]
    _png(plot_tradeoff(points, tmp_path / "t.png"))


def test_tradeoff_missing_values(tmp_path):
    points = [{"flops_ratio": 0.3, "latency_ms": 1.0}, {"flops_ratio": 0.5, "latency_ms": None, "accuracy": None},
              {"flops_ratio": None}, {"flops_ratio": 0.7, "accuracy": float("nan")}]
    _png(plot_tradeoff(points, tmp_path / "a.png"))
    _png(plot_tradeoff([{"flops_ratio": 0.5, "accuracy": 0.9}], tmp_path / "b.png"))
    _png(plot_tradeoff([], tmp_path / "sub" / "c.png"))


def test_layer_widths(tmp_path):
    layers = {f"layer{i}.conv1": (i + 2, 16) for i in range(12)}
    _png(plot_layer_widths(layers, tmp_path / "w.png"))
    _png(plot_layer_widths({}, tmp_path / "empty.png"))
