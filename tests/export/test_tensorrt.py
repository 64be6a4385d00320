"""TensorRT availability, engine building without TensorRT, and device bundles."""

from __future__ import annotations

import shlex
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.profiles import list_profiles, load_profile
from export.benchmark import bench_onnx
from export.onnx import export_onnx
from export.tensorrt import build_engine, tensorrt_available, write_device_bundle

GPU_PROFILES = [n for n in list_profiles() if load_profile(n).kind != "cpu"]


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    return export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path_factory.mktemp("onnx") / "net.onnx")


def _has_trt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(_has_trt(), reason="TensorRT is installed here")
def test_unavailable_with_reason():
    ok, reason = tensorrt_available()
    assert not ok and "tensorrt" in reason


@pytest.mark.skipif(_has_trt(), reason="TensorRT is installed here")
def test_build_engine_says_how_to_install(onnx_file, tmp_path):
    with pytest.raises(CompressorError, match="pip install tensorrt"):
        build_engine(onnx_file, tmp_path / "m.engine")


def test_old_tensorrt_is_rejected(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    ok, reason = tensorrt_available()
    assert not ok and "8.6.1" in reason and "10" in reason


def test_bad_precision(onnx_file, tmp_path):
    with pytest.raises(CompressorError, match="precision"):
        build_engine(onnx_file, tmp_path / "m.engine", precision="fp8")


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_bundle_per_profile(name, onnx_file, tmp_path):
    profile = load_profile(name)
    command = write_device_bundle(tmp_path / "b", onnx_file, profile, (3, 32, 32), batch_size=4)
    args = shlex.split(command)
    assert args[0] == "trtexec"
    assert "--onnx=model.onnx" in args
    assert any(a.startswith("--saveEngine=") and a.endswith(".engine") for a in args)
    assert "--shapes=input:4x3x32x32" in args
    for flag in ("--percentile=50,90,99", "--useCudaGraph", "--noDataTransfers", "--useSpinWait"):
        assert flag in args
    assert any(a.startswith("--warmUp=") for a in args) and any(a.startswith("--iterations=") for a in args)
    assert any(a.startswith("--timingCacheFile=") for a in args)
    if profile.default_precision == "fp16":
        assert "--fp16" in args and "--int8" not in args
    elif profile.default_precision == "int8":
        assert "--int8" in args
    script = (tmp_path / "b" / "build_and_benchmark.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "--shapes=input:4x3x32x32" in script
    assert ("--useDLACore=0" in script) == (profile.dla_cores > 0)
    assert subprocess.run(["bash", "-n", str(tmp_path / "b" / "build_and_benchmark.sh")]).returncode == 0
    assert (tmp_path / "b" / "model.onnx").stat().st_size == onnx_file.stat().st_size
    assert command in (tmp_path / "b" / "README.txt").read_text()


def test_bundle_int8_profile(onnx_file, tmp_path):
    import dataclasses

    profile = dataclasses.replace(load_profile("t4"), default_precision="int8")
    args = shlex.split(write_device_bundle(tmp_path, onnx_file, profile, (1, 3, 32, 32)))
    assert "--int8" in args and "--shapes=input:1x3x32x32" in args


def test_bench_cpu_and_bundle(onnx_file, tmp_path):
    result = bench_onnx(onnx_file, device="cpu", batch_size=2, warmup=1, iters=3)
    assert result["backend"] == "onnxruntime" and result["p50"] <= result["p99"]
    result = bench_onnx(onnx_file, device="jetson", batch_size=1, out=tmp_path / "bundle")
    assert result["device"] == "jetson-orin-nano" and "--fp16" in result["trtexec"]
    assert (tmp_path / "bundle" / "build_and_benchmark.sh").exists()
    with pytest.raises(CompressorError, match="unknown device profile"):
        bench_onnx(onnx_file, device="tpu-v9")


def test_build_engine_with_mocked_tensorrt(onnx_file, tmp_path, monkeypatch):
    """build_engine drives the real TensorRT 10 API shape: parser, config flags, profile, timing cache."""
    from unittest import mock

    trt = mock.MagicMock(__version__="10.3.0")
    net = trt.Builder.return_value.create_network.return_value
    net.num_inputs = 1
    net.get_input.return_value = types.SimpleNamespace(name="input", shape=(-1, 3, 32, 32))
    trt.OnnxParser.return_value.parse.return_value = True
    trt.Builder.return_value.build_serialized_network.return_value = b"ENGINE"
    config = trt.Builder.return_value.create_builder_config.return_value
    config.get_timing_cache.return_value.serialize.return_value = b"CACHE"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = build_engine(onnx_file, tmp_path / "m.engine", precision="int8", timing_cache=tmp_path / "t.cache")
    assert out.read_bytes() == b"ENGINE" and (tmp_path / "t.cache").read_bytes() == b"CACHE"
    flags = [c.args[0] for c in config.set_flag.call_args_list]
    assert flags == [trt.BuilderFlag.FP16, trt.BuilderFlag.INT8]
    profile = trt.Builder.return_value.create_optimization_profile.return_value
    profile.set_shape.assert_called_once_with("input", (1, 3, 32, 32), (1, 3, 32, 32), (32, 3, 32, 32))
