"""The shared timing loop and runners (no timing thresholds: only structure and ordering)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.errors import CompressorError, UsageError
from export.latency import (
    LatencyResult,
    OrtRunner,
    TorchRunner,
    compare_latency,
    measure,
    normalize_backend,
    ort_cuda_available,
    summarize,
    time_loop,
)


def tiny(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 4)).eval()


def _sane(r: LatencyResult, iters: int):
    assert len(r.samples_ms) == iters
    assert 0 < r.min <= r.p50 <= r.p90 <= r.p99 <= r.max
    assert r.min <= r.mean <= r.max


def test_time_loop_counts_calls():
    calls = []
    samples = time_loop(lambda: calls.append(1), warmup=3, iters=5, sync=lambda: calls.append(0))
    assert len(samples) == 5 and all(s >= 0 for s in samples)
    assert calls.count(1) == 8


def test_summarize_orders_percentiles():
    s = summarize([5.0, 1.0, 3.0, 2.0, 100.0])
    assert s["p50"] == 3.0 and s["p50"] <= s["p90"] <= s["p99"] <= s["max"] == 100.0
    with pytest.raises(UsageError):
        summarize([])


def test_measure_torch_cpu():
    r = measure(tiny(), torch.randn(1, 3, 16, 16), device="cpu", backend="torch", batch_size=2, warmup=1, iters=7)
    _sane(r, 7)
    assert (r.backend, r.device, r.batch_size, r.precision) == ("torch", "cpu", 2, "fp32")
    assert set(r.as_dict()) >= {"p50", "p90", "p99", "mean"} and "samples_ms" not in r.as_dict()


def test_torch_runner_leaves_model_untouched():
    model = tiny()
    runner = TorchRunner(model, torch.randn(1, 3, 8, 8), channels_last=True, fp16=True)
    assert runner.precision == "fp32"  # fp16 applies on cuda only
    runner.step()
    assert next(model.parameters()).dtype == torch.float32


def test_measure_onnxruntime_from_module_and_file(tmp_path):
    from export.onnx import export_onnx

    r = measure(tiny(), torch.randn(1, 3, 16, 16), backend="ort", warmup=1, iters=5)
    _sane(r, 5)
    assert r.backend == "onnxruntime"
    path = export_onnx(tiny(), torch.randn(1, 3, 16, 16), tmp_path / "t.onnx")
    r = measure(path, backend="onnxruntime", batch_size=3, warmup=1, iters=4)  # shape from the file
    _sane(r, 4)
    assert r.batch_size == 3
    assert OrtRunner(path, torch.randn(2, 3, 16, 16)).step()[0].shape == (2, 4)


def test_compare_latency_structure():
    out = compare_latency(tiny(16), tiny(4), torch.randn(1, 3, 16, 16), warmup=1, iters=5)
    for key in ("original_ms", "pruned_ms"):
        assert out[key]["p50"] <= out[key]["p90"] <= out[key]["p99"]
    assert out["speedup"] == pytest.approx(out["original_ms"]["p50"] / out["pruned_ms"]["p50"])
    assert out["settings"]["iters"] == 5 and out["settings"]["rounds"] == 5


def test_compared_onnxruntime_sessions_do_not_spin(monkeypatch):
    import export.latency as latency

    entries = []
    real_init = OrtRunner.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        try:
            entries.append(self.session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: onnxruntime's default (spinning)
            entries.append(None)

    monkeypatch.setattr(latency.OrtRunner, "__init__", recording_init)
    compare_latency(tiny(16), tiny(4), torch.randn(1, 3, 16, 16), backend="onnxruntime", warmup=1, iters=2)
    assert entries == ["0", "0"]  # alternating sessions must not steal each other's cores
    entries.clear()
    measure(tiny(), torch.randn(1, 3, 8, 8), backend="onnxruntime", warmup=1, iters=2)
    assert entries == [None]  # a single session keeps onnxruntime's default


def test_bad_arguments():
    with pytest.raises(UsageError):
        normalize_backend("tflite")
    with pytest.raises(UsageError):
        measure(tiny(), torch.randn(1, 3, 8, 8), iters=0)
    with pytest.raises(UsageError):
        compare_latency(tiny(), tiny(), torch.randn(1, 3, 8, 8), iters=0)
    with pytest.raises(UsageError):
        measure("model.onnx", torch.randn(1, 3, 8, 8), backend="torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(CompressorError, match="no CUDA GPU"):
        measure(tiny(), torch.randn(1, 3, 8, 8), device="cuda", iters=1)


def test_ort_cuda_reason():
    ok, reason = ort_cuda_available()
    assert ok or "onnxruntime-gpu" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_graphs():  # pragma: no cover - runs on GPU machines only
    r = measure(tiny(), torch.randn(1, 3, 16, 16), device="cuda", fp16=True, channels_last=True, cuda_graphs=True,
                warmup=2, iters=5)
    _sane(r, 5)
    assert r.precision == "fp16"


def test_compare_latency_sees_another_process_using_the_cpu():
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat: the other processes' CPU use is not measured on this system")
    model = tiny(32)
    example = torch.randn(1, 3, 64, 64)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = compare_latency(model, model, example, warmup=2, iters=400, threads=1)
    finally:
        spinner.kill()
        spinner.wait()
    # a spinning interpreter keeps about one core busy; our own threads are not counted
    assert busy["settings"]["other_cpu_load"] >= 0.5, busy["settings"]
    assert busy["settings"]["cpus"] >= 1
