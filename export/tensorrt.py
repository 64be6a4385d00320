"""TensorRT: engine building through the Python API (tensorrt >= 10, optional) and device bundles.

``tensorrt`` is imported lazily; without it ``tensorrt_available()`` says why and
``build_engine`` raises a CompressorError telling how to install it. ``write_device_bundle``
needs no TensorRT here: it writes the ONNX file, a ``build_and_benchmark.sh`` running
``trtexec`` on the target device, and a README.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from compressor.errors import CompressorError, UsageError

INSTALL_HINT = (
    "install TensorRT 10 on a machine with an NVIDIA GPU (pip install tensorrt, or the JetPack/TensorRT "
    "packages on Jetson), or use a device bundle (--device PROFILE) and run build_and_benchmark.sh on the target"
)
PRECISIONS = ("fp32", "fp16", "int8")


def import_tensorrt():
    """The ``tensorrt`` module, or a CompressorError saying how to install it."""
    ok, reason = tensorrt_available()
    if not ok:
        raise CompressorError(f"TensorRT is not available: {reason}; {INSTALL_HINT}")
    import tensorrt

    return tensorrt


def tensorrt_available() -> tuple[bool, str]:
    """``(True, "")`` when TensorRT >= 10 and a CUDA GPU are usable here, else ``(False, reason)``."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"the tensorrt Python package is not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - broken installs raise OSError etc. on import
        return False, f"the tensorrt Python package failed to import: {type(exc).__name__}: {exc}"
    version = getattr(trt, "__version__", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < 10:
        return False, f"tensorrt {version} is installed but version 10 or later is needed (execute_async_v3 API)"
    import torch

    if not torch.cuda.is_available():
        return False, "tensorrt is installed but no CUDA GPU is visible"
    return True, ""


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16", workspace: int = 1 << 30,
                 timing_cache: str | Path | None = None, min_batch: int = 1, opt_batch: int = 1,
                 max_batch: int = 32) -> Path:
    """Build and serialize a TensorRT engine from an ONNX file with a dynamic batch.

    Args:
        precision: ``fp32``, ``fp16`` or ``int8`` (int8 also enables fp16 fallback; without a
            calibrator INT8 needs Q/DQ nodes in the ONNX, otherwise TensorRT uses placeholder scales).
        workspace: Workspace memory pool limit in bytes.
        timing_cache: File read (if present) and written to speed up later builds.
        min_batch, opt_batch, max_batch: The optimization profile for the batch dimension.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    trt = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompressorError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise CompressorError(f"{onnx_path}: input {tensor.name} has dynamic non-batch dims {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        data = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, False)  # ignore_mismatch=False
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompressorError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def trtexec_command(onnx_name: str, engine_name: str, precision: str, input_name: str, shape: tuple[int, ...],
                    warmup_ms: int = 500, iterations: int = 200, timing_cache: str = "timing.cache",
                    dla_core: int | None = None) -> list[str]:
    """The trtexec argument list (``--shapes`` fixes the dynamic batch to ``shape[0]``)."""
    args = [
        "trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}",
        f"--shapes={input_name}:{'x'.join(str(int(d)) for d in shape)}",
    ]
    if precision == "fp16":
        args.append("--fp16")
    elif precision == "int8":
        args += ["--int8", "--fp16"]
    args += [f"--warmUp={int(warmup_ms)}", f"--iterations={int(iterations)}", "--percentile=50,90,99",
             "--useCudaGraph", "--noDataTransfers", f"--timingCacheFile={timing_cache}", "--useSpinWait"]
    if dla_core is not None:
        args += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    return args


_SCRIPT = """#!/usr/bin/env bash
# Build a TensorRT engine for {name} and measure its latency (run this on the {name} device).
# Generated by cnn-compressor. trtexec ships with TensorRT: /usr/src/tensorrt/bin/trtexec on Jetson.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
{command} 2>&1 | tee trtexec.log
{dla}echo "latency summary (GPU compute time percentiles, ms):"
grep -E "GPU Compute Time|Latency:" trtexec.log || true
"""

_README = """Device bundle for {name}: {description}

Files
  {onnx}                 the pruned model (ONNX opset from the export, dynamic batch, input "{input}")
  build_and_benchmark.sh  builds {engine} with trtexec and prints latency percentiles
  README.txt              this file

On the device (TensorRT installed; on Jetson flash JetPack and set the power mode first,
e.g. `sudo nvpmodel -m 0 && sudo jetson_clocks`, so timings are repeatable):

  bash build_and_benchmark.sh

The command it runs:

  {command}

Precision {precision} (the profile's default), batch size {batch}, input shape {shape}.
Latency is GPU compute time with CUDA graphs and no host/device copies (--noDataTransfers);
compare it only with numbers measured the same way. For INT8 without Q/DQ nodes in the ONNX,
trtexec uses placeholder scales: the timing is representative, the accuracy is not.
Set TRTEXEC=/path/to/trtexec to use another binary. The timing cache ({cache}) speeds up rebuilds.
"""


def write_device_bundle(out_dir: str | Path, onnx_path: str | Path, profile, input_shape: tuple[int, ...],
                        batch_size: int = 1, warmup_ms: int = 500, iterations: int = 200) -> str:
    """Write ``out_dir`` with the ONNX file, ``build_and_benchmark.sh`` and ``README.txt`` for ``profile``.

    Args:
        profile: A DeviceProfile (uses name, description, default_precision).
        input_shape: ``(C, H, W)`` (or ``(N, C, H, W)``, whose N is replaced by ``batch_size``).

    Returns the trtexec command line (a shell string, with ``trtexec`` as the program).
    """
    from export.onnx import onnx_input_name

    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be at least 1")
    out_dir, onnx_path = Path(out_dir), Path(onnx_path)
    if not onnx_path.exists():
        raise CompressorError(f"{onnx_path} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_name = "model.onnx"
    if onnx_path.resolve() != (out_dir / onnx_name).resolve():
        shutil.copyfile(onnx_path, out_dir / onnx_name)
    input_name = onnx_input_name(out_dir / onnx_name)
    shape = tuple(int(d) for d in input_shape)
    shape = (batch_size, *(shape[1:] if len(shape) == 4 else shape))
    precision = getattr(profile, "default_precision", "fp16")
    if precision == "int8" and getattr(profile, "peak_int8_tops", 1) == 0:
        precision = "fp16"
    engine_name = f"model-{profile.name}-{precision}-b{batch_size}.engine"
    args = trtexec_command(onnx_name, engine_name, precision, input_name, shape, warmup_ms, iterations)
    command = shlex.join(args)
    script_command = '"$TRTEXEC" ' + shlex.join(args[1:])
    script = out_dir / "build_and_benchmark.sh"
    dla = ""
    if getattr(profile, "dla_cores", 0):
        dla_args = trtexec_command(onnx_name, engine_name.replace(".engine", "-dla0.engine"), precision, input_name,
                                   shape, warmup_ms, iterations, dla_core=0)
        dla = ("# To try the DLA (unsupported layers fall back to the GPU; CUDA graphs do not apply), run:\n"
               f'# "$TRTEXEC" {shlex.join(a for a in dla_args[1:] if a != "--useCudaGraph")}\n')
    script.write_text(_SCRIPT.format(name=profile.name, command=script_command, dla=dla))
    script.chmod(0o755)
    (out_dir / "README.txt").write_text(_README.format(
        name=profile.name, description=getattr(profile, "description", ""), onnx=onnx_name, input=input_name,
        engine=engine_name, command=command, precision=precision, batch=batch_size, shape="x".join(map(str, shape)),
        cache="timing.cache"))
    return command


__all__ = ["INSTALL_HINT", "build_engine", "import_tensorrt", "tensorrt_available", "trtexec_command",
           "write_device_bundle"]
