"""Latency measurement: one shared timing loop, and runners for torch, onnxruntime and TensorRT.

Every backend goes through ``time_loop`` (warm-up, then ``iters`` timed calls, each bracketed
by a device synchronization), so the percentiles mean the same thing everywhere. Use
``measure`` for one model and ``compare_latency`` for original vs pruned under identical settings.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError, UsageError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
_BACKEND_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "pytorch": "torch"}


@dataclass
class LatencyResult:
    """Latency of one model: percentiles and mean in milliseconds per batch."""

    backend: str
    device: str
    batch_size: int
    warmup: int
    iters: int
    precision: str
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def as_dict(self, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        return d

    def percentiles(self) -> dict[str, float]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": self.mean}


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation, so p50 <= p90 <= p99), mean, min, max of the samples."""
    if not samples_ms:
        raise UsageError("no latency samples: --iters must be at least 1")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {"p50": p50, "p90": p90, "p99": p99, "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(monotonic seconds, CPU seconds busy on all cores, CPU seconds of this process) now; None without /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
    guests = sum(ticks[8:10])  # guest time is already counted in user and nice
    own = os.times()
    return time.monotonic(), (sum(ticks) - idle - guests) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_cpu_load(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None) -> float | None:
    """Cores that other processes kept busy, on average, between two :func:`cpu_snapshot` calls."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / (after[0] - before[0]))


def time_loop(step: Callable[[], object], warmup: int, iters: int,
              sync: Callable[[], None] | None = None) -> list[float]:
    """Call ``step`` ``warmup`` times untimed, then ``iters`` times timed; milliseconds per call.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before starting and after each call so
    asynchronous devices are timed to completion.
    """
    if iters < 1 or warmup < 0:
        raise UsageError(f"iters {iters} / warmup {warmup} must be >= 1 / >= 0")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


class Runner:
    """A prepared model with a zero-argument ``step``; subclasses set backend, device, precision."""

    backend = "?"
    device = "cpu"
    precision = "fp32"
    batch_size = 1

    def step(self) -> object:  # pragma: no cover - abstract
        raise NotImplementedError

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

    def measure(self, warmup: int = 10, iters: int = 50) -> LatencyResult:
        samples = time_loop(self.step, warmup, iters, self.sync)
        return LatencyResult(backend=self.backend, device=self.device, batch_size=self.batch_size, warmup=warmup,
                             iters=iters, precision=self.precision, samples_ms=samples, **summarize(samples))


def _cuda_check(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressorError(f"device {device!r}: no CUDA GPU is visible here; use cpu")


class TorchRunner(Runner):
    """Eager PyTorch on cpu or cuda (a private copy of the model is moved/cast; the caller's is untouched).

    Args:
        fp16: Half precision (cuda only; ignored on cpu, where the result says ``fp32``).
        channels_last: NHWC memory format for model and input.
        cuda_graphs: Capture one forward in a CUDA graph and replay it (cuda only).
    """

    backend = "torch"

    def __init__(self, model: nn.Module, example: torch.Tensor, device: str = "cpu", fp16: bool = False,
                 channels_last: bool = False, cuda_graphs: bool = False):
        _cuda_check(device)
        self.device = device
        cuda = device.startswith("cuda")
        self.precision = "fp16" if fp16 and cuda else "fp32"
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self.model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
        x = example.to(device=device, dtype=dtype)
        if channels_last and x.dim() == 4:
            self.model = self.model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.x = x
        self.batch_size = int(x.shape[0])
        self.graph = None
        if cuda_graphs and cuda:
            self._capture()

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                self.model(self.x)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.out = self.model(self.x)

    def step(self) -> object:
        if self.graph is not None:
            self.graph.replay()
            return self.out
        with torch.inference_mode():
            return self.model(self.x)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)


def ort_cuda_available() -> tuple[bool, str]:
    """Whether onnxruntime has the CUDA execution provider (onnxruntime-gpu), with a reason when not."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a dependency
        return False, f"onnxruntime is not installed ({exc})"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return True, ""
    return False, "onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu (instead of onnxruntime)"


class OrtRunner(Runner):
    """An onnxruntime session on an ONNX file; ``device="cuda"`` needs onnxruntime-gpu.

    Args:
        threads: intra-op threads (default: torch's thread count, so torch and ORT timings compare).
    """

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, example: torch.Tensor | np.ndarray, device: str = "cpu",
                 providers: list[str] | None = None, threads: int | None = None, spinning: bool = True):
        from export.onnx import ort_session

        self.device = device
        if providers is None:
            if device.startswith("cuda"):
                ok, reason = ort_cuda_available()
                if not ok:
                    raise CompressorError(f"--backend onnxruntime on {device}: {reason}")
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
        self.session = ort_session(onnx_path, providers=providers, threads=threads or torch.get_num_threads(),
                                   spinning=spinning)
        self.name = self.session.get_inputs()[0].name
        x = example.detach().cpu().float().numpy() if isinstance(example, torch.Tensor) else example
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.batch_size = int(self.x.shape[0])
        self.feed = {self.name: self.x}

    def step(self) -> object:
        return self.session.run(None, self.feed)


class TensorRTRunner(Runner):
    """A serialized TensorRT engine run with ``execute_async_v3`` on torch-allocated CUDA buffers."""

    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, example: torch.Tensor, device: str = "cuda"):
        from export.tensorrt import import_tensorrt

        trt = import_tensorrt()
        _cuda_check("cuda")
        self.device = device if device.startswith("cuda") else "cuda"
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise CompressorError(f"TensorRT could not deserialize {engine_path} (built for another GPU/version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        self.batch_size = int(example.shape[0])
        self.buffers = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for n in inputs:
            self.context.set_input_shape(n, tuple(example.shape))
        self.precision = "engine"
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(n))
            if n in inputs:
                buf = example.to(device=self.device, dtype=dtype).contiguous()
            else:
                buf = torch.empty(shape, dtype=dtype, device=self.device)
            self.buffers[n] = buf
            self.context.set_tensor_address(n, buf.data_ptr())

    def step(self) -> object:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CompressorError("TensorRT execute_async_v3 failed")
        return self.buffers

    def sync(self) -> None:
        self.stream.synchronize()


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8, trt.int32: torch.int32,
             trt.bool: torch.bool}
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    return table.get(dtype, torch.float32)


def normalize_backend(backend: str) -> str:
    b = _BACKEND_ALIASES.get(backend.lower(), backend.lower())
    if b not in BACKENDS:
        raise UsageError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    return b


def _example(model_or_onnx, example_input, batch_size, input_shape) -> torch.Tensor:
    if example_input is None:
        if input_shape is None and isinstance(model_or_onnx, (str, Path)) and str(model_or_onnx).endswith(".onnx"):
            input_shape = _onnx_chw(model_or_onnx)
        if input_shape is None:
            raise UsageError("measure needs example_input or input_shape (C, H, W)")
        return torch.randn(batch_size or 1, *input_shape)
    if batch_size is not None and batch_size != example_input.shape[0]:
        return example_input[:1].repeat(batch_size, *([1] * (example_input.dim() - 1)))
    return example_input


def _onnx_chw(path) -> tuple[int, ...]:
    from export.onnx import onnx_input_shape

    return onnx_input_shape(path)


def make_runner(model_or_onnx, example: torch.Tensor, device: str = "cpu", backend: str = "torch",
                fp16: bool = False, channels_last: bool = False, cuda_graphs: bool = False,
                workdir: str | Path | None = None, providers: list[str] | None = None,
                threads: int | None = None, stack: contextlib.ExitStack | None = None,
                spinning: bool = True) -> Runner:
    """The runner for ``backend``; modules are exported to ONNX (and built to an engine) in a temp folder."""
    backend = normalize_backend(backend)
    is_path = isinstance(model_or_onnx, (str, Path))
    if backend == "torch":
        if is_path:
            raise UsageError(f"backend torch needs an nn.Module, not the file {model_or_onnx}")
        return TorchRunner(model_or_onnx, example, device, fp16=fp16, channels_last=channels_last,
                           cuda_graphs=cuda_graphs)
    tmp = None
    if not is_path or (backend == "tensorrt" and not str(model_or_onnx).endswith(".engine")):
        stack = stack if stack is not None else contextlib.ExitStack()
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="latency-", dir=workdir)))
    path = Path(model_or_onnx) if is_path else None
    if path is None:
        from export.onnx import export_onnx

        path = export_onnx(model_or_onnx, example[:1].cpu(), tmp / "model.onnx")
    if backend == "onnxruntime":
        return OrtRunner(path, example, device, providers=providers, threads=threads, spinning=spinning)
    if path.suffix != ".engine":
        from export.tensorrt import build_engine

        engine = tmp / "model.engine"
        build_engine(path, engine, precision="fp16" if fp16 else "fp32")
        path = engine
    return TensorRTRunner(path, example, device)


def measure(model_or_onnx: nn.Module | str | Path, example_input: torch.Tensor | None = None, device: str = "cpu",
            backend: str = "torch", batch_size: int | None = None, warmup: int = 10, iters: int = 50,
            fp16: bool = False, channels_last: bool = False, cuda_graphs: bool = False,
            input_shape: tuple[int, ...] | None = None, workdir: str | Path | None = None,
            providers: list[str] | None = None, threads: int | None = None, spinning: bool = True) -> LatencyResult:
    """Latency of a module, an ONNX file or a TensorRT engine on ``device`` with ``backend``.

    Args:
        model_or_onnx: ``nn.Module`` (any backend; exported on the fly for onnxruntime/tensorrt),
            an ``.onnx`` path (onnxruntime/tensorrt) or an ``.engine`` path (tensorrt).
        example_input: Input batch; ``batch_size`` (if given) repeats its first sample. Without it,
            random data of ``input_shape`` (C, H, W) or the ONNX file's input shape is used.
        device: ``cpu`` or ``cuda[:N]``.
        backend: ``torch``, ``onnxruntime`` (``ort``) or ``tensorrt`` (``trt``).
        fp16, channels_last, cuda_graphs: torch options (fp16/cuda_graphs on cuda only); fp16
            also selects an FP16 engine for tensorrt.
        spinning: onnxruntime's intra-op threads busy-wait between runs (its default); False times
            the sessions as ``compare_latency`` does.
    """
    example = _example(model_or_onnx, example_input, batch_size, input_shape)
    with contextlib.ExitStack() as stack:
        runner = make_runner(model_or_onnx, example, device, backend, fp16=fp16, channels_last=channels_last,
                             cuda_graphs=cuda_graphs, workdir=workdir, providers=providers, threads=threads,
                             stack=stack, spinning=spinning)
        try:
            return runner.measure(warmup, iters)
        finally:
            runner.close()


def compare_latency(original, pruned, example_input: torch.Tensor | None = None, device: str = "cpu",
                    backend: str = "torch", batch_size: int | None = None, warmup: int = 10, iters: int = 50,
                    rounds: int = 5, input_shape: tuple[int, ...] | None = None, **kwargs) -> dict:
    """Measure ``original`` and ``pruned`` with identical settings (same input, backend, threads).

    The timed iterations alternate between the two models in ``rounds`` blocks, so drifting load
    on a shared machine affects both alike. Returns ``{"original_ms": {p50, p90, p99, mean},
    "pruned_ms": {...}, "speedup": original p50 / pruned p50, "settings": {...}}``; ``settings`` holds
    ``other_cpu_load``, the CPU cores other processes kept busy on average while timing (None where
    ``/proc/stat`` is absent), and ``cpus``. Other keyword
    arguments (fp16, channels_last, cuda_graphs, workdir, providers, threads, spinning) go to
    ``make_runner``; onnxruntime sessions are timed without thread spinning unless told otherwise.
    """
    if iters < 1 or warmup < 0:
        raise UsageError(f"iters {iters} / warmup {warmup} must be >= 1 / >= 0")
    example = _example(original, example_input, batch_size, input_shape)
    if normalize_backend(backend) == "onnxruntime":
        # busy-waiting threads of one session slow the other down when they alternate (measured on a
        # 2-core CPU: ResNet-56 speed-ups of 0.9-1.5x over four repeats with spinning, 1.1-1.2x without)
        kwargs.setdefault("spinning", False)
    rounds = max(1, min(rounds, iters))
    sizes = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    with contextlib.ExitStack() as stack:
        runners = [make_runner(m, example, device, backend, stack=stack, **kwargs) for m in (original, pruned)]
        samples: list[list[float]] = [[], []]
        start = cpu_snapshot()
        for r, size in enumerate(sizes):
            for i, runner in enumerate(runners):
                samples[i] += time_loop(runner.step, warmup if r == 0 else 1, size, runner.sync)
        others = other_cpu_load(start, cpu_snapshot())
        for runner in runners:
            runner.close()
    o, p = (summarize(s) for s in samples)
    first = runners[0]
    return {
        "original_ms": {k: o[k] for k in ("p50", "p90", "p99", "mean")},
        "pruned_ms": {k: p[k] for k in ("p50", "p90", "p99", "mean")},
        "speedup": o["p50"] / p["p50"] if p["p50"] > 0 else float("inf"),
        "settings": {"backend": first.backend, "device": first.device, "batch_size": first.batch_size,
                     "warmup": warmup, "iters": iters, "rounds": rounds, "precision": first.precision,
                     "threads": torch.get_num_threads(),
                     # CPU timings are only as good as the machine is quiet: other processes' use while timing
                     "other_cpu_load": None if others is None else round(others, 2), "cpus": os.cpu_count()},
    }


__all__ = ["BACKENDS", "LatencyResult", "OrtRunner", "Runner", "TensorRTRunner", "TorchRunner", "compare_latency",
           "make_runner", "measure", "normalize_backend", "ort_cuda_available", "summarize", "time_loop"]
