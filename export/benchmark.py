"""``compress bench MODEL.onnx``: latency of an existing ONNX file, or a device bundle for a remote target."""

from __future__ import annotations

from pathlib import Path

from compressor.errors import CompressorError, UsageError


def bench_onnx(path: str | Path, device: str = "cpu", batch_size: int = 1, warmup: int = 10, iters: int = 100,
               out: str | Path | None = None) -> dict:
    """Benchmark ``path``.

    ``device``: ``cpu`` (or the ``cpu`` profile) runs onnxruntime here; ``cuda`` runs onnxruntime-gpu
    or, failing that, TensorRT; any other profile name/alias writes a device bundle (ONNX copy,
    ``build_and_benchmark.sh`` with a trtexec command, README) to ``out`` (default: a
    ``bundle-PROFILE`` folder beside the ONNX file) and returns its location and command.
    """
    from export.latency import measure, ort_cuda_available
    from export.onnx import onnx_input_shape

    path = Path(path)
    if not path.exists():
        raise CompressorError(f"{path} does not exist")
    if path.suffix.lower() != ".onnx":
        raise UsageError(f"{path} is not an .onnx file")
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise UsageError(f"--batch-size {batch_size} / --iters {iters} / --warmup {warmup} must be >= 1 / >= 1 / >= 0")
    shape = onnx_input_shape(path)
    base = {"model": str(path), "batch_size": batch_size, "input_shape": [batch_size, *shape]}
    if device == "cuda" or device.startswith("cuda:"):
        ok, reason = ort_cuda_available()
        backend = "onnxruntime"
        if not ok:
            from export.tensorrt import tensorrt_available

            trt_ok, trt_reason = tensorrt_available()
            if not trt_ok:
                raise CompressorError(f"--device {device}: {reason}; and {trt_reason}")
            backend = "tensorrt"
        result = measure(path, device=device, backend=backend, batch_size=batch_size, warmup=warmup, iters=iters,
                         input_shape=shape)
        return {**base, "device": device, "backend": backend, "estimate": False, **result.as_dict()}
    from compressor.profiles import load_profile

    profile = None if device == "cpu" else load_profile(device)
    if profile is None or profile.kind == "cpu":
        result = measure(path, device="cpu", backend="onnxruntime", batch_size=batch_size, warmup=warmup,
                         iters=iters, input_shape=shape)
        return {**base, **result.as_dict(), "device": "cpu", "estimate": False}
    from export.tensorrt import write_device_bundle

    folder = Path(out) if out is not None else path.parent / f"bundle-{profile.name}"
    command = write_device_bundle(folder, path, profile, shape, batch_size=batch_size)
    return {**base, "device": profile.name, "backend": "tensorrt (on the device)", "bundle": str(folder),
            "script": str(folder / "build_and_benchmark.sh"), "trtexec": command,
            "note": f"copy {folder} to the {profile.name} device and run build_and_benchmark.sh there"}


__all__ = ["bench_onnx"]
